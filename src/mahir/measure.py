"""Honest latency and throughput: several sessions timed interleaved on the same batches.

Every session is warmed up, then the sessions take turns: in each round each one runs
consecutive batches for about `round_time_s`, until each has enough timed time and runs. Drift
of the machine (turbo, thermals, a noisy neighbour) thus hits all sessions alike, and all see the
same batches in the same order. The result says whether it is too noisy to trust small
differences, and how many cores other processes kept busy meanwhile (`MachineLoad`): a number
taken on a busy machine is not that machine's. Each run is timed by the `Timer` of the
session's device (`timer_for`): the host clock for the CPU, whose runs return when their work is
done; CUDA events between device synchronisations for a GPU, whose work may still be queued
when a call returns. This room sees only `Session` objects and numpy arrays; it imports numpy,
psutil, the standard library and mahir's types, and torch only inside the CUDA timer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import psutil

from mahir.errors import Unsupported
from mahir.types import Device, Inputs, Perf, Session

# Above these, a difference of a few percent between two sessions may be noise. 10% is what
# repeated runs on the 2-core CI machines stay within when nothing else runs; beyond it the
# machine (throttling, neighbours) is moving under us.
NOISY_SPREAD = 0.10
"""Inter-quartile range over median of the latencies."""
NOISY_DRIFT = 0.10
"""Largest minus smallest round median, over the overall median."""
BUSY_CORES = 0.25
"""Other processes' average CPU use, in cores, above which timings are flagged as taken on a
busy machine. An idle 2-core machine shows 0.01-0.05 (the kernel, our own progress output);
one other busy process shows ~1."""


class MachineLoad:
    """CPU time the rest of the machine used while a measurement ran: everything busy on the
    machine minus this process's own threads (`own_seconds`), over the wall time."""

    def __init__(
        self,
        *,
        machine_seconds: Callable[[], float] = lambda: _busy_seconds(psutil.cpu_times()),
        own_seconds: Callable[[], float] = lambda: own_seconds(),
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._machine_seconds, self._own_seconds, self._clock = machine_seconds, own_seconds, clock
        self._started, self._machine, self._own = clock(), machine_seconds(), own_seconds()

    def other_cores(self) -> float:
        """Cores other processes kept busy on average since this was created."""
        wall = self._clock() - self._started
        if wall <= 0:
            return 0.0
        machine = self._machine_seconds() - self._machine
        own = self._own_seconds() - self._own
        return max(0.0, machine - own) / wall


def load_summary(perfs: Iterable[Perf]) -> dict[str, Any]:
    """What other processes did to a set of timings: the mean and worst cores they kept busy,
    and whether that passes `BUSY_CORES`, with one sentence for people when it does."""
    loads = [p.other_load for p in perfs]
    worst = max(loads, default=0.0)
    busy = worst > BUSY_CORES
    note = None
    if busy:
        note = (
            f"the machine was busy: other processes kept {worst:.2f} cores busy while timing "
            f"(mean {sum(loads) / len(loads):.2f}); speedups can be far from what a quiet "
            "machine gives (PyTorch's threads stall first). Time again with the machine to "
            "yourself"
        )
    return {
        "other_cores_mean": sum(loads) / len(loads) if loads else 0.0,
        "other_cores_max": worst,
        "threshold": BUSY_CORES,
        "busy": busy,
        "note": note,
    }


def _busy_seconds(times: Any) -> float:
    """All CPU time not idle (iowait counts as idle: no core was computing)."""
    idle = times.idle + getattr(times, "iowait", 0.0)
    return float(
        sum(times) - idle - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    )


def own_seconds(*, children: bool = False) -> float:
    """CPU time of this process, and with `children` of its live child processes too: for a
    measurement whose work runs in a worker process (vLLM's engine), which is not load."""
    me = psutil.Process()
    total = 0.0
    for process in [me, *(me.children(recursive=True) if children else [])]:
        with suppress(psutil.NoSuchProcess):  # a child that just exited
            times = process.cpu_times()
            total += times.user + times.system
    return total


class Timer(Protocol):
    """Times one run where its work happens: `start()`, the run, then `stop()`."""

    def start(self) -> None: ...

    def stop(self) -> float:
        """Seconds since `start`, once everything the run asked of the device is done."""
        ...


class HostTimer:
    """The host's clock: a CPU session's run returns when its work is done."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._started = 0.0

    def start(self) -> None:
        self._started = self._clock()

    def stop(self) -> float:
        return self._clock() - self._started


class CudaTimer:
    """CUDA events on one GPU. The device is synchronised before the start event, so work queued
    earlier is not billed to this run, and after the end event, so work the run queued but did
    not wait for is. Both events are recorded from the host around the run on an idle device,
    so the time is the run's as its caller sees it, transfers and host work included."""

    def __init__(self, index: int) -> None:
        import torch  # only a GPU measurement needs torch here

        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise Unsupported(f"cannot time cuda:{index}: torch sees {seen} CUDA device(s) here")
        self._device = torch.device("cuda", index)
        self._begin = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        self._end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]

    def start(self) -> None:
        import torch

        torch.cuda.synchronize(self._device)
        self._begin.record(torch.cuda.current_stream(self._device))

    def stop(self) -> float:
        import torch

        self._end.record(torch.cuda.current_stream(self._device))
        torch.cuda.synchronize(self._device)
        return float(self._begin.elapsed_time(self._end)) / 1e3  # elapsed_time gives ms


