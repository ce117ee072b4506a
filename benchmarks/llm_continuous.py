"""Continuous batching in the PyTorch engine against the plain engine: output tokens/s with 1, 4
and 8 concurrent streams.

The plain engine (`max_concurrency` 1) runs the streams one after another, as the LLM server's
scheduler would; the batched engine (`slots` = the most streams) runs them from one thread each,
decoded together. Prompts of different lengths (held-out text, 16-64 tokens), greedy,
`--new` tokens each with no stop token. Each round times every (concurrency, engine) pair,
interleaved; the table gives medians over rounds, the batched engine's mean batch (sequences
per decode step) and the load average (other work on the machine slows eager PyTorch a lot).

    PYTHONPATH=src .venv/bin/python benchmarks/llm_continuous.py [--rounds 3] [--new 64] [MODEL]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from typing import Any

from mahir.generation import Generator, Sampling
from mahir.hardware import detect
from mahir.model import load_model
from mahir.runtimes.engines import open_engine
from mahir.runtimes.torch_generator import TorchGenerator
from mahir.types import RuntimeOptions


def one_after_another(generator: Generator, prompts: list[list[int]], sampling: Sampling) -> int:
    return sum(len(list(generator.stream(p, sampling))) for p in prompts)


def together(generator: Generator, prompts: list[list[int]], sampling: Sampling) -> int:
    counts = [0] * len(prompts)

    def consume(i: int) -> None:
        counts[i] = len(list(generator.stream(prompts[i], sampling)))

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default=None, help="default: the default LLM")
    parser.add_argument("--engine", default="torch", help="torch, torch-compile, ...")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--new", type=int, default=64, help="new tokens per stream")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()

    llm = load_model(args.model, llm=True)
    slots = max(args.concurrency)
    plain = open_engine(args.engine, llm.original(), RuntimeOptions())
    batched = open_engine(args.engine, llm.original(), RuntimeOptions(slots=slots))
    if not isinstance(batched, TorchGenerator) or batched.batch is None:
        raise SystemExit(f"{args.engine} has no continuous batching: give a PyTorch engine")
    texts = llm.family.held_out(slots, 64)
    prompts = [ids[: 16 + 48 * i // max(slots - 1, 1)] for i, ids in enumerate(texts)]
    sampling = Sampling(args.new)
    for generator in (plain, batched):  # first calls allocate and warm up: not timed
        one_after_another(generator, prompts[:2], Sampling(4))
    runs: dict[tuple[int, str], list[float]] = {}
    batches: dict[int, list[float]] = {}
    for _ in range(args.rounds):
        for count in args.concurrency:
            for name, generator, run in (
                ("plain", plain, one_after_another),
                ("batched", batched, together),
            ):
                stats = batched.batch.stats
                steps, rows = stats.steps, stats.rows
                started = time.perf_counter()
                tokens = run(generator, prompts[:count], sampling)
                rate = tokens / (time.perf_counter() - started)
                runs.setdefault((count, name), []).append(rate)
                if name == "batched":
                    batches.setdefault(count, []).append(
                        (stats.rows - rows) / max(stats.steps - steps, 1)
                    )
    rows_out: list[dict[str, Any]] = []
    print("| streams | plain tokens/s | batched tokens/s | speedup | mean batch |")
    print("|---|---|---|---|---|")
    for count in args.concurrency:
        one = statistics.median(runs[count, "plain"])
        many = statistics.median(runs[count, "batched"])
        batch = statistics.median(batches[count])
        print(f"| {count} | {one:.1f} | {many:.1f} | {many / one:.2f}x | {batch:.2f} |")
        rows_out.append(
            {"streams": count, "plain": runs[count, "plain"], "batched": runs[count, "batched"]}
            | {"mean_batch": batches[count]}
        )
    result = {
        "machine": detect().summary(),
        "date": time.strftime("%Y-%m-%d"),
        "load_average": os.getloadavg(),
        "model": llm.name,
        "engine": batched.describe(),
        "new_tokens": args.new,
        "prompt_tokens": [len(p) for p in prompts],
        "rounds": args.rounds,
        "rows": rows_out,
    }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
