"""How much padding length grouping saves: the same requests through the batcher, grouped by
length and in arrival order, counting padded tokens (items x longest per batch).

No timing: a session that records batch shapes stands in for the model, so the count depends
only on the requests and the batching rule. Requests are generated sentences with the
short-skewed length spread mahir's workloads use, tokenized by the default model's tokenizer,
all arriving at once (the server under load, when batching matters).

    .venv/bin/python benchmarks/batching.py --requests 2000 --max-batch-size 32
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import numpy as np

from mahir.families.text import generate_sentences
from mahir.model import load_model
from mahir.serve.batcher import Batcher, BatcherConfig


class ShapeRecorder:
    runtime = "recorder"

    def __init__(self) -> None:
        self.shapes: list[tuple[int, int]] = []

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = inputs["input_ids"]
        self.shapes.append(ids.shape)
        return {"last_hidden_state": np.zeros((*ids.shape, 1), np.float32)}

    def describe(self) -> dict[str, Any]:
        return {}


async def padded_tokens(requests: list[dict[str, np.ndarray]], config: BatcherConfig) -> int:
    session = ShapeRecorder()
    batcher = Batcher(
        session,
        config,
        sequence_inputs=frozenset(requests[0]),
        token_outputs=frozenset({"last_hidden_state"}),
    )
    batcher.start()
    await asyncio.gather(*(batcher.submit(r) for r in requests))
    await batcher.stop()
    return sum(items * length for items, length in session.shapes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--max-batch-size", type=int, default=32)
    args = parser.parse_args()
    model = load_model()
    rng = np.random.default_rng(0)
    texts = generate_sentences(args.requests, model.family.tokenizer, rng, max_tokens=256)
    requests = [model.family.tokenize([t]) for t in texts]
    real = sum(int(r["attention_mask"].sum()) for r in requests)
    counts = {}
    for grouped in (False, True):
        config = BatcherConfig(
            max_batch_size=args.max_batch_size,
            max_batch_tokens=10**9,
            max_queue=args.requests,
            group_by_length=grouped,
            max_padding=0.5 if grouped else float("inf"),
        )
        counts[grouped] = asyncio.run(padded_tokens(requests, config))
    print(f"{args.requests} requests, {real} real tokens, max batch {args.max_batch_size}")
    print(
        f"arrival order:     {counts[False]:>9,} padded tokens ({counts[False] / real:.2f}x real)"
    )
    print(f"grouped by length: {counts[True]:>9,} padded tokens ({counts[True] / real:.2f}x real)")
    print(f"padding cut by grouping: {1 - counts[True] / counts[False]:.1%}")


if __name__ == "__main__":
    main()
