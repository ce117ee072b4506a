"""Why a model is slow, and how much faster it could get: time per op from each runtime's own
profiler, FLOPs and bytes per op from the graph at the profiled shapes, and both against the
device's measured peaks (a roofline).

    run.py          profile a model or an output directory: build, open, time, profile, cost
    breakdown.py    what every runtime's profiler hands back: ops timed and costed, calls timed
    onnxruntime.py  ONNX Runtime's profiling JSON, joined to the graph it ran
    openvino.py     OpenVINO's per-node counters, joined to the IR's ops
    pytorch.py      torch.profiler's ops (and CUDA kernels on a GPU)
    cost.py         FLOPs and bytes of one op at concrete shapes
    onnx_graph.py   an ONNX graph's nodes, shapes inferred at the batch's shapes
    torch_ops.py    aten ops at the shapes torch.profiler recorded
    roofline.py     achieved FLOP/s and bytes/s against the roofs; the bound and the advice
    result.py       the answer: tables for people (`__rich__`), JSON for machines

Sits beside search and report: imports runtimes, export, peaks and the core; never passes,
search or serve. LLMs (prefill and per-token decode) are not profiled yet; they will enter
through `run.py`, with their own breakdown beside the encoder's.
"""
