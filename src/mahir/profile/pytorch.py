"""torch.profiler around a torch session's calls: each op the model calls, timed, and costed from
the shapes the profiler recorded.

Each profiled call runs inside a `record_function` marker; the ops directly under it are the
ops the model called (`aten::linear`, `aten::layer_norm`, `aten::scaled_dot_product_attention`),
each timed with everything it called inside (CPU time; on a GPU the time of the CUDA kernels it
launched), so their sum is the call's op time without counting anything twice. Their costs come
from the input shapes and dtypes the profiler recorded, through the same counts as a graph's
(`cost.py`); an op whose output shape the inputs do not give is not costed. On a GPU the
breakdown adds the kernels, their count, and the host time spent launching them: a call whose
kernels sum far below its latency is the host's (launch-bound), and the GPU idles meanwhile.
The profile exports as a Chrome trace.

Sits in profile/: imports torch, cost and breakdown; runs any `Session` of the torch runtime.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.profiler import ProfilerActivity, profile, record_function

from mahir.profile.breakdown import (
    WARMUP_RUNS,
    Breakdown,
    GpuTime,
    OpTime,
    median_times,
    time_latency,
    timed,
)
from mahir.profile.cost import OpCost, Tensor, op_cost
from mahir.types import Inputs, Session

MARK = "mahir run "
DTYPES = {
    "float": ("float32", 4), "double": ("float64", 8), "c10::BFloat16": ("bfloat16", 2),
    "c10::Half": ("float16", 2), "long int": ("int64", 8), "int": ("int32", 4),
    "signed char": ("int8", 1), "unsigned char": ("uint8", 1), "bool": ("bool", 1),
    "c10::Float8_e4m3fn": ("float8e4m3fn", 1),
}  # fmt: skip
"""The profiler's dtype names -> numpy's, and bytes per element."""
MATMULS = {"aten::linear", "aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::baddbmm"}
NORMS = {
    "aten::layer_norm": "LayerNormalization", "aten::group_norm": "GroupNormalization",
    "aten::batch_norm": "BatchNormalization", "aten::rms_norm": "RMSNormalization",
    "aten::softmax": "Softmax", "aten::_softmax": "Softmax", "aten::log_softmax": "Softmax",
}  # fmt: skip
"""Ops whose output has their first input's shape, and the graph op they cost as."""
VIEWS = {"aten::view", "aten::reshape", "aten::permute", "aten::transpose", "aten::unsqueeze"}
VIEWS |= {"aten::squeeze", "aten::expand", "aten::select", "aten::slice", "aten::t", "aten::detach"}
POINTWISE = frozenset(
    """add sub mul div gelu relu silu tanh sigmoid erf pow where neg exp log sqrt rsqrt abs clamp
    maximum minimum masked_fill eq ne lt gt le ge logical_and logical_not bitwise_and""".split()
)
"""aten's elementwise ops (in place too: `add_`), costed as one FLOP per output element."""
LAUNCHES = {"cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch"}


def profile_torch(session: Session, batch: Inputs, *, runs: int, seconds: float) -> Breakdown:
    """Profile `runs` calls of a torch `session` on `batch` (after `WARMUP_RUNS` unprofiled),
    then time the same call without the profiler."""
    cuda = session.device.kind == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    for _ in range(WARMUP_RUNS):
        session.run(batch)
    calls = []
    with profile(activities=activities, record_shapes=True) as profiler:
        for i in range(runs):
            with record_function(f"{MARK}{i}"):
                calls.append(timed(session, batch))
    latency = time_latency(session, batch, seconds)
    marks = sorted((e for e in profiler.events() if e.name.startswith(MARK)), key=_start)
    called = [sorted(mark.cpu_children, key=_start) for mark in marks]
    times = median_times([_times(ops, cuda) for ops in called])
    ops = tuple(
        OpTime(name, event.name, times[name], _cost(name, event), str(session.device))
        for name, event in _named(called[-1])
    )
    return Breakdown(
        ops,
        latency,
        statistics.median(calls),
        runs,
        session.describe(),
        trace=_trace(profiler),
        gpu=_gpu(marks) if cuda else None,
    )


def _named(ops: Sequence[Any]) -> Iterator[tuple[str, Any]]:
    """Each op with a name that is the same in every call: its type and its place."""
    for index, event in enumerate(ops):
        yield f"{event.name.removeprefix('aten::')} #{index}", event