def timer_for(device: Device, clock: Callable[[], float] = time.perf_counter) -> Timer:
    """The timer that is right for `device`: `clock` on the CPU, CUDA events on a GPU."""
    if device.kind == "cuda":
        return CudaTimer(device.index)
    return HostTimer(clock)


@dataclass(frozen=True, slots=True)
class MeasureConfig:
    warmup_runs: int = 3
    """Untimed runs per session first: lazy initialisation, caches, allocator, JIT."""
    min_time_s: float = 2.0
    """Timed time each session needs at least, summed over its runs."""
    min_runs: int = 10
    """Timed runs each session needs at least, so percentiles of slow models mean something."""
    max_runs: int = 100_000
    """Timed runs after which a session stops, whatever its time: bounds tiny models' memory."""
    round_time_s: float = 0.25
    """How long one session runs before the next takes its turn; shorter interleaves finer."""

    def __post_init__(self) -> None:
        if self.warmup_runs < 0:
            raise ValueError(f"warmup_runs must be >= 0, got {self.warmup_runs}")
        if self.min_time_s < 0:
            raise ValueError(f"min_time_s must be >= 0, got {self.min_time_s}")
        if self.min_runs < 1:
            raise ValueError(f"min_runs must be >= 1, got {self.min_runs}")
        if self.max_runs < self.min_runs:
            raise ValueError(f"max_runs ({self.max_runs}) must be >= min_runs ({self.min_runs})")
        if self.round_time_s <= 0:
            raise ValueError(f"round_time_s must be > 0, got {self.round_time_s}")


@dataclass
class _Timings:
    """One session's timed runs: latency in seconds and batch index, grouped by round."""

    rounds: list[list[tuple[float, int]]] = field(default_factory=list)
    runs: int = 0
    total_s: float = 0.0

    def fraction_done(self, config: MeasureConfig) -> float:
        if self.runs >= config.max_runs:
            return 1.0
        by_time = self.total_s / config.min_time_s if config.min_time_s > 0 else 1.0
        return min(1.0, by_time, self.runs / config.min_runs)


def measure(
    sessions: Mapping[str, Session],
    batches: Sequence[Inputs],
    config: MeasureConfig = MeasureConfig(),
    *,
    clock: Callable[[], float] = time.perf_counter,
    on_progress: Callable[[str, float], None] | None = None,
    tokens: Sequence[int] | None = None,
) -> dict[str, Perf]:
    """Time every session on `batches` (cycled), interleaved, each by its device's timer
    (`clock` is the host's, for CPU sessions and rounds); one `Perf` per session name.
    `tokens`: the real (unpadded) tokens of each batch, for tokens/s (`Family.token_lengths`)."""
    if not sessions or not batches:
        raise ValueError("measure needs at least one session and one batch")
    batch_size = _batch_size(batches)
    timers = {name: timer_for(session.device, clock) for name, session in sessions.items()}
    for session in sessions.values():
        for i in range(config.warmup_runs):
            session.run(batches[i % len(batches)])
    timings = {name: _Timings() for name in sessions}
    load = MachineLoad()
    while pending := [n for n, t in timings.items() if t.fraction_done(config) < 1.0]:
        for name in pending:
            _take_turn(sessions[name], batches, config, clock, timers[name], timings[name])
            if on_progress is not None:
                on_progress(name, timings[name].fraction_done(config))
    other = load.other_cores()
    return {
        name: replace(
            _perf(t, tokens, batch_size), other_load=other, device=str(sessions[name].device)
        )
        for name, t in timings.items()
    }


