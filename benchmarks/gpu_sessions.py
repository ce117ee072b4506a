"""PyTorch eager on a CUDA GPU through mahir's session and measure (CUDA events), against the
fp32 original on the CPU: latency by batch size and precision, and fidelity to the original.

Random weights in all-MiniLM-L6-v2's and BERT-base's shapes (only speed is measured; the
fidelity columns say the GPU and low-precision copies still answer as the fp32 original does).
Usage: python benchmarks/gpu_sessions.py [--out results.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from typing import Any

import numpy as np
import torch
import transformers

from mahir.measure import MeasureConfig, measure
from mahir.modules import LowPrecision, TupleOutputs
from mahir.quality import compare
from mahir.runtimes import open_session
from mahir.types import BATCH, SEQUENCE, Artifact, Device, InputSpec, RuntimeOptions, TensorSpec

SHAPES = {
    "minilm": dict(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    ),
    "bert-base": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
    ),
}
SPEC = InputSpec(
    tuple(TensorSpec(n, "int64", (BATCH, SEQUENCE)) for n in ("input_ids", "attention_mask")),
    ("last_hidden_state",),
)
CONFIG = MeasureConfig(warmup_runs=5, min_time_s=1.0, min_runs=20, round_time_s=0.25)


def batch(size: int, tokens: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "input_ids": rng.integers(1000, 30000, (size, tokens)).astype(np.int64),
        "attention_mask": np.ones((size, tokens), np.int64),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    gpu = Device.parse("cuda")
    rows: list[dict[str, Any]] = []
    for name, shape in SHAPES.items():
        torch.manual_seed(0)
        bert = transformers.BertModel(transformers.BertConfig(**shape)).eval()
        original = TupleOutputs(bert, SPEC.outputs).eval()
        variants = {
            "fp32": original,
            "fp16": LowPrecision(copy.deepcopy(original), torch.float16).eval(),
            "bf16": LowPrecision(copy.deepcopy(original), torch.bfloat16).eval(),
        }
        reference = open_session("torch", Artifact("torch", SPEC, module=original))
        sessions = {
            f"cuda {precision}": open_session(
                "torch", Artifact("torch", SPEC, module=module), RuntimeOptions(device=gpu)
            )
            for precision, module in variants.items()
        }
        rng = np.random.default_rng(0)
        for size, tokens in ((1, 16), (1, 128), (32, 128), (256, 128)):
            batches = [batch(size, tokens, rng) for _ in range(4)]
            expected = [reference.run(b) for b in batches[:2]]
            perfs = measure(sessions, batches, CONFIG)
            cpu = measure({"cpu fp32": reference}, batches[:2], CONFIG) if size <= 32 else {}
            for label, perf in {**cpu, **perfs}.items():
                session = sessions.get(label, reference)
                quality = compare([session.run(b) for b in batches[:2]], expected)
                fidelity = quality.outputs["last_hidden_state"]
                rows.append(
                    {
                        "model": name,
                        "session": label,
                        "batch": size,
                        "tokens": tokens,
                        "device": perf.device,
                        "p50_ms": round(perf.p50_ms, 4),
                        "p99_ms": round(perf.p99_ms, 4),
                        "seq_per_s": round(perf.throughput, 1),
                        "cosine_min": round(fidelity.cosine_min, 6),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    info = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(info, f, indent=1)
    print(info["gpu"], info["torch"], file=sys.stderr)


if __name__ == "__main__":
    main()
