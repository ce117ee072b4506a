"""Where `embed`'s time goes on a GPU host, and what the order of batches and the size of packed
chunks do to it.

MiniLM's shape (random weights), packed fp16 (`packed-fp16`, as `optimize --device cuda` builds
it), the 4,096 generated sentences of `benchmarks/gpu.py`'s variable-length workload in batches
of 256, each batch tokenized on the calling thread and queued before the previous one is waited
for, as `embed` does. Variants: the batches shortest first or longest first, and the packed
token buckets cut at 8,192 (a batch of long sentences runs as several chunks) or at their
largest; and the GPU alone (every batch tokenized first, then all queued at once). Each variant
timed in turns, 9 rounds, medians. `--timeline` adds, for each order, one run's per-batch host
time (tokenizing, queueing, waiting) against the GPU's span of each batch (CUDA events recorded
on the graphs' stream before and after it is queued).

Usage: python -m benchmarks.gpu_embed_order --tokenizer MINILM_FOLDER [--timeline]
       [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from benchmarks import gpu, gpu_sessions
from mahir.families.text import TextEncoder
from mahir.model import load_model
from mahir.runtimes import packing
from mahir.runtimes.pending import submit

SENTENCES, BATCH, ROUNDS = 4096, 256, 9
FULL_LADDER = packing.TOKEN_BUCKETS
LADDERS = {"buckets to 8,192": 8192, "buckets to the largest": FULL_LADDER[-1]}


def graphs_stream(session: Any) -> torch.cuda.Stream:
    """The stream a packed CUDA-graph session queues on (Packing -> TorchSession -> CudaGraphs)."""
    return session.inner._replay._stream  # type: ignore[no-any-return]


def cut_buckets(largest: int) -> None:
    """The packed token buckets up to `largest`: a batch with more tokens runs in chunks."""
    packing.TOKEN_BUCKETS = tuple(b for b in FULL_LADDER if b <= largest)


def embed_order(
    session: Any, encode: Callable[[list[str]], Any], parts: list[list[str]], log: list | None
) -> float:
    """`embed`'s loop over `parts` in their order; seconds. With `log`, each batch's host
    times and GPU span (ms from the start)."""
    stream = graphs_stream(session)

    def event() -> torch.cuda.Event:
        mark = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        mark.record(stream)
        return mark

    torch.cuda.synchronize()
    started, origin = time.perf_counter(), event()
    waiting, spans = None, []
    for part in parts:
        begun = time.perf_counter()
        batch = encode(part)
        made = time.perf_counter()
        before = event()
        queued = submit(session, batch)
        sent = time.perf_counter()
        after = event()
        waited = 0.0
        if waiting is not None:
            waiting.result()
            waited = time.perf_counter() - sent
        waiting = queued
        spans.append((begun - started, made - begun, sent - made, waited, before, after))
    assert waiting is not None
    waiting.result()
    total = time.perf_counter() - started
    if log is not None:
        torch.cuda.synchronize()
        for begun, making, sending, waited, before, after in spans:
            log.append(
                {
                    "host_start_ms": round(begun * 1e3, 2),
                    "tokenize_ms": round(making * 1e3, 2),
                    "queue_ms": round(sending * 1e3, 2),
                    "wait_ms": round(waited * 1e3, 2),
                    "gpu_from_ms": round(origin.elapsed_time(before), 2),
                    "gpu_to_ms": round(origin.elapsed_time(after), 2),
                }
            )
        log.append({"total_ms": round(total * 1e3, 2)})
    return total


def gpu_alone(session: Any, batches: list[Any]) -> float:
    """Every batch already tokenized, all queued at once, then waited for; seconds."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    for pending in [submit(session, batch) for batch in batches]:
        pending.result()
    return time.perf_counter() - started


def ordered(sentences: list[str], longest_first: bool) -> Iterator[list[str]]:
    lengths = [-len(s) if longest_first else len(s) for s in sentences]
    order = np.argsort(lengths, kind="stable").tolist()
    for start in range(0, len(order), BATCH):
        yield [sentences[i] for i in order[start : start + BATCH]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--timeline", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(**gpu_sessions.SHAPES["minilm"])).eval()
    with tempfile.TemporaryDirectory() as tmp:
        folder = gpu.sentence_encoder_folder(bert, args.tokenizer, Path(tmp) / "minilm")
        model = load_model(folder)
        session = gpu.mahir_sessions(model, Path(tmp) / "work", ("packed-fp16",))[
            "mahir packed-fp16"
        ]
        text: Any = model.family
        encode = TextEncoder(text.tokenizer, model.spec, text.max_length)
        sentences = text.generate(SENTENCES, np.random.default_rng(0))
        orders = {"shortest first": False, "longest first": True}
        calls: dict[str, tuple[int, Callable[[], float]]] = {}
        for order, longest in orders.items():
            parts = list(ordered(sentences, longest))
            for ladder, largest in LADDERS.items():
                calls[f"{order}, {ladder}"] = (
                    largest,
                    lambda p=parts: embed_order(session, encode, p, None),
                )
        tokenized = [encode(part) for part in ordered(sentences, False)]
        calls["GPU alone, buckets to the largest"] = (
            LADDERS["buckets to the largest"],
            lambda: gpu_alone(session, tokenized),
        )
        for largest, call in calls.values():  # captures every bucket's graph
            cut_buckets(largest)
            call()
            call()
        seconds: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(ROUNDS):
            for name, (largest, call) in calls.items():
                cut_buckets(largest)
                seconds[name].append(call())
        rows: list[dict[str, Any]] = [
            {
                "model": "minilm",
                "workload": f"{SENTENCES} sentences, variable length",
                "variant": name,
                "p50_ms": statistics.median(times) * 1e3,
                "calls": len(times),
            }
            for name, times in seconds.items()
        ]
        if args.timeline:
            cut_buckets(LADDERS["buckets to the largest"])
            for order, longest in orders.items():
                log: list[dict[str, float]] = []
                embed_order(session, encode, list(ordered(sentences, longest)), log)
                rows.append({"variant": f"timeline, {order}", "batches": log})
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(gpu.result(rows), indent=2) + "\n")


if __name__ == "__main__":
    main()
