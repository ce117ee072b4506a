"""Start-up: how long `mahir serve DIR` takes to answer `/v2/health/ready`, how long
`mahir --help` takes, and how long `mahir bench` takes to refuse a path that is not there.

Each `--src` is a mahir source tree (default: this checkout's `src`) put first on PYTHONPATH, so
two versions compare in one run: the trees take turns within each round, and medians and the
ratio to the first tree are reported. Every start is a fresh interpreter, as a user's shell, a
Ray replica or a pod scaling from zero gets.

    .venv/bin/python -m benchmarks.startup mahir-out --src OLD/src --src src --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np

from mahir.hardware import detect

ROOT = Path(__file__).parents[1]


def env_for(src: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(src.resolve())}


def mahir_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mahir.cli", *args]


def serve_ready(folder: Path, env: dict[str, str]) -> float:
    """Seconds from starting `mahir serve` to its first 200 on /v2/health/ready."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.perf_counter()
    command = mahir_command("serve", str(folder), "--port", str(port))
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"mahir serve exited: {process.stderr.read().decode()[-500:]}")  # type: ignore[union-attr]
            try:
                url = f"http://127.0.0.1:{port}/v2/health/ready"
                if httpx.get(url, timeout=1).status_code == 200:
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass
            time.sleep(0.02)
    finally:
        process.terminate()
        process.wait(timeout=60)


def command_time(args: tuple[str, ...], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(mahir_command(*args), env=env, capture_output=True, check=False)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path, help="an output directory to serve")
    parser.add_argument("--src", type=Path, action="append", help="mahir source trees")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    trees: list[Path] = args.src or [ROOT / "src"]
    probes: dict[str, Callable[[dict[str, str]], float]] = {
        "serve until ready": lambda env: serve_ready(args.folder, env),
        "mahir --help": lambda env: command_time(("--help",), env),
        "bench of a missing path": lambda env: command_time(("bench", "no/such/model"), env),
    }
    times: dict[tuple[str, str], list[float]] = {}
    for round_ in range(args.rounds):
        order = trees if round_ % 2 == 0 else trees[::-1]
        for tree in order:
            for probe, run in probes.items():
                times.setdefault((probe, str(tree)), []).append(run(env_for(tree)))
    rows = []
    for probe in probes:
        first = float(np.median(times[(probe, str(trees[0]))]))
        for tree in trees:
            median = float(np.median(times[(probe, str(tree))]))
            rows.append(
                {"probe": probe, "src": str(tree), "p50_s": median, "vs_first": first / median}
            )
            print(f"{probe:24s} {tree}: {median:.2f} s ({first / median:.2f}x the first)")
    result = {
        "machine": detect().summary(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "folder": str(args.folder),
        "rounds": args.rounds,
        "rows": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
