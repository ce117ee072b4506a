"""mahir's PyTorch LLM engine on a GPU against transformers' own `generate` on the same GPU.

Two decoder shapes with random weights (only speed is measured; greedy agreement is checked
against the same weights' bf16 eager `generate`): SmolLM2-135M's and a ~1B Llama's
(TinyLlama-1.1B's). Everything in bf16. Workload: prompts of `--prompt` random token ids, then
`--new` new tokens, stop tokens ignored, at each of `--batches` (1 and 32 by default; prompts of
one length, so neither side pads).

- anchor: `generate` with `cache_implementation="static"`, which compiles the decode step
  (transformers' own compile config: mode "reduce-overhead", CUDA graphs) on first use;
- mahir: `TorchGenerator` (`runtimes/torch_generator.py`), static cache sized to the work and
  the decode step compiled with mode "reduce-overhead"; `stream` at batch 1, `generate_batch`
  at batch N.

Per-token latency at batch 1: (time for `new` tokens - time for 1 token) / (new - 1), so the
prefill drops out; throughput at batch N: N x new tokens over the whole call. Both sides run in
the same rounds, alternating who goes first, each call synchronised; medians are reported, with
the floor of reading the weights once per token at the GPU's measured copy bandwidth.

Usage: python -m benchmarks.gpu_llm [--models smollm2-135m llama-1b] [--batches 1 32]
       [--out results.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from benchmarks import gpu
from mahir.families.decoder import DECODER_SPEC
from mahir.generation import Sampling
from mahir.runtimes.torch_generator import TorchEngineOptions, TorchGenerator, open_generator
from mahir.types import Artifact, Device

GPU = Device.parse("cuda")
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        rope_theta=100000.0, tie_word_embeddings=True,
    ),
    "llama-1b": dict(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
}  # fmt: skip
Call = Callable[[], Any]


def prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, vocab, size=length).tolist() for _ in range(count)]


def hf_generate(model: Any, batch: list[list[int]], new: int) -> list[list[int]]:
    """transformers' `generate`, greedy, exactly `new` tokens per row."""
    ids = torch.tensor(batch, device="cuda")
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
    )
    torch.cuda.synchronize()
    return [row[len(batch[0]) :] for row in out.tolist()]


def mahir_generate(generator: TorchGenerator, batch: list[list[int]], new: int) -> list[list[int]]:
    sampling = Sampling(max_new_tokens=new)
    if len(batch) == 1:
        tokens = [list(generator.stream(batch[0], sampling))]
    else:
        tokens = generator.generate_batch(batch, sampling)
    torch.cuda.synchronize()
    return tokens


def timed(calls: dict[str, Call], rounds: int) -> dict[str, list[float]]:
    """Seconds per call, every call once per round, the order rotating each round."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            torch.cuda.synchronize()
            started = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - started)
    return times


def agreement(ours: list[list[int]], reference: list[list[int]]) -> dict[str, float]:
    """Tokens equal to the reference's before the first difference, as a share of all."""
    same = []
    for mine, theirs in zip(ours, reference, strict=True):
        first = next(
            (i for i, (a, b) in enumerate(zip(mine, theirs, strict=True)) if a != b), len(theirs)
        )
        same.append(first / len(theirs))
    return {"mean": float(np.mean(same)), "worst": float(np.min(same))}


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB, read plus write, GB/s: the weights-read floor's rate."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * 10 * src.numel() / (time.perf_counter() - started) / 1e9


def run_model(name: str, args: argparse.Namespace, bandwidth: float) -> list[dict[str, Any]]:
    config = transformers.LlamaConfig(**SHAPES[name])
    torch.manual_seed(0)
    with torch.device("cuda"):
        eager = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    weights_gb = sum(p.numel() * p.element_size() for p in eager.parameters()) / 1e9
    anchor = copy.deepcopy(eager)
    anchor.generation_config.cache_implementation = "static"
    options = TorchEngineOptions(
        precision="bf16", compile=True, device=GPU, max_cache_len=args.prompt + args.new
    )
    started = time.perf_counter()
    generator = open_generator(Artifact("torch", DECODER_SPEC, module=eager), options)
    compile_s = time.perf_counter() - started
    rows = []
    for batch_size in args.batches:
        batch = prompts(batch_size, args.prompt, config.vocab_size, seed=batch_size)
        with torch.inference_mode():
            expected = hf_generate(eager, batch, args.new)  # the bf16 eager reference
        calls: dict[str, Call] = {
            "transformers generate, static cache, compiled": lambda b=batch: hf_generate(
                anchor, b, args.new
            ),
            "mahir torch-compile-bf16": lambda b=batch: mahir_generate(generator, b, args.new),
        }
        if batch_size == 1:  # one-token calls: the prefill, subtracted from the per-token time
            calls["transformers 1 token"] = lambda b=batch: hf_generate(anchor, b, 1)
            calls["mahir 1 token"] = lambda b=batch: mahir_generate(generator, b, 1)
        for call in calls.values():  # compile and capture every shape before timing
            call()
            call()
        times = timed(calls, args.rounds)
        fidelity = {
            "transformers generate, static cache, compiled": agreement(
                hf_generate(anchor, batch, args.new), expected
            ),
            "mahir torch-compile-bf16": agreement(
                mahir_generate(generator, batch, args.new), expected
            ),
        }
        for variant, agree in fidelity.items():
            whole = float(np.median(times[variant]))
            row: dict[str, Any] = {
                "model": name,
                "variant": variant,
                "batch": batch_size,
                "prompt_tokens": args.prompt,
                "new_tokens": args.new,
                "seconds_p50": whole,
                "tokens_per_s": batch_size * args.new / whole,
                "greedy_agreement_with_bf16_eager": agree,
                "weights_gb": weights_gb,
                "rounds": args.rounds,
            }
            if batch_size == 1:
                one = (
                    "transformers 1 token"
                    if variant.startswith("transformers")
                    else "mahir 1 token"
                )
                per_token = (whole - float(np.median(times[one]))) / (args.new - 1)
                row["decode_ms_per_token"] = per_token * 1e3
                row["floor_ms_per_token"] = weights_gb / bandwidth * 1e3
            if variant.startswith("mahir"):
                row["compile_s"] = compile_s
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="*", default=list(SHAPES))
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    bandwidth = copy_bandwidth_gbs()
    rows: list[dict[str, Any]] = []
    for name in args.models:
        rows += run_model(name, args, bandwidth)
        if args.out:  # after each model: a run cut short keeps what it measured
            args.out.write_text(json.dumps(_result(rows, bandwidth), indent=2) + "\n")


def _result(rows: list[dict[str, Any]], bandwidth: float) -> dict[str, Any]:
    return {**gpu.result(rows), "copy_bandwidth_gbs": bandwidth}


if __name__ == "__main__":
    main()
