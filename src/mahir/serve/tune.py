"""The batching tuner: which batch size, delay and padding allowance give the most throughput
with p99 under a bound, measured on this machine with this artifact.

Every setting is driven by the same closed-loop load (`concurrency` clients, one traffic-shaped
request each, distinct inputs), through a real `Batcher` over the real session, so it measures
queueing, padding and inference together. Settings are timed interleaved in rounds, so machine
drift hits all alike; each setting's latencies are pooled over its rounds. HTTP is left out on
purpose: it adds the same fixed cost (about a millisecond) to every setting, and a client
sharing the server's cores would skew the comparison. The winner is the highest throughput
whose p99 is within the bound; its values are recorded in `mahir.json` under `batching`, which
`mahir serve` and the exports (Triton's `dynamic_batching`) read. Without a bound from the user
(the short tune `mahir optimize` runs), the bound is batch 1's own p99 under the same load: no
choice has a worse tail than not batching at all, and some choice always meets it.

Knows the batcher and the output directory; nothing of HTTP, passes or search.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
from rich.table import Table

from mahir.errors import BadInput
from mahir.hardware import detect
from mahir.outdir import OutputDir
from mahir.runtimes.buckets import token_outputs
from mahir.serve.batcher import Batcher, BatcherConfig, Inputs
from mahir.types import Session

TUNED = ("max_batch_size", "max_delay_ms", "max_padding", "workers")
"""The batcher settings the tuner chooses and `mahir.json` records."""


@dataclass(frozen=True, slots=True)
class TuneConfig:
    p99_ms: float | None
    """The bound: a setting whose p99 (queue + batch + inference) exceeds it is not chosen.
    None: batch 1's p99 in the same tune (see the module note)."""
    concurrency: int = 32
    """Clients in the closed loop, each waiting for its answer before the next request."""
    seconds: float = 2.0
    """Timed seconds per setting, split over `rounds`."""
    rounds: int = 2
    batch_sizes: tuple[int, ...] = (1, 4, 8, 16, 32, 64)
    """Tried up to `concurrency` (a larger batch can never fill)."""
    delays_ms: tuple[float, ...] = (0.0, 4.0)
    paddings: tuple[float, ...] = (0.5, 2.0)
    """`max_padding` values: for text models only (tensor models have nothing to pad)."""
    workers: tuple[int, ...] = (1,)
    """Worker counts (batches at once), each on a session that runs that many: given to
    `tune_batching` as `sessions`."""

    def __post_init__(self) -> None:
        if self.p99_ms is not None and self.p99_ms <= 0:
            raise ValueError(f"--p99-ms must be > 0, got {self.p99_ms}")
        if self.p99_ms is None and 1 not in self.batch_sizes:
            raise ValueError("a tune without --p99-ms is bounded by batch 1: keep 1 in batch_sizes")
        if 1 not in self.workers or min(self.workers) < 1:
            raise ValueError(f"worker counts are >= 1 and include 1, got {self.workers}")
        if self.concurrency < 1 or self.seconds <= 0 or self.rounds < 1:
            raise ValueError("concurrency and rounds must be >= 1 and seconds > 0")

    @classmethod
    def short(cls) -> TuneConfig:
        """What `mahir optimize` runs for its winner: the whole grid at 1 s per setting (17
        settings for a text model, 9 for a tensor model), bounded by batch 1's p99, since the
        user's own latency target is not known then."""
        return cls(None, seconds=1.0)


@dataclass(frozen=True, slots=True)
class Trial:
    config: BatcherConfig
    seconds: float
    latencies_ms: tuple[float, ...]
    """One per timed request."""

    @property
    def requests(self) -> int:
        return len(self.latencies_ms)

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q))