def _times(ops: Sequence[Any], cuda: bool) -> dict[str, float]:
    """Seconds of each op of one call: its CUDA kernels' on a GPU, else its CPU time."""
    return {
        name: (event.device_time_total if cuda else event.cpu_time_total) / 1e6
        for name, event in _named(ops)
    }


def _gpu(marks: Sequence[Any]) -> GpuTime:
    """The median call's kernel time, kernel count and launch time."""
    per_call = []
    for mark in marks:
        events = list(_subtree(mark))
        kernel = sum(k.duration for e in events for k in e.kernels) / 1e6
        count = sum(len(e.kernels) for e in events)
        launch = sum(e.cpu_time_total for e in events if e.name in LAUNCHES) / 1e6
        per_call.append((kernel, count, launch))
    kernel, count, launch = (statistics.median(values) for values in zip(*per_call, strict=True))
    return GpuTime(kernel, int(count), launch)


def _subtree(event: Any) -> Iterator[Any]:
    yield event
    for child in event.cpu_children:
        yield from _subtree(child)


def _cost(name: str, event: Any) -> OpCost | None:
    """The op's cost from its recorded inputs, as the graph op it amounts to."""
    if event.name in VIEWS:
        return op_cost(name, "Reshape", [], [])
    inputs = _inputs(event)
    tensors = [t for t in inputs if t is not None]
    if not tensors:
        return None
    first = tensors[0]
    if event.name in MATMULS:
        return _matmul(name, event.name, inputs)
    if event.name in NORMS:
        return op_cost(name, NORMS[event.name], [first, *tensors[1:]], [first])
    if event.name == "aten::scaled_dot_product_attention" and len(tensors) >= 3:
        q, v = tensors[0], tensors[2]
        out = Tensor((*q.shape[:-1], v.shape[-1]), q.dtype, q.itemsize)
        return op_cost(name, "ScaledDotProductAttention", tensors[:3], [out])
    if event.name == "aten::embedding" and len(tensors) == 2:
        table, ids = tensors
        return op_cost(name, "Gather", [table, ids], [_like(table, (*ids.shape, table.shape[-1]))])
    try:
        shape = np.broadcast_shapes(*(t.shape for t in tensors))
    except ValueError:  # inputs that do not broadcast: an op this count does not know
        return None
    pointwise = event.name.removeprefix("aten::").rstrip("_") in POINTWISE
    return op_cost(name, "Add" if pointwise else event.name, tensors, [_like(first, shape)])


def _matmul(name: str, op: str, inputs: list[Tensor | None]) -> OpCost | None:
    """A linear, addmm, (b)mm or matmul as a Gemm (with its bias) or a MatMul."""
    if op == "aten::linear":
        x, weight = inputs[0], inputs[1]
        if x is None or weight is None:
            return None
        transposed = _like(weight, weight.shape[::-1])
        out = _like(x, (*x.shape[:-1], weight.shape[0]))
        return op_cost(name, "Gemm", [x, transposed, *inputs[2:3]], [out])
    bias, (a, b) = (
        (inputs[0], inputs[1:3]) if op in ("aten::addmm", "aten::baddbmm") else (None, inputs[:2])
    )
    if a is None or b is None or len(a.shape) < 2 or len(b.shape) < 2:
        return None
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    out = _like(a, (*batch, a.shape[-2], b.shape[-1]))
    return op_cost(
        name, "Gemm" if bias is not None else "MatMul", [a, b, *([bias] if bias else [])], [out]
    )


def _inputs(event: Any) -> list[Tensor | None]:
    """The op's inputs as tensors (None for a scalar, a list or an absent optional input)."""
    found: list[Tensor | None] = []
    for shape, dtype in zip(event.input_shapes, event.input_dtypes, strict=False):
        known = DTYPES.get(dtype)
        found.append(
            None if known is None or not isinstance(shape, list) else Tensor(tuple(shape), *known)
        )
    return found


def _like(tensor: Tensor, shape: tuple[int, ...]) -> Tensor:
    return Tensor(tuple(int(d) for d in shape), tensor.dtype, tensor.itemsize)


def _start(event: Any) -> float:
    return float(event.time_range.start)


def _trace(profiler: profile) -> list[dict[str, Any]]:
    """The profile's Chrome trace events (torch writes them only to a file)."""
    with tempfile.TemporaryDirectory(prefix="mahir-trace-") as folder:
        path = Path(folder) / "trace.json"
        profiler.export_chrome_trace(str(path))
        events: list[dict[str, Any]] = json.loads(path.read_text()).get("traceEvents", [])
    return events
