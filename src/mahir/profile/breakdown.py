"""What each runtime's profiler hands back: the ops it ran, each timed and costed, and the
latency of the same call measured apart from the profiler.

An op's time is its median over the profiled runs (the first runs, which allocate and pick
kernels, are left out), so one slow run moves nothing. Each profiled call is also timed apart
from the profiler, by the device's own timer around the call (`measure.timer_for`): its ops'
times over its own time say how much of that call the profiler saw, and the median over the
calls (`coverage`) how much of a call it sees; the rest is the runtime's own work between ops
(and, on a GPU, time it sat idle). Each call is paired with its own ops, so a call that another
process stalled between ops moves one ratio of many, not the answer. The latency a user
sees is timed after, by `measure.py`, on the same session and batch with the profiler off where
the runtime allows it: the roofline divides by it.

Sits in profile/: imports measure, types and cost.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mahir.measure import MeasureConfig, measure, timer_for
from mahir.profile.cost import OpCost
from mahir.types import Inputs, Perf, Session

WARMUP_RUNS = 3
"""Profiled runs left out first: allocation, kernel choice, caches."""


@dataclass(frozen=True, slots=True)
class OpTime:
    """One op as it ran: its name, type, where or how it ran, its median time, its cost."""

    name: str
    op_type: str
    seconds: float
    cost: OpCost | None
    """None when its shapes were not known (then it has no place on the roofline)."""
    exec_type: str = ""
    """How the runtime ran it: OpenVINO's primitive ("brgemm_avx512_f32"), ONNX Runtime's
    provider, torch's device."""
    precision: str | None = None
    """The precision the runtime says it ran in, where it says (OpenVINO); else the cost's."""

    @property
    def computes_in(self) -> str:
        if self.precision is not None:
            return self.precision
        return self.cost.precision if self.cost is not None else "fp32"


@dataclass(frozen=True, slots=True)
class GpuTime:
    """What a GPU did during one call: kernels, and the host's work to launch them."""

    kernel_s: float
    """Sum of the kernels' times (the GPU busy)."""
    kernels: int
    launch_s: float
    """Host time in CUDA launch calls."""


@dataclass(frozen=True, slots=True)
class Breakdown:
    """A runtime profiler's answer for one batch."""

    ops: tuple[OpTime, ...]
    latency: Perf
    """The same call timed by `measure.py`, the profiler off where the runtime allows."""
    calls: tuple[tuple[float, float], ...]
    """Each profiled call: the seconds of its ops, and its seconds by the device's timer."""
    settings: dict[str, Any]
    trace: list[dict[str, Any]] | None = None
    """Chrome trace events, where the runtime's profiler gives them."""
    gpu: GpuTime | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def op_seconds(self) -> float:
        return sum(op.seconds for op in self.ops)

    @property
    def call_s(self) -> float:
        """The median profiled call, by the device's timer."""
        return statistics.median(wall for _, wall in self.calls) if self.calls else 0.0

    @property
    def coverage(self) -> float:
        """The median over profiled calls of the share of each that its ops took."""
        shares = [ops / wall for ops, wall in self.calls if wall > 0]
        return statistics.median(shares) if shares else 0.0


def paired(
    runs: Sequence[Mapping[str, float]], walls: Sequence[float]
) -> tuple[tuple[float, float], ...]:
    """Each call's op seconds (`runs`: op name -> seconds) beside its timed seconds."""
    return tuple((sum(run.values()), wall) for run, wall in zip(runs, walls, strict=True))


def median_times(runs: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Each op's median seconds over `runs` (op name -> seconds in one run); an op missing from
    a run counts 0 there (it did not run)."""
    names = dict.fromkeys(name for run in runs for name in run)
    return {name: statistics.median(run.get(name, 0.0) for run in runs) for name in names}


def timed(session: Session, batch: Inputs) -> float:
    """Seconds of one call of `session` on `batch`, by its device's timer."""
    timer = timer_for(session.device)
    timer.start()
    session.run(batch)
    return timer.stop()


def time_latency(session: Session, batch: Inputs, seconds: float) -> Perf:
    """`session` on `batch` timed by `measure` for about `seconds`, at least 10 runs."""
    config = MeasureConfig(warmup_runs=2, min_time_s=seconds, min_runs=10, round_time_s=0.1)
    return measure({session.runtime: session}, [batch], config)[session.runtime]
