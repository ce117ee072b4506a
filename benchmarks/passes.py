"""Every pass on the default model: latency at batch 1 and 32, speedup over PyTorch eager fp32,
sentence-embedding fidelity. All variants are built first, then timed interleaved in one run.

    python benchmarks/passes.py [--seconds 5] [--json FILE] [--only NAME ...]

Workloads: batch 1 on sentences of 64-128 tokens, batch 1 on short-skewed generated sentences,
and batch 32 on short-skewed sentences. Fidelity is measured on held-out batches (not the
calibration ones) plus mahir's three verification shapes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from mahir.export.conversions import convert
from mahir.hardware import detect
from mahir.measure import MeasureConfig, measure
from mahir.model import load_model
from mahir.passes import PassContext, apply_steps
from mahir.passes.conversion import OpenVinoDirect
from mahir.passes.fallback import AccuracyAwareInt8
from mahir.passes.graph import OrtOptimize, TransformerFusion
from mahir.passes.nncf import NncfInt8
from mahir.passes.precision import Float16, TorchLowPrecision
from mahir.passes.prune import MagnitudePrune
from mahir.passes.prune_transformer import TransformerPrune
from mahir.passes.quantize import DynamicInt8, StaticInt8
from mahir.passes.torchao import Pt2eInt8, TorchaoInt8
from mahir.quality import fidelity
from mahir.runtimes import RUNTIMES, open_session, reference_outputs
from mahir.types import OpenVinoOptions, RuntimeOptions, Session

BF16 = RuntimeOptions(openvino=OpenVinoOptions(precision="bf16"))
DEFAULT = RuntimeOptions(
    openvino=OpenVinoOptions(precision=None)
)  # OpenVINO picks: bf16 where the CPU has it
# name -> (steps, runtime, options)
VARIANTS: dict[str, tuple[tuple[Any, ...], str, RuntimeOptions]] = {
    "torch fp32 (baseline)": ((), "torch", RuntimeOptions()),
    "torch bf16": ((TorchLowPrecision("bfloat16"),), "torch", RuntimeOptions()),
    "torch-compile fp32": ((), "torch-compile", RuntimeOptions()),
    "torch torchao int8 dynamic": ((TorchaoInt8(),), "torch", RuntimeOptions()),
    "torch-compile torchao int8 dynamic": ((TorchaoInt8(),), "torch-compile", RuntimeOptions()),
    "torch-compile torchao int8 weight-only": (
        (TorchaoInt8(weight_only=True),),
        "torch-compile",
        RuntimeOptions(),
    ),
    # int8 kernels only with inductor freezing (TORCHINDUCTOR_FREEZING=1); float linears without
    "torch-compile pt2e static int8": ((Pt2eInt8(),), "torch-compile", RuntimeOptions()),
    "onnxruntime fp32": ((), "onnxruntime", RuntimeOptions()),
    "onnxruntime extended graph": ((OrtOptimize("extended"),), "onnxruntime", RuntimeOptions()),
    "onnxruntime fused": ((TransformerFusion(),), "onnxruntime", RuntimeOptions()),
    "onnxruntime fp16": ((Float16(),), "onnxruntime", RuntimeOptions()),
    "onnxruntime dynamic int8 per-tensor": ((DynamicInt8(),), "onnxruntime", RuntimeOptions()),
    "onnxruntime dynamic int8 per-channel": (
        (DynamicInt8(per_channel=True),),
        "onnxruntime",
        RuntimeOptions(),
    ),
    "onnxruntime fused + dynamic int8": (
        (TransformerFusion(), DynamicInt8(per_channel=True)),
        "onnxruntime",
        RuntimeOptions(),
    ),
    "onnxruntime static int8": ((StaticInt8(),), "onnxruntime", RuntimeOptions()),
    "onnxruntime accuracy-aware int8": ((AccuracyAwareInt8(),), "onnxruntime", RuntimeOptions()),
    "openvino fp32": ((), "openvino", RuntimeOptions()),
    "openvino default precision": ((), "openvino", DEFAULT),
    "openvino bf16": ((), "openvino", BF16),
    "openvino static int8 (QDQ)": ((StaticInt8(),), "openvino", RuntimeOptions()),
    "openvino nncf int8": ((NncfInt8(),), "openvino", RuntimeOptions()),
    "openvino nncf int8, default precision rest": ((NncfInt8(),), "openvino", DEFAULT),
    "openvino direct fp32": ((OpenVinoDirect(),), "openvino", RuntimeOptions()),
    "openvino direct default precision": ((OpenVinoDirect(),), "openvino", DEFAULT),
    "openvino direct nncf int8": ((OpenVinoDirect(), NncfInt8()), "openvino", RuntimeOptions()),
    "openvino direct nncf int8, default precision rest": (
        (OpenVinoDirect(), NncfInt8()),
        "openvino",
        DEFAULT,
    ),
    "openvino pruned 30% heads+ffn": (
        (TransformerPrune(head_ratio=0.3, ffn_ratio=0.3),),
        "openvino",
        RuntimeOptions(),
    ),
    "onnxruntime 50% unstructured": (
        (MagnitudePrune(sparsity=0.5),),
        "onnxruntime",
        RuntimeOptions(),
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    chosen = {k: v for k, v in VARIANTS.items() if not args.only or k in args.only}

    model = load_model()
    machine = detect(gpus=False)
    calibration = tuple(model.family.workload([8], batches_per_size=8, seed=1).batches[8])
    held_out = model.family.workload([8], batches_per_size=4, seed=2).batches[8]
    held_out += model.family.verification_batches()
    reference = reference_outputs(model, held_out)
    workloads = {
        "b1 64-128 tok": model.family.workload([1], batches_per_size=16, token_range=(64, 128)),
        "b1 mixed": model.family.workload([1], batches_per_size=16, seed=3),
        "b32 mixed": model.family.workload([32], batches_per_size=4, seed=4),
    }

    sessions: dict[str, Session] = {}
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, (steps, runtime, options)) in enumerate(chosen.items()):
            ctx = PassContext(model, Path(tmp) / str(index), calibration, machine)
            try:
                artifact = apply_steps(model.original(), steps, ctx)
                artifact = convert(
                    model, artifact, RUNTIMES[runtime].formats, ctx.workdir / "input"
                )
                session = open_session(runtime, artifact, options)
            except Exception as err:  # a benchmark reports failures and goes on
                print(f"{name}: skipped ({type(err).__name__}: {err})")
                continue
            quality = fidelity(model, session, held_out, reference).headline
            sessions[name] = session
            rows[name] = {
                "runtime": runtime,
                "settings": session.describe(),
                "cosine_mean": quality.cosine_mean,
                "cosine_min": quality.cosine_min,
            }
            print(f"built {name}: cosine {quality.cosine_mean:.4f} / {quality.cosine_min:.4f}")
        for label, workload in workloads.items():
            (size,) = workload.batches
            perfs = measure(
                sessions, workload.batches[size], MeasureConfig(min_time_s=args.seconds)
            )
            base = perfs["torch fp32 (baseline)"].p50_ms
            for name, perf in perfs.items():
                rows[name][label] = {
                    "p50_ms": perf.p50_ms,
                    "p99_ms": perf.p99_ms,
                    "throughput": perf.throughput,
                    "speedup": base / perf.p50_ms,
                    "noisy": perf.noisy,
                }

    print(f"\nmachine: {machine.summary()}")
    header = "| variant | " + " | ".join(f"{w} p50 ms (speedup)" for w in workloads)
    print(header + " | cosine mean / worst |")
    print("|---" * (len(workloads) + 2) + "|")
    for name, row in rows.items():
        cells = [
            f"{row[w]['p50_ms']:.2f} ({row[w]['speedup']:.2f}x){'~' if row[w]['noisy'] else ''}"
            for w in workloads
        ]
        fid = f"{row['cosine_mean']:.4f} / {row['cosine_min']:.4f}"
        print(f"| {name} | " + " | ".join(cells) + f" | {fid} |")
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine.to_dict(), "rows": rows}, indent=2, default=str) + "\n"
        )


if __name__ == "__main__":
    main()
