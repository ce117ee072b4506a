"""Which attention kernel a padded BERT-base batch runs on a GPU, and what each costs.

One layer's attention (bf16, 256 sequences x 12 heads x 128 tokens x 64, 32-128 real tokens a
row) in each of PyTorch's kernels that takes it, by CUDA events; then the whole BERT-base forward
on that batch (random weights, last hidden state, no CUDA graph), eager and under torch.compile,
with PyTorch's own kernel order and with cuDNN first, naming the attention kernel the profiler
saw; and torch.compile with static shapes, default and max-autotune (matmul templates).

Usage: python -m benchmarks.gpu_attention [--out results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks import gpu

BATCH, TOKENS, HEADS, HEAD = 256, 128, 12, 64
PYTORCH_ORDER = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, *PYTORCH_ORDER]
ATTENTION_NAMES = ("fmha", "attention", "cudnn", "flash")


def gpu_ms(call: Callable[[], Any], runs: int = 20) -> float:
    for _ in range(3):
        call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(runs):
        call()
    end.record()
    torch.cuda.synchronize()
    return float(start.elapsed_time(end)) / runs


def one_layer(padding: torch.Tensor) -> list[dict[str, Any]]:
    q = torch.randn(BATCH, HEADS, TOKENS, HEAD, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    mask = padding[:, None, None, :]
    rows = []
    for name, backend, attn_mask in [
        ("flash, no mask", SDPBackend.FLASH_ATTENTION, None),
        ("cudnn, no mask", SDPBackend.CUDNN_ATTENTION, None),
        ("memory-efficient, mask", SDPBackend.EFFICIENT_ATTENTION, mask),
        ("cudnn, mask", SDPBackend.CUDNN_ATTENTION, mask),
        ("math, mask", SDPBackend.MATH, mask),
    ]:
        with sdpa_kernel([backend]):
            ms = gpu_ms(
                lambda m=attn_mask: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=m
                )
            )
        rows.append({"attention, one layer": name, "ms": ms})
    return rows


def attention_kernels(call: Callable[[], Any]) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        call()
        torch.cuda.synchronize()
    names = {event.key for event in profiler.key_averages()}
    return sorted(n[:90] for n in names if any(a in n.lower() for a in ATTENTION_NAMES))


def whole_forward(padding: torch.Tensor) -> list[dict[str, Any]]:
    config = transformers.BertConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
    )
    bert = transformers.BertModel(config, add_pooling_layer=False).eval()
    bert = bert.to(device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(1000, 30000, (BATCH, TOKENS), device="cuda")
    mask = padding.long()

    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    rows = []
    variants: list[tuple[str, Any, Callable[[], Any]]] = []
    orders = (("PyTorch's order", PYTORCH_ORDER, False), ("cuDNN first", CUDNN_FIRST, True))
    for order_name, order, priority in orders:
        context = functools.partial(sdpa_kernel, order, set_priority=priority)
        variants.append((f"eager, {order_name}", forward, context))
        dynamic = torch.compile(forward, dynamic=True)
        variants.append((f"compiled, dynamic, {order_name}", dynamic, context))
    for mode in ("default", "max-autotune-no-cudagraphs"):
        compiled = torch.compile(forward, dynamic=False, mode=None if mode == "default" else mode)
        variants.append((f"compiled, static shapes, {mode}", compiled, contextlib.nullcontext))
    for name, call, context in variants:
        torch._dynamo.reset()
        started = time.perf_counter()
        with torch.inference_mode(), context():
            call(ids, mask)
            warm = time.perf_counter() - started
            ms = gpu_ms(lambda c=call: c(ids, mask))
            kernels = attention_kernels(lambda c=call: c(ids, mask))
        rows.append({"forward": name, "ms": ms, "first_call_s": warm, "attention_kernels": kernels})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    lengths = torch.randint(32, TOKENS + 1, (BATCH,), device="cuda")
    padding = torch.arange(TOKENS, device="cuda")[None] < lengths[:, None]
    rows = one_layer(padding)
    for row in rows:
        print(json.dumps(row), flush=True)
    rows += whole_forward(padding)
    if args.out:
        args.out.write_text(json.dumps(gpu.result(rows), indent=2) + "\n")


if __name__ == "__main__":
    main()