def _take_turn(
    session: Session,
    batches: Sequence[Inputs],
    config: MeasureConfig,
    clock: Callable[[], float],
    timer: Timer,
    timings: _Timings,
) -> None:
    """Run consecutive batches for one round, stopping early once the session has enough."""
    runs: list[tuple[float, int]] = []
    start = clock()
    while True:
        index = timings.runs % len(batches)
        timer.start()
        session.run(batches[index])
        latency = timer.stop()
        runs.append((latency, index))
        timings.runs += 1
        timings.total_s += latency
        if clock() - start >= config.round_time_s or timings.fraction_done(config) >= 1.0:
            break
    timings.rounds.append(runs)


def _batch_size(batches: Sequence[Inputs]) -> int:
    sizes = set()
    for batch in batches:
        if not batch:
            raise ValueError("a batch has no inputs")
        sizes.add(next(iter(batch.values())).shape[0])
    if len(sizes) != 1:
        raise ValueError(f"all batches in one measurement must share a batch size, got {sizes}")
    return int(sizes.pop())


def _perf(timings: _Timings, tokens: Sequence[int] | None, batch_size: int) -> Perf:
    runs = [run for round_ in timings.rounds for run in round_]
    if timings.total_s <= 0:
        raise ValueError(f"the clock saw no time pass in {len(runs)} runs: use a finer clock")
    latencies = np.array([latency for latency, _ in runs])
    p50, p90, p99 = np.percentile(latencies * 1e3, [50, 90, 99])
    tokens_per_s = None
    if tokens is not None:
        tokens_per_s = sum(tokens[index] for _, index in runs) / timings.total_s
    spread, drift = _noise(timings.rounds)
    return Perf(
        batch_size=batch_size,
        latencies_ms=tuple(float(x) for x in latencies * 1e3),
        p50_ms=float(p50),
        p90_ms=float(p90),
        p99_ms=float(p99),
        throughput=batch_size * len(runs) / timings.total_s,
        tokens_per_s=tokens_per_s,
        spread=spread,
        noisy=spread > NOISY_SPREAD or drift > NOISY_DRIFT,
    )


def _noise(rounds: list[list[tuple[float, int]]]) -> tuple[float, float]:
    """Spread and drift of the machine, not of the workload: batches of different lengths take
    different times by design, so each latency is taken relative to the median of its own batch
    (batches run only once carry no such information and are left out, unless all are)."""
    by_batch: dict[int, list[float]] = {}
    for latency, index in (run for round_ in rounds for run in round_):
        by_batch.setdefault(index, []).append(latency)
    repeated = [i for i, values in by_batch.items() if len(values) > 1]
    if repeated:
        reference = {i: float(np.median(by_batch[i])) for i in repeated}
    else:  # every batch ran once: only the raw latencies are left to judge by
        overall = float(np.median([values[0] for values in by_batch.values()]))
        reference = dict.fromkeys(by_batch, overall)
    relative = [
        [latency / reference[i] for latency, i in round_ if reference.get(i, 0.0) > 0]
        for round_ in rounds
    ]
    values = [x for round_ in relative for x in round_]
    if not values:  # a clock too coarse to see any run
        return 0.0, 0.0
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    # A round of one or two runs has one run's noise, which the spread already judges.
    round_medians = [float(np.median(r)) for r in relative if len(r) >= 3] or [float(median)]
    drift = (max(round_medians) - min(round_medians)) / median
    return float((q3 - q1) / median), float(drift)


def resident_mb() -> float:
    """Resident memory of this process in MiB, to record what opening a session adds."""
    return float(psutil.Process().memory_info().rss) / 2**20


@contextmanager
def memory_added(device: Device) -> Iterator[list[float]]:
    """MiB the block adds on `device`, in the yielded list once it ends: resident memory on the
    CPU (never below 0: RSS shrinks when Python frees); on a GPU, the peak of torch's allocation
    during the block above what was allocated before it (weights, activations, CUDA graph
    pools)."""
    added: list[float] = []
    if device.kind == "cpu":
        before = resident_mb()
        yield added
        added.append(max(0.0, resident_mb() - before))
        return
    import torch

    start = torch.cuda.memory_allocated(device.index)
    torch.cuda.reset_peak_memory_stats(device.index)
    yield added
    added.append(max(0, torch.cuda.max_memory_allocated(device.index) - start) / 2**20)
