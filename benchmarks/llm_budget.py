"""What separates a usable LLM variant from a broken one, in mahir's generation measures: the
evidence for `GenerationBudget`'s defaults (`mahir/generation_quality.py`).

    python benchmarks/llm_budget.py [--json FILE] [MODEL]

The default LLM (or MODEL: a .gguf or a causal-LM folder), against its fp32 reference on the
held-out text: precisions an engine would run (bf16, torchao int8 weight-only), 4-bit rounding
with and without groups (round-to-nearest, absmax scales, dequantized back to fp32: what the
weights of a naive int4 export would hold), and weights with Gaussian noise of a share of each
tensor's own standard deviation. Each row: teacher-forced top-1 agreement and mean KL, the
candidate's perplexity, greedy continuations' agreement, and whether the default budget passes.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mahir.families.decoder import LanguageModel
from mahir.generation_quality import (
    GenerationBudget,
    Judging,
    held_out_answers,
    judge,
)
from mahir.hardware import detect
from mahir.model import load_model
from mahir.passes.torchao import TorchaoInt8, quantize_linears
from mahir.runtimes.engines import open_engine
from mahir.types import Artifact, RuntimeOptions


def round_to_nearest(module: Any, bits: int, group: int | None) -> Any:
    """A copy whose nn.Linear weights are rounded to `bits`-bit integers with one absmax scale
    per `group` inputs of each output row (None: per row), then dequantized to fp32."""
    rounded = copy.deepcopy(module)
    top = 2 ** (bits - 1) - 1
    for layer in rounded.modules():
        if isinstance(layer, torch.nn.Linear):
            weight = layer.weight.detach()
            rows, columns = weight.shape
            size = group or columns
            blocks = weight.reshape(rows, columns // size, size)
            scale = blocks.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / top
            quantized = (blocks / scale).round().clamp(-top - 1, top) * scale
            layer.weight = torch.nn.Parameter(quantized.reshape(rows, columns))  # unties
    return rounded


def with_noise(module: Any, share: float) -> Any:
    """A copy whose every weight carries Gaussian noise of `share` of its tensor's std."""
    noisy = copy.deepcopy(module)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in noisy.parameters():
            noise = torch.randn(weight.shape, generator=generator) * weight.std() * share
            weight.add_(noise)
    return noisy


def variants(llm: LanguageModel) -> dict[str, Callable[[], tuple[Artifact, str]]]:
    """name -> (artifact, engine), built when its row runs (each holds a copy of the model)."""
    original = llm.original()

    def module(build: Callable[[Any], Any]) -> Callable[[], tuple[Artifact, str]]:
        return lambda: (original.derive(module=build(llm.module)), "torch")

    rows: dict[str, Callable[[], tuple[Artifact, str]]] = {
        "fp32 (the reference)": lambda: (original, "torch"),
        "torchao int8 weight-only": lambda: (
            quantize_linears(original, TorchaoInt8(weight_only=True)),
            "torch",
        ),
        "int8 RTN per channel": module(lambda m: round_to_nearest(m, 8, None)),
        "int4 RTN, groups of 32": module(lambda m: round_to_nearest(m, 4, 32)),
        "int4 RTN, groups of 64": module(lambda m: round_to_nearest(m, 4, 64)),
        "int4 RTN per channel (no groups)": module(lambda m: round_to_nearest(m, 4, None)),
        "noise 2% of each weight's std": module(lambda m: with_noise(m, 0.02)),
        "noise 5% of each weight's std": module(lambda m: with_noise(m, 0.05)),
        "noise 10% of each weight's std": module(lambda m: with_noise(m, 0.10)),
    }
    if any(detect(gpus=False).has(f) for f in ("avx512_bf16", "amx_bf16")):
        rows = {"bf16": lambda: (original, "torch-bf16"), **rows}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="a .gguf or causal-LM folder (default: SmolLM2)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--only", action="append", help="a variant to measure; repeat")
    args = parser.parse_args()
    started = time.perf_counter()
    llm = load_model(args.model, llm=True)
    judging, budget, options = Judging(), GenerationBudget(), RuntimeOptions()
    reference = open_engine("torch", llm.original(), options)
    answers = held_out_answers(reference, llm.family, judging)
    print(
        f"{llm.name} on {detect(gpus=False).summary()}; budget: top-1 >= {budget.min_top1}, "
        f"KL <= {budget.max_kl}"
    )
    print("| variant | top-1 | mean KL | max KL | ppl (reference) | greedy | budget |")
    print("|---|---|---|---|---|---|---|")
    results = []
    for name, build in variants(llm).items():
        if args.only and name not in args.only:
            continue
        artifact, engine = build()
        quality = judge(open_engine(engine, artifact, options), answers)
        missed = budget.failures(quality)
        results.append({"variant": name, "engine": engine, **quality.to_dict(), "missed": missed})
        print(
            f"| {name} | {quality.top1_agreement:.3f} | {quality.kl_mean:.4f} | "
            f"{quality.kl_max:.2f} | {quality.perplexity:.2f} ({quality.reference_perplexity:.2f})"
            f" | {quality.greedy_agreement:.0%} | {'pass' if not missed else 'fail'} |",
            flush=True,
        )
    print(f"{time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
