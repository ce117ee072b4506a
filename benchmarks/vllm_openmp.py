"""vLLM's worker with Intel's OpenMP preloaded against torch's own, 16 streams at once on a CPU.

Both engines are mahir's vLLM engine (`runtimes/vllm_cpu.py`) on the default LLM's W8A8 folder
(`passes/w8a8.py`, the throughput winner at 16 on a Xeon with AMX), differing only in
`VllmOptions.intel_openmp`; each is its own worker process (a preload is per process), both
started first, then timed in turns, the first alternating by round. A round: 16 prompts of
20-170 random token ids streamed at once, 128 tokens each (stop tokens ignored), the
shape of `benchmarks/llm_serving.py`'s load at concurrency 16. Output tokens/s per round, the
medians, and each round's ratio.

    .venv/bin/python -m benchmarks.vllm_openmp [--rounds 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import statistics
from pathlib import Path
from typing import Any

from mahir.families.prompts import Prompt
from mahir.generation import Generator
from mahir.hardware import detect
from mahir.measure import MachineLoad, own_seconds
from mahir.model import load_model
from mahir.passes.w8a8 import W8A8, w8a8_folder
from mahir.runtimes.vllm_cpu import VllmOptions, open_generator
from mahir.search.llm_timing import time_at_once

STREAMS, NEW, CONTEXT = 16, 128, 2048


def tokens_per_s(engine: Generator, prompts: tuple[Prompt, ...]) -> float:
    """Output tokens/s of every prompt streamed at once (`llm_timing.time_at_once`)."""
    return time_at_once({"engine": engine}, prompts, STREAMS, CONTEXT)["engine"].tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    folder = w8a8_folder(load_model(llm=True), W8A8())
    engines = {
        name: open_generator(
            folder, VllmOptions(max_model_len=CONTEXT, intel_openmp=intel), engine="vllm-w8a8"
        )
        for name, intel in (("torch's OpenMP", False), ("Intel OpenMP", True))
    }
    draw = random.Random(0)
    prompts = tuple(
        Prompt(tuple(draw.randrange(100, 40_000) for _ in range(draw.randrange(20, 170))), NEW)
        for _ in range(STREAMS)
    )
    names = list(engines)
    rates: dict[str, list[float]] = {name: [] for name in names}
    load = MachineLoad(own_seconds=lambda: own_seconds(children=True))  # the workers are ours
    for engine in engines.values():
        tokens_per_s(engine, prompts)  # warm
    for turn in range(args.rounds):
        for name in names[turn % 2 :] + names[: turn % 2]:
            rates[name].append(tokens_per_s(engines[name], prompts))
        print(turn, {name: round(r[-1], 1) for name, r in rates.items()}, flush=True)
    medians = {name: statistics.median(r) for name, r in rates.items()}
    result: dict[str, Any] = {
        "machine": detect(gpus=False).summary(),
        "date": dt.date.today().isoformat(),
        "command": f"python -m benchmarks.vllm_openmp --rounds {args.rounds}",
        "other_cores_busy": load.other_cores(),
        "workload": f"{STREAMS} prompts of 20-170 random ids, {NEW} new tokens each",
        "openmp": {name: engine.describe()["openmp"] for name, engine in engines.items()},
        "output_tokens_per_s": rates,
        "medians": medians,
        "intel_over_torch": medians["Intel OpenMP"] / medians["torch's OpenMP"],
        "round_ratios": [
            i / t for i, t in zip(rates["Intel OpenMP"], rates["torch's OpenMP"], strict=True)
        ],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
