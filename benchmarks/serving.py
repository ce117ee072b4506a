"""Serving: batching on vs off at concurrency 32, and what HTTP + the batcher add at low load.

Starts `mahir serve` on 127.0.0.1 for an output directory, loads it with `mahir.serve.loadtest`
(aiohttp, one sentence per request on /v1/embeddings, closed loop), once with dynamic batching
and once with `--max-batch-size 1`; then at concurrency 1 compares the server's p50 with the same
work done in-process (tokenize, run, pool: what a request costs without HTTP and batching).

    .venv/bin/python benchmarks/serving.py mahir-out --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from mahir.hardware import detect
from mahir.outdir import open_output_dir
from mahir.pooling import pool
from mahir.serve.loadtest import LoadConfig, run_load, sentence_source


def start(folder: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "mahir.cli", "serve", str(folder), "--port", str(port)]
    process = subprocess.Popen([*command, *args], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)


def load(url: str, name: str, concurrency: int, seconds: float) -> dict[str, object]:
    config = LoadConfig(url, concurrency=concurrency, duration_s=seconds, model=name)
    return asyncio.run(run_load(config)).summary()


def in_process_p50(folder: Path, count: int) -> float:
    opened = open_output_dir(folder)
    sentence = sentence_source(0)
    times = []
    for _ in range(count):
        text = sentence()
        started = time.perf_counter()
        encoded = opened.tokenizer(
            [text], truncation=True, max_length=opened.max_length, return_tensors="np"
        )
        inputs = {t.name: encoded[t.name].astype(t.dtype) for t in opened.spec.inputs}
        tokens = opened.session.run(inputs)[opened.spec.outputs[0]]
        assert opened.pooling is not None
        pool(tokens, inputs["attention_mask"], opened.pooling)
        times.append((time.perf_counter() - started) * 1e3)
    return float(np.median(times[10:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    name = open_output_dir(args.folder).name
    print(detect().summary(), time.strftime("%Y-%m-%d"))
    rows = {}
    for label, extra in (("batching on", ()), ("batching off", ("--max-batch-size", "1"))):
        process, url = start(args.folder, *extra)
        try:
            load(url, name, 32, 3)  # warm-up
            rows[f"{label}, concurrency 32"] = load(url, name, 32, args.seconds)
            if label == "batching on":
                rows[f"{label}, concurrency 1"] = load(url, name, 1, args.seconds)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    direct = in_process_p50(args.folder, 500)
    for label, r in rows.items():
        speed = (
            f"{r['throughput']:8.1f} req/s  p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms"
        )
        print(f"{label:32} {speed}  {r['statuses']}")
    on, off = rows["batching on, concurrency 32"], rows["batching off, concurrency 32"]
    print(f"batching on / off at concurrency 32: {on['throughput'] / off['throughput']:.2f}x")
    low = rows["batching on, concurrency 1"]["p50_ms"]
    print(f"in-process p50 {direct:.2f} ms; server p50 at concurrency 1 {low:.2f} ms")
    print(f"HTTP + batcher overhead at concurrency 1: {low - direct:.2f} ms")


if __name__ == "__main__":
    main()
