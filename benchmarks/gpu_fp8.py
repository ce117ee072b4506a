"""fp8 matmuls for a big encoder batch on a GPU: which of torchao's scalings pays, and how much.

BERT-base (random weights) at 256 sequences x 128 tokens, bf16, every token real (the mask of
ones passed, as mahir's sessions pass it): eager, then torch.compile with CUDA graphs
("reduce-overhead") in bf16 and with torchao's fp8 (e4m3) weights and dynamic activations
scaled per row (mahir's `TorchaoFloat8`), per tensor, and per tensor in the feed-forward layers
only (two thirds of the matmul work); then with static activation scales, per tensor, observed
on another batch of the same shape (torchao's prototype observer flow: no scale computed while
it runs, so no pass over each activation before its matmul). Each variant's mean-pooled output
against the fp32 model's (cosine, mean and worst of the 256), then all of them timed in turns by
CUDA events (`gpu_attention.gpu_ms`), 20 calls a turn, 5 turns; medians, and each against eager.

Also timed: static fp8 and bf16 compiled with "max-autotune", and both with the all-ones mask
left out (slower: the compiled model then takes another attention path).

`--profile` adds each variant's CUDA kernels of one call by kind (matmuls, attention, Triton's
fused kernels, the rest) and its slowest kernels, from torch.profiler: where a variant's time goes.

Usage: python -m benchmarks.gpu_fp8 [--only VARIANT ...] [--profile] [--out results.json]
(torchao importable; `--only` times those variants and eager bf16)
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

from benchmarks import gpu
from benchmarks.gpu_attention import gpu_ms
from mahir.fused_qkv import FusedSelfAttention

BATCH, TOKENS, ROUNDS, CALLS = 256, 128, 5, 20


def fp8(model: torch.nn.Module, granularity: Any, ffn_only: bool = False) -> torch.nn.Module:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_

    config = Float8DynamicActivationFloat8WeightConfig(granularity=granularity)
    quantize_(model, config, filter_fn=_feed_forward if ffn_only else None)
    return model


def fp8_static(
    model: torch.nn.Module, calibration: tuple[torch.Tensor, torch.Tensor], ffn_only: bool = False
) -> torch.nn.Module:
    """fp8 weights and activations, each linear's activation scale observed on `calibration`."""
    from torchao.prototype.quantization.quant_api import (
        Float8StaticActivationFloat8WeightConfig as Static,
    )
    from torchao.quantization import PerTensor, quantize_

    chosen = _feed_forward if ffn_only else None
    quantize_(model, Static(step="prepare", granularity=PerTensor()), filter_fn=chosen)
    ids, mask = calibration
    model(input_ids=ids, attention_mask=mask)
    quantize_(model, Static(step="convert", granularity=PerTensor()), filter_fn=chosen)
    return model


def fuse_qkv(model: torch.nn.Module) -> torch.nn.Module:
    """mahir's `FuseQKV` on each layer (query, key and value as one matmul)."""
    for layer in model.encoder.layer:  # type: ignore[union-attr]
        layer.attention.self = FusedSelfAttention(layer.attention.self)
    return model


def _feed_forward(layer: torch.nn.Module, name: str) -> bool:
    output = name.endswith("output.dense") and "attention" not in name
    return isinstance(layer, torch.nn.Linear) and ("intermediate" in name or output)


Call = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def variants(
    fp32: torch.nn.Module, calibration: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, Call]:
    from torchao.quantization import PerRow, PerTensor

    def bf16() -> torch.nn.Module:
        return copy.deepcopy(fp32).to(torch.bfloat16)

    def run(model: torch.nn.Module, masked: bool = True) -> Call:
        return lambda ids, mask: (
            model(input_ids=ids, attention_mask=mask if masked else None).last_hidden_state
        )

    def compiled(
        model: torch.nn.Module, mode: str = "reduce-overhead", masked: bool = True
    ) -> Call:
        return torch.compile(run(model, masked), mode=mode)

    def frozen(model: torch.nn.Module) -> Call:
        """Compiled with the weights as constants (inductor's freezing), in CUDA graphs."""
        options = {"freezing": True, "triton.cudagraphs": True}
        return torch.compile(run(model), options=options)

    return {
        "eager bf16": run(bf16()),
        "compiled bf16": compiled(bf16()),
        "compiled fp8 per row": compiled(fp8(bf16(), PerRow())),
        "compiled fp8 per tensor": compiled(fp8(bf16(), PerTensor())),
        "compiled fp8 per tensor, feed-forward only": compiled(fp8(bf16(), PerTensor(), True)),
        "compiled fp8 static per tensor": compiled(fp8_static(bf16(), calibration)),
        "compiled fp8 static per tensor, feed-forward only": compiled(
            fp8_static(bf16(), calibration, True)
        ),
        "compiled fp8 static per tensor, max-autotune": compiled(
            fp8_static(bf16(), calibration), "max-autotune"
        ),
        "compiled bf16, max-autotune": compiled(bf16(), "max-autotune"),
        "compiled bf16, no mask": compiled(bf16(), masked=False),
        "compiled fp8 static per tensor, no mask": compiled(
            fp8_static(bf16(), calibration), masked=False
        ),
        "compiled bf16, fused qkv": compiled(fuse_qkv(bf16())),
        "compiled fp8 static per tensor, fused qkv": compiled(
            fp8_static(fuse_qkv(bf16()), calibration)
        ),
        "compiled fp8 static per tensor, fused qkv, no mask": compiled(
            fp8_static(fuse_qkv(bf16()), calibration), masked=False
        ),
        "compiled bf16, freezing": frozen(bf16()),
        "compiled fp8 static per tensor, freezing": frozen(fp8_static(bf16(), calibration)),
    }


