"""How fast a decode step's matmuls read their weights on a GPU, at 1 and at 32 rows.

A decode step multiplies a few rows (one per sequence) by every weight matrix, so it is bound by
reading the weights, not by arithmetic. This times each projection of a ~1B Llama's shape
(`gpu_llm.SHAPES["llama-1b"]`: merged q/k/v, o, merged gate/up, gate alone, down, lm_head), in
bf16, L2-cold (the calls rotate over copies of the weight that together exceed three L2
caches), as one CUDA graph of 30 calls, medians of 7 replays; and reports the best variant's
read rate against the weights-read floor at 3.35 TB/s (the H100 SXM datasheet's HBM3 rate):
- `linear`: `F.linear`, what `nn.Linear` and a compiled step without autotuning run (cuBLAS);
- `swapped`: the same product as weight @ rows.T, which cuBLAS may tile differently;
- `splitk2/4/8`: K split into s slices as one batched matmul, then summed: s times the blocks
  for the GPU's SMs to share, the way split-K kernels spread a skinny product.

Usage: python -m benchmarks.gpu_skinny_matmuls [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks import gpu
from benchmarks.gpu_llm import SHAPES

HBM_BYTES_PER_S = 3.35e12
Product = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def projections(shape: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) features of each weight a decode step reads, q/k/v and gate/up merged as a
    compiled step with frozen weights merges them."""
    hidden, inner = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * hidden // shape["num_attention_heads"]
    return {
        "qkv": (hidden, hidden + 2 * kv),
        "o": (hidden, hidden),
        "gate_up": (hidden, 2 * inner),
        "gate": (hidden, inner),
        "down": (inner, hidden),
        "lm_head": (hidden, shape["vocab_size"]),
    }


def split_k(slices: int) -> Product:
    def product(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        count, width = rows.shape
        parts = rows.view(count, slices, width // slices).transpose(0, 1)
        blocks = weight.view(weight.shape[0], slices, width // slices).transpose(0, 1)
        return torch.bmm(parts, blocks.transpose(1, 2)).sum(0)

    return product


VARIANTS: dict[str, Product] = {
    "linear": lambda rows, weight: torch.nn.functional.linear(rows, weight),
    "swapped": lambda rows, weight: (weight @ rows.T).T,
    "splitk2": split_k(2),
    "splitk4": split_k(4),
    "splitk8": split_k(8),
}


def cold_us(product: Product, weights: list[torch.Tensor], rows: torch.Tensor) -> float:
    """Microseconds per call: a CUDA graph of 30 calls over the rotating weights, replayed."""
    calls = 30
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (cuBLAS workspaces) off the capturing stream
        for k in range(3):
            product(rows, weights[k % len(weights)])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for k in range(calls):
            product(rows, weights[k % len(weights)])
    times = []
    for _ in range(7):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def run() -> list[dict[str, Any]]:
    l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size
    rows_out = []
    for name, (width, out) in projections(SHAPES["llama-1b"]).items():
        size = width * out * 2
        copies = max(2, 3 * l2_bytes // size + 1)
        weights = [
            torch.randn(out, width, device="cuda", dtype=torch.bfloat16) / width**0.5
            for _ in range(copies)
        ]
        for count in (1, 32):
            rows = torch.randn(count, width, device="cuda", dtype=torch.bfloat16)
            us = {variant: cold_us(p, weights, rows) for variant, p in VARIANTS.items()}
            best = min(us, key=us.__getitem__)
            row = {
                "projection": name,
                "rows": count,
                "in": width,
                "out": out,
                "us": {variant: round(t, 2) for variant, t in us.items()},
                "best": best,
                "best_tb_per_s": size / us[best] / 1e6,
                "floor_us": size / HBM_BYTES_PER_S * 1e6,
            }
            print(json.dumps(row), flush=True)
            rows_out.append(row)
        del weights
    return rows_out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = run()
    if args.out:
        args.out.write_text(json.dumps(gpu.result(rows), indent=2) + "\n")


if __name__ == "__main__":
    main()
