"""`mahir serve --workers N`: N batches at once on N OpenVINO streams, against one worker.

Starts the server for an OpenVINO output directory with each worker count in turn and loads it
with one sentence per request on /v1/embeddings (closed loop) at each concurrency, in rounds
that alternate the worker counts so drift hits all alike; reports the median over rounds of
requests/s and of p50 and p99, and each count's throughput as a ratio to one worker's.

    PYTHONPATH=src:. python -m benchmarks.workers OPENVINO_OUT_DIR --workers 1 2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.serving import load, start
from mahir.hardware import detect
from mahir.outdir import model_name, read_manifest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    name = model_name(read_manifest(args.folder), args.folder)
    runs: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for _ in range(args.rounds):
        for workers in args.workers:
            process, url = start(args.folder, "--workers", str(workers))
            try:
                for concurrency in args.concurrency:
                    load(url, name, concurrency, 1.0)  # warm up at this load
                    summary = load(url, name, concurrency, args.seconds)
                    runs.setdefault((workers, concurrency), []).append(summary)
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)
    rows = []
    for (workers, concurrency), summaries in sorted(runs.items()):
        rows.append(
            {
                "workers": workers,
                "concurrency": concurrency,
                "requests_per_s": float(np.median([s["throughput"] for s in summaries])),
                "p50_ms": float(np.median([s["p50_ms"] for s in summaries])),
                "p99_ms": float(np.median([s["p99_ms"] for s in summaries])),
            }
        )
    for row in rows:
        one = next(
            r
            for r in rows
            if r["workers"] == args.workers[0] and r["concurrency"] == row["concurrency"]
        )
        row["ratio"] = row["requests_per_s"] / one["requests_per_s"]
        print(json.dumps(row))
    if args.out:
        result = {"machine": detect().summary(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
