"""What batching can give at most on this machine: sentences/s in process, no server, at
batch 1 and at larger length-grouped batches, for one or more output directories.

A server's batching-on over batching-off ratio cannot beat this ratio for the same artifact:
the server adds HTTP, tokenization and a client on the same cores, and its batches are never
better grouped than these (the same sentences sorted by length, cut into batches). Each pass
runs the whole set of sentences once; passes of every (artifact, batch size) take turns, so
drift hits all alike. Reported: median sentences/s over the passes, and its ratio to batch 1.

    .venv/bin/python benchmarks/batch_ceiling.py DIR [DIR ...] [--sentences 256]
        [--batch-size 1 --batch-size 8 ...] [--passes 7] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from mahir.hardware import detect
from mahir.outdir import OutputDir, open_output_dir
from mahir.serve.loadtest import sentence_source


def grouped_batches(opened: OutputDir, sentences: list[str], size: int) -> list[dict[str, Any]]:
    """The sentences sorted by token count and cut into batches of `size`, each padded to
    its own longest: the best grouping a batcher could reach."""
    lengths = [
        len(
            opened.family.tokenizer(s, truncation=True, max_length=opened.family.max_length)[
                "input_ids"
            ]
        )
        for s in sentences
    ]
    ordered = [s for _, s in sorted(zip(lengths, sentences, strict=True))]
    return [opened.family.tokenize(ordered[i : i + size]) for i in range(0, len(ordered), size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", type=Path, nargs="+")
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--batch-size", type=int, action="append")
    parser.add_argument("--passes", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sizes = sorted(set(args.batch_size or [1, 4, 8, 16, 32]) | {1})
    next_sentence = sentence_source(7)
    sentences = [next_sentence() for _ in range(args.sentences)]
    runs = {}
    for folder in args.dirs:
        opened = open_output_dir(folder)
        for size in sizes:
            batches = grouped_batches(opened, sentences, size)
            for batch in batches[:2]:  # warm-up
                opened.session.run(batch)
            runs[(str(folder), size)] = (opened, batches, [])
    for _ in range(args.passes):
        for opened, batches, rates in runs.values():
            started = time.perf_counter()
            for batch in batches:
                opened.session.run(batch)
            rates.append(len(sentences) / (time.perf_counter() - started))
    rows = []
    for (folder, size), (opened, _, rates) in runs.items():
        median = statistics.median(rates)
        single = statistics.median(runs[(folder, 1)][2])
        rows.append(
            {
                "dir": folder,
                "runtime": opened.session.runtime,
                "batch_size": size,
                "sentences_per_s": median,
                "over_batch_1": median / single,
            }
        )
        print(
            f"{folder:30s} {opened.session.runtime:12s} batch {size:3d}: "
            f"{median:8.1f} sentences/s  {median / single:5.2f}x batch 1"
        )
    if args.json is not None:
        record = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": detect(gpus=False).summary(),
            "sentences": args.sentences,
            "passes": args.passes,
            "rows": rows,
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
