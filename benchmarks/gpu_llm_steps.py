"""Where mahir's compiled decode step spends its time on a GPU, at batch 1 and at batch 32.

SmolLM2-135M's shape with random weights (`gpu_llm.SHAPES`), bf16, `TorchGenerator` as
`torch-compile-bf16` opens it on a GPU (static cache, max-autotune, CUDA graphs), 128-token
prompts. Per-step time: a call of 128 new tokens less a call of 1 (the prefill), over 127 steps,
medians of 3. Then torch.profiler's table for one call of 17 tokens (prefill and 16 steps), by
GPU time: which kernels the steps are made of.

Usage: python -m benchmarks.gpu_llm_steps [--models smollm2-135m] [--batches 1 32] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

from benchmarks import gpu
from benchmarks.gpu_llm import SHAPES, prompts
from mahir.families.decoder import DECODER_SPEC
from mahir.generation import Sampling
from mahir.runtimes.torch_generator import TorchEngineOptions, TorchGenerator, open_generator
from mahir.types import Artifact, Device


def seconds(call: Callable[[], Any], times: int = 3) -> float:
    """The median of `times` synchronised calls."""
    taken = []
    for _ in range(times):
        torch.cuda.synchronize()
        started = time.perf_counter()
        call()
        torch.cuda.synchronize()
        taken.append(time.perf_counter() - started)
    return statistics.median(taken)


def generate(generator: TorchGenerator, batch: list[list[int]], new: int) -> list[list[int]]:
    sampling = Sampling(max_new_tokens=new)
    if len(batch) == 1:
        return [list(generator.stream(batch[0], sampling))]
    return generator.generate_batch(batch, sampling)


def profile_table(call: Callable[[], Any]) -> str:
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profiler:
        call()
        torch.cuda.synchronize()
    averages = profiler.key_averages()
    return str(averages.table(sort_by="device_time_total", row_limit=25, max_name_column_width=90))


def run_model(name: str, sizes: list[int]) -> dict[str, Any]:
    config = transformers.LlamaConfig(**SHAPES[name])
    torch.manual_seed(0)
    with torch.device("cuda"):
        module = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    options = TorchEngineOptions(
        precision="bf16", compile=True, device=Device.parse("cuda"), max_cache_len=256
    )
    started = time.perf_counter()
    generator = open_generator(Artifact("torch", DECODER_SPEC, module=module), options)
    result: dict[str, Any] = {"model": name, "compile_s": time.perf_counter() - started}
    for size in sizes:
        batch = prompts(size, 128, config.vocab_size, seed=size)
        started = time.perf_counter()
        generate(generator, batch, 4)  # compiles and captures this batch size's step
        warm = time.perf_counter() - started
        one = seconds(lambda b=batch: generate(generator, b, 1))
        whole = seconds(lambda b=batch: generate(generator, b, 128))
        result[f"batch_{size}"] = {
            "warm_s": warm,
            "prefill_ms": one * 1e3,
            "step_ms": (whole - one) / 127 * 1e3,
            "tokens_per_s": size * 128 / whole,
            "profile": profile_table(lambda b=batch: generate(generator, b, 17)),
        }
        print(json.dumps({k: v for k, v in result[f"batch_{size}"].items() if k != "profile"}))
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="*", default=["smollm2-135m"])
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 32])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = [run_model(name, args.batches) for name in args.models]
    if args.out:
        args.out.write_text(json.dumps(gpu.result(results), indent=2) + "\n")


if __name__ == "__main__":
    main()
