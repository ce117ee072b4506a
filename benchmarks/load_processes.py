"""A closed loop over several client processes: `mahir.serve.loadtest` in each, its share of
the connections, all started at one wall-clock instant, results merged. One Python process
drives a few thousand requests per second; a server on a GPU can take more than that, and the
client must not be what limits the numbers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def _client(url: str, concurrency: int, seconds: float, seed: int, at: float) -> dict[str, Any]:
    """One client process's share of a closed loop, started at wall-clock time `at`."""
    from mahir.serve.loadtest import LoadConfig, run_load

    config = LoadConfig(url, concurrency=concurrency, duration_s=seconds, seed=seed)
    time.sleep(max(0.0, at - time.time()))
    with asyncio.Runner(loop_factory=uvloop()) as runner:
        result = runner.run(run_load(config))
    return {
        "latencies": result.latencies_ms,
        "statuses": result.statuses,
        "elapsed": result.elapsed_s,
    }


def uvloop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed, as both servers run on it; else asyncio's."""
    try:
        from uvloop import new_event_loop
    except ImportError:
        return None
    return new_event_loop


def _imported() -> int:
    import mahir.serve.loadtest  # noqa: F401  the import a client pays once, before the clock

    time.sleep(1.0)  # held, so that every worker of the pool starts
    return os.getpid()


def load(
    pool: concurrent.futures.ProcessPoolExecutor,
    url: str,
    concurrency: int,
    seconds: float,
    procs: int,
) -> tuple[dict[str, Any], np.ndarray]:
    """`concurrency` clients over `procs` processes, the same seeds for every server; the
    summary, and every successful request's latency."""
    shares = [len(part) for part in np.array_split(np.arange(concurrency), procs) if len(part)]
    at = time.time() + 0.5
    futures = [
        pool.submit(_client, url, share, seconds, concurrency * 1000 + i, at)
        for i, share in enumerate(shares)
    ]
    parts = [f.result(timeout=seconds + 120) for f in futures]
    latencies = np.concatenate([np.asarray(p["latencies"], dtype=np.float64) for p in parts])
    statuses: dict[str, int] = {}
    for part in parts:
        for status, count in part["statuses"].items():
            statuses[status] = statuses.get(status, 0) + count
    total = sum(statuses.values())
    p50, p99 = np.percentile(latencies, [50, 99]) if len(latencies) else (np.nan, np.nan)
    summary = {
        "requests_per_s": sum(len(p["latencies"]) / p["elapsed"] for p in parts if p["elapsed"]),
        "p50_ms": float(p50),
        "p99_ms": float(p99),
        "requests": total,
        "ok": len(latencies),
        "error_share": (total - statuses.get("200", 0)) / total if total else 1.0,
        "statuses": statuses,
        "client_processes": len(shares),
        "seconds": seconds,
    }
    return summary, latencies


def start_clients(procs: int) -> concurrent.futures.ProcessPoolExecutor:
    """`procs` client processes, each started and its imports done before any clock runs
    (spawned, not forked: the parent may hold threads and a CUDA-free torch already)."""
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=procs, mp_context=multiprocessing.get_context("spawn")
    )
    futures = [pool.submit(_imported) for _ in range(procs)]
    for future in futures:
        future.result(timeout=120)
    return pool
