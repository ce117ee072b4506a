"""Tokenizing on the host, the bound of embedding a corpus on a GPU (`mahir.embed`): the
default model's tokenizer through transformers' call (what sentence-transformers does) against
mahir's `TextEncoder` (unpadded ids laid out by numpy), with BERT's plain text tokenized in
Python (the default) or by the lean Rust pipeline (`in_python=False`, which holds no GIL).

4,096 generated sentences (median ~20 tokens) in length-sorted batches of 256, as `embed` feeds
them (or of each of `--batch-sizes`: the Rust tokenizer spreads one call's sentences over its
threads, so bigger calls use more of them), and one sentence per call, as a server's request
often is. All run interleaved, 7 rounds; medians. With `RAYON_NUM_THREADS=1` the Rust
tokenizer runs on one thread, which shows what the Python side costs (it holds the GIL; the
Rust side does not).

    PYTHONPATH=src .venv/bin/python benchmarks/tokenizing.py [--batch-sizes 256 1024] [--out out]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mahir.families.text import TextEncoder, encode_texts, generate_sentences
from mahir.hardware import detect
from mahir.model import load_model

ROUNDS, SENTENCES, BATCH, SINGLES = 7, 4096, 256, 250


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[BATCH])
    args = parser.parse_args()
    model = load_model()
    text: Any = model.family
    sentences = generate_sentences(SENTENCES, text.tokenizer, np.random.default_rng(0))
    sentences.sort(key=len)
    sizes = {n: [sentences[i : i + n] for i in range(0, SENTENCES, n)] for n in args.batch_sizes}
    singles = [[s] for s in sentences[:: SENTENCES // SINGLES]]
    tokenizers: dict[str, Callable[[Sequence[str]], Any]] = {
        "transformers": lambda t: encode_texts(text.tokenizer, model.spec, text.max_length, t),
        "mahir TextEncoder, Python": TextEncoder(text.tokenizer, model.spec, text.max_length),
        "mahir TextEncoder, lean Rust": TextEncoder(
            text.tokenizer, model.spec, text.max_length, in_python=False
        ),
    }
    batched: dict[tuple[str, int], list[float]] = {(t, n): [] for t in tokenizers for n in sizes}
    single: dict[str, list[float]] = {name: [] for name in tokenizers}
    for _ in range(ROUNDS):
        for name, tokenize in tokenizers.items():
            for n, batches in sizes.items():
                batched[name, n].append(timed(tokenize, batches))
            single[name].append(timed(tokenize, singles) / len(singles))
    rows = [
        {
            "tokenizer": name,
            "batch": n,
            "batches_ms": 1e3 * float(np.median(batched[name, n])),
            "sentences_per_s": SENTENCES / float(np.median(batched[name, n])),
            "one_sentence_us": 1e6 * float(np.median(single[name])),
        }
        for name, n in batched
    ]
    for row in rows:
        print(
            f"{row['tokenizer']:28s} {SENTENCES} in batches of {row['batch']}: "
            f"{row['batches_ms']:6.1f} ms ({row['sentences_per_s']:,.0f}/s); "
            f"one sentence {row['one_sentence_us']:.1f} us"
        )
    if args.out:
        result = {
            "date": datetime.date.today().isoformat(),
            "machine": detect(gpus=False).summary(),
            "rayon_threads": os.environ.get("RAYON_NUM_THREADS", "default (all cores)"),
            "command": " ".join(["benchmarks/tokenizing.py", *sys.argv[1:]]),
            "rows": rows,
        }
        with open(args.out, "w") as out:
            json.dump(result, out, indent=2)


def timed(tokenize: Callable[[Sequence[str]], Any], calls: list[list[str]]) -> float:
    started = time.perf_counter()
    for texts in calls:
        tokenize(texts)
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
