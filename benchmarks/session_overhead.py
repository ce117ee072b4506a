"""What mahir's `Session` wrapper costs over calling each runtime directly, at batch 1.

Both sides get the same artifact, threads and settings, and the same batches; they are timed
interleaved in one run by `mahir.measure`, so drift hits both alike. The direct side is the
runtime's own call in a lambda (one Python frame, ~0.1 us, far below what is measured).
Target: session p50 / direct p50 <= 1.03.

    python benchmarks/session_overhead.py [--seconds 10] [--tokens 64-128]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mahir.export.onnx import export_onnx, export_openvino
from mahir.hardware import detect, physical_cores
from mahir.measure import MeasureConfig, measure
from mahir.model import load_model
from mahir.runtimes import open_session
from mahir.types import CPU, Inputs, Outputs, RuntimeOptions

TARGET_RATIO = 1.03


class Direct:
    """The runtime's own call, shaped like a Session only so `measure` can time it."""

    device = CPU

    def __init__(self, runtime: str, call: Callable[[Inputs], Any]) -> None:
        self.runtime = runtime
        self.run: Callable[[Inputs], Outputs] = call

    def describe(self) -> dict[str, Any]:
        return {}


def direct_onnxruntime(path: Path, threads: int) -> Direct:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Direct("onnxruntime", lambda batch: session.run(None, dict(batch)))


def direct_openvino(path: Path, threads: int) -> Direct:
    import openvino as ov

    compiled = ov.Core().compile_model(
        str(path),
        "CPU",
        {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",
            "INFERENCE_NUM_THREADS": threads,
        },
    )
    request = compiled.create_infer_request()
    return Direct("openvino", lambda batch: request.infer(dict(batch)))


def direct_torch(module: torch.nn.Module) -> Direct:
    def call(batch: Inputs) -> Any:
        with torch.inference_mode():
            return module(**{k: torch.from_numpy(v) for k, v in batch.items()})

    return Direct("torch", call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--tokens", default="64-128")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    low, high = (int(x) for x in args.tokens.split("-"))

    model = load_model()
    threads = physical_cores()
    torch.set_num_threads(threads)
    options = RuntimeOptions(threads=threads)
    workload = model.family.workload([1], batches_per_size=16, token_range=(low, high))
    batches = workload.batches[1]
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, ir_path = Path(tmp) / "model.onnx", Path(tmp) / "ov" / "model.xml"
        onnx = export_onnx(model, onnx_path)
        ir = export_openvino(model, onnx, ir_path)
        sessions = {
            "torch/session": open_session("torch", model.original(), options),
            "torch/direct": direct_torch(model.module),
            "onnxruntime/session": open_session("onnxruntime", onnx, options),
            "onnxruntime/direct": direct_onnxruntime(onnx_path, threads),
            "openvino/session": open_session("openvino", ir, options),
            "openvino/direct": direct_openvino(ir_path, threads),
        }
        perfs = measure(sessions, batches, MeasureConfig(min_time_s=args.seconds))

    machine = detect(gpus=False)
    print(f"machine: {machine.summary()}")
    print(f"workload: batch 1, {low}-{high} tokens, {len(batches)} distinct batches")
    results = {}
    for runtime in ("torch", "onnxruntime", "openvino"):
        wrapped, direct = perfs[f"{runtime}/session"], perfs[f"{runtime}/direct"]
        ratio = wrapped.p50_ms / direct.p50_ms
        results[runtime] = {
            "session_p50_ms": wrapped.p50_ms,
            "direct_p50_ms": direct.p50_ms,
            "ratio": ratio,
            "noisy": wrapped.noisy or direct.noisy,
        }
        print(
            f"{runtime:12s} session {wrapped.p50_ms:7.3f} ms  direct {direct.p50_ms:7.3f} ms  "
            f"ratio {ratio:.3f}{'  (noisy)' if results[runtime]['noisy'] else ''}"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine.to_dict(), "results": results}, indent=2) + "\n"
        )
    missed = [r for r, v in results.items() if v["ratio"] > TARGET_RATIO]
    print(f"target <= {TARGET_RATIO}: " + (f"missed by {', '.join(missed)}" if missed else "met"))


if __name__ == "__main__":
    main()