KINDS = (
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "scaled_mm")),
    ("attention", ("fmha", "flash", "attention", "cudnn", "sdpa")),
    ("triton", ("triton",)),
)


def kernels(call: Callable[[], Any], calls: int = 5) -> dict[str, Any]:
    """One call's CUDA kernel time by kind, and its ten slowest kernels (ms a call)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    by_name: collections.Counter[str] = collections.Counter()
    for event in trace.key_averages():
        if event.device_type == DeviceType.CUDA and event.self_device_time_total > 0:
            by_name[event.key] += event.self_device_time_total / 1e3 / calls
    by_kind: collections.Counter[str] = collections.Counter()
    for name, ms in by_name.items():
        lowered = name.lower()
        kind = next((k for k, marks in KINDS if any(m in lowered for m in marks)), "other")
        by_kind[kind] += ms
    return {
        "kernel_ms": sum(by_name.values()),
        "by_kind_ms": dict(by_kind.most_common()),
        "slowest": [[name[:120], ms] for name, ms in by_name.most_common(10)],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    parser.add_argument("--only", nargs="*", help="these variants (and eager bf16) alone")
    parser.add_argument("--profile", action="store_true", help="each variant's kernels too")
    args = parser.parse_args()
    config = transformers.BertConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
    )
    torch.manual_seed(0)
    fp32 = transformers.BertModel(config, add_pooling_layer=False).eval().cuda()
    ids = torch.randint(1000, 30000, (BATCH, TOKENS), device="cuda")
    mask = torch.ones_like(ids)
    rows: dict[str, dict[str, Any]] = {}
    with torch.inference_mode():
        want = fp32(input_ids=ids, attention_mask=mask).last_hidden_state.mean(1)
        other = torch.randint(1000, 30000, (BATCH, TOKENS), device="cuda")
        calls = variants(fp32, (other, mask))
        if args.only:
            calls = {n: c for n, c in calls.items() if n == "eager bf16" or n in args.only}
        for name, call in calls.items():
            started = time.perf_counter()
            for _ in range(3):  # compiles and captures
                got = call(ids, mask)
            torch.cuda.synchronize()
            cosine = torch.nn.functional.cosine_similarity(got.float().mean(1), want, dim=-1)
            rows[name] = {
                "variant": name,
                "warm_s": time.perf_counter() - started,
                "cosine_mean": cosine.mean().item(),
                "cosine_min": cosine.min().item(),
                "ms": [],
            }
        names = list(calls)
        for turn in range(ROUNDS):
            for name in names[turn % len(names) :] + names[: turn % len(names)]:
                ms = gpu_ms(lambda n=name: calls[n](ids, mask), CALLS)
                rows[name]["ms"].append(ms)
        if args.profile:
            for name in names:
                rows[name]["kernels"] = kernels(lambda n=name: calls[n](ids, mask))
    eager = statistics.median(rows["eager bf16"]["ms"])
    for row in rows.values():
        row["p50_ms"] = statistics.median(row["ms"])
        row["sequences_per_s"] = BATCH / row["p50_ms"] * 1e3
        row["vs_eager_bf16"] = eager / row["p50_ms"]
        print(json.dumps({k: v for k, v in row.items() if k != "ms"}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(gpu.result(list(rows.values())), indent=2) + "\n")


if __name__ == "__main__":
    main()
