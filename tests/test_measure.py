"""Measurement with a fake clock and fake sessions that advance it: deterministic, no sleeps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from mahir.errors import Unsupported
from mahir.measure import NOISY_SPREAD, HostTimer, MeasureConfig, measure, resident_mb, timer_for
from mahir.types import CPU, Device, Inputs, Outputs

# Powers of two keep the fake clock's sums exact.
MS = 1 / 1024


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeSession:
    """Advances the clock by `latency(clock time, batch)` per run and records every run."""

    runtime = "fake"
    device = CPU

    def __init__(
        self, name: str, clock: FakeClock, latency: Callable[[float, Inputs], float], log: list[str]
    ) -> None:
        self.name, self.clock, self.latency, self.log = name, clock, latency, log
        self.batches: list[int] = []

    def run(self, inputs: Inputs) -> Outputs:
        self.clock.now += self.latency(self.clock.now, inputs)
        self.log.append(self.name)
        self.batches.append(int(inputs["id"][0, 0]))
        return {}

    def describe(self) -> dict[str, Any]:
        return {}


def batches(n: int = 1, size: int = 4, lengths: list[int] | None = None) -> list[Inputs]:
    """`n` batches marked with their index; with `lengths`, an attention mask per batch."""
    out: list[Inputs] = []
    for i in range(n):
        batch = {"id": np.full((size, 1), i)}
        if lengths is not None:
            mask = np.zeros((size, max(lengths)), dtype=np.int64)
            mask[:, : lengths[i]] = 1
            batch["attention_mask"] = mask
        out.append(batch)
    return out


def constant(latency: float) -> Callable[[float, Inputs], float]:
    return lambda _now, _batch: latency


def fake_sessions(
    *latencies: Callable[[float, Inputs], float],
) -> tuple[FakeClock, dict[str, FakeSession], list[str]]:
    """A shared clock, sessions s0, s1, ... with these latencies, and the log of their runs."""
    clock, log = FakeClock(), list[str]()
    sessions = {f"s{i}": FakeSession(f"s{i}", clock, lat, log) for i, lat in enumerate(latencies)}
    return clock, sessions, log


CONFIG = MeasureConfig(warmup_runs=2, min_time_s=1.0, min_runs=10, round_time_s=0.125)


def test_sessions_take_turns_of_one_round_each() -> None:
    clock, sessions, log = fake_sessions(constant(16 * MS), constant(16 * MS))
    perfs = measure(sessions, batches(), CONFIG, clock=clock)
    assert log[:4] == ["s0", "s0", "s1", "s1"]  # warm-up, untimed
    timed = log[4:]
    # 0.125 s rounds of 16/1024 s runs: 8 runs, then the other session's turn
    assert timed[:24] == ["s0"] * 8 + ["s1"] * 8 + ["s0"] * 8
    for perf in perfs.values():
        assert len(perf.latencies_ms) == 64  # 1 s of timed runs
        assert perf.p50_ms == pytest.approx(16 * MS * 1e3)


def test_warmup_runs_are_not_timed() -> None:
    calls = iter(range(10**6))
    clock, sessions, _ = fake_sessions(lambda _now, _b: 10.0 if next(calls) < 3 else 16 * MS)
    config = MeasureConfig(warmup_runs=3, min_time_s=1.0, round_time_s=0.125)
    perf = measure(sessions, batches(), config, clock=clock)["s0"]
    assert max(perf.latencies_ms) == pytest.approx(16 * MS * 1e3)
    assert len(sessions["s0"].batches) == 3 + len(perf.latencies_ms)


def test_drift_hits_all_sessions_alike_and_is_flagged() -> None:
    # The machine halves its speed after 1 s: timed one after the other, the first session
    # would look 4x faster than the second instead of 2x.
    def slowing(base: float) -> Callable[[float, Inputs], float]:
        return lambda now, _batch: base * (2 if now >= 1.0 else 1)

    clock, sessions, _ = fake_sessions(slowing(1 * MS), slowing(2 * MS))
    config = MeasureConfig(warmup_runs=0, min_time_s=1.0, round_time_s=0.0625)
    perfs = measure(sessions, batches(), config, clock=clock)
    assert perfs["s0"].throughput / perfs["s1"].throughput == pytest.approx(2.0, rel=0.1)
    assert perfs["s0"].noisy
    assert perfs["s1"].noisy


def test_drift_between_rounds_alone_is_flagged() -> None:
    # Only the last of eight rounds runs 25% slower: too few runs to move the quartiles.
    clock, sessions, _ = fake_sessions(lambda now, _b: (20 if now >= 0.875 else 16) * MS)
    perf = measure(sessions, batches(), CONFIG, clock=clock)["s0"]
    assert perf.spread <= NOISY_SPREAD
    assert perf.noisy


def test_one_slow_run_in_a_round_of_one_is_not_drift() -> None:
    # A slow model runs once per round: one hiccup would otherwise look like a 60% drift.
    runs = iter(range(10**6))
    clock, sessions, _ = fake_sessions(lambda _now, _b: 0.375 if next(runs) == 5 else 0.25)
    config = MeasureConfig(warmup_runs=0, min_time_s=3.0, round_time_s=0.125)
    perf = measure(sessions, batches(), config, clock=clock)["s0"]
    assert max(perf.latencies_ms) == 375.0
    assert not perf.noisy


def test_every_session_sees_the_same_batches_in_the_same_order() -> None:
    clock, sessions, _ = fake_sessions(constant(4 * MS), constant(16 * MS))
    measure(sessions, batches(5), CONFIG, clock=clock)
    for session in sessions.values():
        timed = session.batches[CONFIG.warmup_runs :]
        assert timed == [i % 5 for i in range(len(timed))]


def test_perf_numbers_from_known_latencies() -> None:
    lengths = [3, 5]
    per_batch = {0: 8 * MS, 1: 24 * MS}
    clock, sessions, _ = fake_sessions(lambda _now, batch: per_batch[int(batch["id"][0, 0])])
    config = MeasureConfig(warmup_runs=0, min_time_s=1.0, min_runs=10, round_time_s=0.125)
    tokens_per_batch = [4 * n for n in lengths]  # what the family counts (unpadded tokens)
    perf = measure(
        sessions, batches(2, size=4, lengths=lengths), config, clock=clock, tokens=tokens_per_batch
    )["s0"]
    runs = len(perf.latencies_ms)
    expected = [per_batch[i % 2] * 1e3 for i in range(runs)]
    assert list(perf.latencies_ms) == pytest.approx(expected)
    assert perf.p50_ms == pytest.approx(np.percentile(expected, 50))
    assert perf.p90_ms == pytest.approx(np.percentile(expected, 90))
    assert perf.p99_ms == pytest.approx(np.percentile(expected, 99))
    total_s = sum(expected) / 1e3
    assert perf.batch_size == 4
    assert perf.throughput == pytest.approx(4 * runs / total_s)
    tokens = sum(4 * lengths[i % 2] for i in range(runs))
    assert perf.tokens_per_s == pytest.approx(tokens / total_s)
    # batches of different lengths take different times by design: that is not noise
    assert perf.spread == 0.0
    assert not perf.noisy


def test_no_attention_mask_means_no_token_rate() -> None:
    clock, sessions, _ = fake_sessions(constant(16 * MS))
    assert measure(sessions, batches(), CONFIG, clock=clock)["s0"].tokens_per_s is None


def test_jitter_on_the_same_batch_is_noise() -> None:
    runs = iter(range(10**6))
    clock, sessions, _ = fake_sessions(lambda _now, _b: (8 if next(runs) % 2 else 12) * MS)
    perf = measure(sessions, batches(), CONFIG, clock=clock)["s0"]
    assert perf.spread > NOISY_SPREAD
    assert perf.noisy


def test_steady_latencies_are_not_noisy() -> None:
    clock, sessions, _ = fake_sessions(constant(16 * MS))
    perf = measure(sessions, batches(3), CONFIG, clock=clock)["s0"]
    assert perf.spread == 0.0
    assert not perf.noisy


def test_slow_sessions_still_get_min_runs() -> None:
    clock, sessions, _ = fake_sessions(constant(1.0))
    config = MeasureConfig(warmup_runs=0, min_time_s=2.0, min_runs=10, round_time_s=0.25)
    assert len(measure(sessions, batches(), config, clock=clock)["s0"].latencies_ms) == 10


def test_max_runs_bounds_tiny_models() -> None:
    clock, sessions, _ = fake_sessions(constant(MS / 1024))
    config = MeasureConfig(warmup_runs=0, min_time_s=100.0, min_runs=10, max_runs=20)
    assert len(measure(sessions, batches(), config, clock=clock)["s0"].latencies_ms) == 20


def test_progress_rises_to_one_for_every_session() -> None:
    clock, sessions, _ = fake_sessions(constant(16 * MS), constant(32 * MS))
    seen: dict[str, list[float]] = {}
    measure(
        sessions,
        batches(),
        CONFIG,
        clock=clock,
        on_progress=lambda name, f: seen.setdefault(name, []).append(f),
    )
    assert set(seen) == {"s0", "s1"}
    for fractions in seen.values():
        assert fractions == sorted(fractions)
        assert fractions[-1] == 1.0
        assert 0 < fractions[0] < 1.0


def test_batches_must_share_a_batch_size() -> None:
    clock, sessions, _ = fake_sessions(constant(16 * MS))
    with pytest.raises(ValueError, match="batch size"):
        measure(sessions, [*batches(size=4), *batches(size=8)], CONFIG, clock=clock)


def test_nothing_to_measure_is_an_error() -> None:
    clock, sessions, _ = fake_sessions(constant(16 * MS))
    with pytest.raises(ValueError, match="at least one"):
        measure(sessions, [], CONFIG, clock=clock)
    with pytest.raises(ValueError, match="at least one"):
        measure({}, batches(), CONFIG, clock=clock)


def test_a_clock_that_never_moves_is_an_error() -> None:
    clock, sessions, _ = fake_sessions(constant(0.0))
    config = MeasureConfig(warmup_runs=0, max_runs=10)
    with pytest.raises(ValueError, match="no time pass"):
        measure(sessions, batches(), config, clock=clock)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"warmup_runs": -1},
        {"min_time_s": -0.5},
        {"min_runs": 0},
        {"min_runs": 10, "max_runs": 5},
        {"round_time_s": 0.0},
    ],
)
def test_config_rejects_nonsense(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        MeasureConfig(**kwargs)


def test_resident_memory_is_this_process_rss() -> None:
    """Read against the kernel's own count; an allocation-growth test is flaky in a long run,
    where the allocator hands back pages that are already resident."""
    import os
    from pathlib import Path

    pages = int(Path("/proc/self/statm").read_text().split()[1])
    kernel_mb = pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    assert abs(resident_mb() - kernel_mb) < 16


def test_cpu_sessions_are_timed_by_the_host_clock_and_say_so() -> None:
    clock = FakeClock()
    timer = timer_for(CPU, clock)
    assert isinstance(timer, HostTimer)
    timer.start()
    clock.now += 0.25
    assert timer.stop() == 0.25
    _, sessions, _ = fake_sessions(constant(16 * MS))
    perf = measure(sessions, batches(), CONFIG, clock=sessions["s0"].clock)["s0"]
    assert perf.device == "cpu"


def test_a_gpu_is_timed_by_cuda_events_or_refused_where_torch_sees_none() -> None:
    import torch

    if torch.cuda.is_available():
        assert type(timer_for(Device.parse("cuda"))).__name__ == "CudaTimer"
    else:
        with pytest.raises(Unsupported, match=r"cannot time cuda:0: torch sees 0 CUDA device"):
            timer_for(Device.parse("cuda"))
