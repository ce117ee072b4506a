"""Serving: batching on vs off at concurrency 32, and what HTTP + the batcher add at low load.

Starts `mahir serve` on 127.0.0.1 for an output directory, loads it with `mahir.serve.loadtest`
(aiohttp, one sentence per request on /v1/embeddings, closed loop), once with dynamic batching
and once with `--max-batch-size 1`; then, one request at a time from a light client, compares the
server's p50 with the same work done in process (tokenize, run, pool: what a request costs
without HTTP and batching), in alternating blocks.

    .venv/bin/python benchmarks/serving.py mahir-out --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
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


def low_load(
    url: str, folder: Path, name: str, seconds: float, blocks: int = 6
) -> dict[str, float]:
    """p50 of one sentence in process (tokenize, run, pool) and through the server (HTTP,
    batcher, the same work, JSON out) on the same sentences, in alternating blocks so drift
    hits both alike. The client is `http.client` on one kept-alive connection with every body
    built before its timer starts and the answer read but not parsed: what the times include
    beyond the in-process work is the server's, not a load generator's."""
    opened = open_output_dir(folder)
    assert opened.family.pooling is not None
    sentence = sentence_source(0)
    texts = [sentence() for _ in range(2000)]
    bodies = [json.dumps({"input": [t], "model": name}).encode() for t in texts]
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port))
    headers = {"Content-Type": "application/json"}
    times: dict[str, list[float]] = {"in_process": [], "server": []}

    def in_process(i: int) -> None:
        inputs = opened.family.tokenize([texts[i]])
        tokens = opened.session.run(inputs)[opened.spec.outputs[0]]
        pool(tokens, inputs["attention_mask"], opened.family.pooling)

    def server(i: int) -> None:
        connection.request("POST", "/v1/embeddings", bodies[i], headers)
        response = connection.getresponse()
        response.read()
        assert response.status == 200, response.status

    i = 0
    for _ in range(blocks):
        for where, call in (("in_process", in_process), ("server", server)):
            until = time.perf_counter() + seconds / blocks / 2
            first = True
            while time.perf_counter() < until:
                started = time.perf_counter()
                call(i % len(texts))
                if not first:  # the first of a block pays for the other side's idle threads
                    times[where].append((time.perf_counter() - started) * 1e3)
                first = False
                i += 1
    connection.close()
    return {f"{where}_p50_ms": float(np.median(t)) for where, t in times.items()} | {
        "requests": float(len(times["server"]))
    }


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
                light = low_load(url, args.folder, name, args.seconds)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    for label, r in rows.items():
        speed = (
            f"{r['throughput']:8.1f} req/s  p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms"
        )
        print(f"{label:32} {speed}  {r['statuses']}")
    on, off = rows["batching on, concurrency 32"], rows["batching off, concurrency 32"]
    print(f"batching on / off at concurrency 32: {on['throughput'] / off['throughput']:.2f}x")
    direct, served = light["in_process_p50_ms"], light["server_p50_ms"]
    print(
        f"one sentence at a time, alternating blocks: in process p50 {direct:.2f} ms, "
        f"through the server (http.client) p50 {served:.2f} ms"
    )
    print(f"HTTP + batcher overhead at low load: {served - direct:.2f} ms")


if __name__ == "__main__":
    main()