@dataclass(frozen=True, slots=True)
class TuneResult:
    config: TuneConfig
    trials: tuple[Trial, ...]
    machine: str

    @property
    def bound_ms(self) -> float:
        """The p99 bound in force: the user's, else batch 1's own p99 here."""
        if self.config.p99_ms is not None:
            return self.config.p99_ms
        return max(t.percentile(99) for t in self.trials if t.config.max_batch_size == 1)

    @property
    def best(self) -> Trial | None:
        """The most throughput among the settings whose p99 is within the bound."""
        within = [t for t in self.trials if t.percentile(99) <= self.bound_ms]
        return max(within, key=lambda t: t.throughput, default=None)

    def record(self, tuned_by: str = "serve") -> dict[str, Any]:
        """What `mahir.json` keeps under `batching`; `tuned_by` names the command that tuned
        (serve or optimize), `machine` where, so a server elsewhere can say so."""
        best = self.best
        if best is None:
            lowest = min(self.trials, key=lambda t: t.percentile(99))
            raise BadInput(
                f"no batching setting kept p99 under {self.bound_ms:g} ms at concurrency "
                f"{self.config.concurrency} (lowest: {lowest.percentile(99):.1f} ms at batch "
                f"{lowest.config.max_batch_size}): raise --p99-ms or lower --tune-concurrency"
            )
        return {
            "max_batch_size": best.config.max_batch_size,
            "max_delay_ms": best.config.max_delay_ms,
            "max_padding": best.config.max_padding,
            "workers": best.config.workers,
            "p99_bound_ms": round(self.bound_ms, 2),
            "concurrency": self.config.concurrency,
            "throughput": round(best.throughput, 1),
            "p50_ms": round(best.percentile(50), 2),
            "p99_ms": round(best.percentile(99), 2),
            "machine": self.machine,
            "tuned_by": tuned_by,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def __rich__(self) -> Table:
        best = self.best
        table = Table(title=f"batching at concurrency {self.config.concurrency}")
        for column in ("batch", "delay ms", "padding", "workers", "req/s", "p50 ms", "p99 ms", ""):
            table.add_column(column, justify="right")
        for t in sorted(self.trials, key=lambda t: -t.throughput):
            c, p99 = t.config, t.percentile(99)
            verdict = "chosen" if t is best else ("" if p99 <= self.bound_ms else "p99 over")
            table.add_row(
                str(c.max_batch_size),
                f"{c.max_delay_ms:g}",
                f"{c.max_padding:g}",
                str(c.workers),
                f"{t.throughput:.1f}",
                f"{t.percentile(50):.2f}",
                f"{p99:.2f}",
                verdict,
            )
        bound = "" if self.config.p99_ms is not None else " (batch 1's)"
        table.caption = f"p99 bound {self.bound_ms:.4g} ms{bound}; {self.machine}"
        return table


def settings(base: BatcherConfig, config: TuneConfig, text: bool) -> list[BatcherConfig]:
    """Every setting the tuner tries: batch sizes x delays (x paddings, for text) x workers.
    Batch 1 is tried once per worker count: a batch that is full at one request neither waits
    nor pads."""
    sizes = [b for b in config.batch_sizes if b <= config.concurrency] or [config.concurrency]
    paddings = config.paddings if text else (base.max_padding,)
    grid = itertools.product(config.workers, sizes, config.delays_ms, paddings)
    once = dict.fromkeys((w, b, d, p) if b > 1 else (w, 1, 0.0, paddings[0]) for w, b, d, p in grid)
    return [
        dataclasses.replace(base, workers=w, max_batch_size=b, max_delay_ms=d, max_padding=p)
        for w, b, d, p in once
    ]


def traffic(opened: OutputDir, count: int, seed: int = 0) -> list[Inputs]:
    """One-item requests shaped like real traffic: generated short-skewed sentences for text
    models (tokenized one by one, as the server does), random tensors otherwise: what the
    model's family makes."""
    return list(opened.family.workload([1], batches_per_size=count, seed=seed).batches[1])


async def tune_batching(
    opened: OutputDir,
    config: TuneConfig,
    *,
    base: BatcherConfig | None = None,
    on_trial: Callable[[int, int], None] = lambda done, total: None,
    sessions: Mapping[int, Session] | None = None,
) -> TuneResult:
    """Time every setting under the same load, interleaved in rounds; see the module note.
    A setting of N workers runs on `sessions[N]` (one worker: `opened.session`)."""
    sequence = opened.spec.sequence_inputs
    on = {1: opened.session, **(sessions or {})}
    lacking = sorted(set(config.workers) - set(on))
    if lacking:
        raise ValueError(f"no session to tune {lacking} workers on: give them in `sessions`")
    candidates = settings(base or BatcherConfig(), config, text=bool(sequence))
    cut = token_outputs(opened.session, opened.spec)
    requests = traffic(opened, 4 * config.concurrency)
    pooled: dict[int, list[float]] = {i: [] for i in range(len(candidates))}
    elapsed = dict.fromkeys(range(len(candidates)), 0.0)
    seconds = config.seconds / config.rounds
    total = len(candidates) * config.rounds
    for round_ in range(config.rounds):
        for i, setting in enumerate(candidates):
            session = on[setting.workers]
            batcher = Batcher(session, setting, sequence_inputs=sequence, token_outputs=cut)
            warm = round_ == 0  # later rounds find the runtime warm at this setting's shapes
            latencies, took = await _closed_loop(
                batcher, requests, config.concurrency, seconds, warm_up=warm
            )
            pooled[i] += latencies
            elapsed[i] += took
            on_trial(round_ * len(candidates) + i + 1, total)
    trials = tuple(Trial(c, elapsed[i], tuple(pooled[i])) for i, c in enumerate(candidates))
    return TuneResult(config, trials, detect(gpus=False).summary())


async def _closed_loop(
    batcher: Batcher,
    requests: Sequence[Inputs],
    concurrency: int,
    seconds: float,
    *,
    warm_up: bool,
) -> tuple[list[float], float]:
    """`concurrency` clients send requests back to back for `seconds` (after one warm-up
    request each, if asked); returns each timed request's latency (ms) and the timed span (s),
    which ends when the last request sent before `seconds` is answered."""
    batcher.start()
    cycle = itertools.cycle(requests)
    latencies: list[float] = []
    try:
        if warm_up:
            await asyncio.gather(*(batcher.submit(next(cycle)) for _ in range(concurrency)))
        started = time.perf_counter()
        stop_at = started + seconds

        async def client() -> None:
            while time.perf_counter() < stop_at:
                sent = time.perf_counter()
                await batcher.submit(next(cycle))
                latencies.append((time.perf_counter() - sent) * 1000)

        await asyncio.gather(*(client() for _ in range(concurrency)))
        return latencies, time.perf_counter() - started
    finally:
        await batcher.stop()
