"""The search: build each candidate, reject what misses the quality budget, time the rest.

The invariant that makes the answer trustworthy: a candidate is timed only after its outputs
met the budget, first on a small sample (the cheap check that rejects most bad candidates in
seconds), then on every batch it will be timed on; and every timing is taken interleaved with
the baseline (the original as given: PyTorch eager fp32, or an ONNX file on ONNX Runtime) in
the same rung, so a candidate's speedup is a ratio of two
medians measured side by side, never of numbers from different moments. Timing is successive
halving: all survivors get a short measurement, the faster half a twice longer one, and so on,
so the final few get the most precise numbers. Candidates are ranked by that same-rung speedup.

`Search.run` is the whole search: check each candidate in order (building stops once only the
timing's share of the budget is left), then halve the survivors until one is left or the
budget ends. Ctrl-C or the time budget stop the search between steps, never inside a result:
what was measured stays, what was not is marked skipped with the reason. Sits above passes and
runtimes; knows nothing of reports, files or the terminal.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from mahir.errors import BadInput, MahirError, first_line
from mahir.families import real_tokens
from mahir.measure import MeasureConfig, measure
from mahir.model import Model
from mahir.quality import fidelity
from mahir.runtimes import get_runtime, open_session
from mahir.search.budget import FidelityBudget, MetricBudget, metric_outputs, score
from mahir.search.builder import ArtifactBuilder
from mahir.search.candidates import Candidate, Objective
from mahir.types import Artifact, Outputs, Perf, Quality, Session
from mahir.workload import Batch

Status = Literal["ok", "rejected", "failed", "skipped"]
Budget = FidelityBudget | MetricBudget
Events = Callable[[str, str], None]
"""(candidate id, what happened): progress for a terminal or a log."""
Reopen = Callable[["Candidate"], "tuple[Outcome, Artifact] | None"]
"""An earlier run's outcome of a candidate it checked but did not time, with the artifact to
time it on (`--resume`); None when there is none."""
Checked = Callable[["Outcome", "Artifact | None"], None]
"""Called with each outcome this run checked, and its artifact when it passed."""


@dataclass
class Outcome:
    """What became of one candidate. `perf` and `baseline_perf` come from the same rung."""

    candidate: Candidate
    status: Status
    reason: str | None = None
    quality: Quality | None = None
    """Fidelity on everything the search judged by: the check sample, the timing batches and
    the held-out inputs no pass tuned on."""
    tuned_quality: Quality | None = None
    """Fidelity on the calibration inputs the passes tuned on, for comparison: a candidate
    that is much better here than in `quality` was fitted to its calibration."""
    metric: float | None = None
    perf: dict[int, Perf] = field(default_factory=dict)
    baseline_perf: dict[int, Perf] = field(default_factory=dict)
    rounds: int = 0
    speedups: list[float] = field(default_factory=list)
    """Speedup in each timing round it took part in: losers are compared with the winner at
    the round they were dropped in, both measured beside the same baseline run."""
    build_s: float = 0.0
    size_mb: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    cached: bool = False
    """Measured by an earlier run (`--resume`), not in this one."""

    def speedup(self, objective: Objective) -> float | None:
        """This candidate over the baseline timed beside it: p50 ratio at the smallest batch
        (latency) or best samples/s ratio over the batch sizes (throughput)."""
        if not self.perf or not self.baseline_perf:
            return None
        if objective == "latency":
            size = min(self.perf)
            return self.baseline_perf[size].p50_ms / self.perf[size].p50_ms
        best = max(p.throughput for p in self.perf.values())
        return best / max(p.throughput for p in self.baseline_perf.values())


@dataclass(frozen=True)
class Evidence:
    """The inputs every candidate is judged on, and the original's outputs on them."""

    check: Sequence[Batch]
    """The cheap first check: a few traffic-shaped batches and shapes unlike them."""
    check_reference: Sequence[Outputs]
    timing: Mapping[int, Sequence[Batch]]
    """Batches per batch size that timing runs on; fidelity is checked on them all first."""
    timing_reference: Mapping[int, Sequence[Outputs]]
    budget: Budget
    metric_data: Sequence[Batch] = ()
    """The user's data as batches, when a user metric decides."""
    held_out: Sequence[Batch] = ()
    """Inputs no pass tuned on, from very short to the maximum length: the budget holds on
    them too (`workload.held_out_batches`)."""
    held_out_reference: Sequence[Outputs] = ()
    calibration: Sequence[Batch] = ()
    """What the passes calibrated and tuned on: measured for the report, not judged."""
    calibration_reference: Sequence[Outputs] = ()


@dataclass
class Search:
    model: Model
    builder: ArtifactBuilder
    evidence: Evidence
    objective: Objective
    baseline: str
    """The baseline candidate's id: timed in every rung, the denominator of every speedup."""
    deadline: float | None = None
    """time.monotonic() after which no new work starts; None: no time budget."""
    build_deadline: float | None = None
    """time.monotonic() after which no candidate is built, leaving the rest for timing."""
    on_event: Events = lambda _id, _text: None
    sessions: dict[str, Session] = field(default_factory=dict)
    artifacts: dict[str, Artifact] = field(default_factory=dict)

    def run(
        self,
        proposed: Sequence[Candidate],
        batch_sizes: int,
        *,
        done: Mapping[str, Outcome] = {},
        reopen: Reopen = lambda _: None,
        on_checked: Checked = lambda _o, _a: None,
    ) -> Searched:
        """The whole search over `proposed` (the baseline first), timed at `batch_sizes` sizes.
        `done` holds earlier outcomes to take as they stand, `reopen` earlier checked ones to
        time without building again; `on_checked` hears of each candidate checked here."""
        outcomes: list[Outcome] = []
        complete = True
        try:
            for candidate in proposed:
                if candidate.id in done:
                    outcome = done[candidate.id]
                    self.on_event(candidate.id, f"{outcome.status} in an earlier run (resumed)")
                elif candidate is not proposed[0] and self._building_time_spent():
                    self.on_event(candidate.id, "time budget: no more building")
                    break
                elif (reopened := self._reopen(candidate, reopen)) is not None:
                    outcome = reopened
                else:
                    outcome = self.check(candidate)
                    on_checked(outcome, self.artifacts.get(candidate.id))
                outcomes.append(outcome)
            if self.sessions:
                left = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
                rung_s = first_rung_seconds(left, len(self.sessions) - 1, batch_sizes)
                self.time_survivors(outcomes, rung_s)
        except KeyboardInterrupt:
            complete = False
            self.on_event(self.baseline, "interrupted: keeping what was measured")
        reached = {o.candidate.id for o in outcomes}
        reason = "time budget spent before it was built" if complete else "interrupted"
        outcomes += [Outcome(c, "skipped", reason=reason) for c in proposed if c.id not in reached]
        ranked = rank(outcomes, self.objective)
        return Searched(outcomes, ranked[0] if ranked else None, complete)

    def _building_time_spent(self) -> bool:
        return self.build_deadline is not None and time.monotonic() > self.build_deadline

    def _reopen(self, candidate: Candidate, reopen: Reopen) -> Outcome | None:
        """An earlier run's checked candidate with its session open again and its recorded
        quality standing; None when there is none or it cannot be opened, so it is built."""
        recipe = candidate.recipe
        try:
            earlier = reopen(candidate)
            if earlier is None:
                return None
            outcome, artifact = earlier
            self.sessions[candidate.id] = open_session(recipe.runtime, artifact, recipe.options)
        except (MahirError, OSError) as err:
            self.on_event(candidate.id, f"cannot reopen ({first_line(err)}): building it again")
            return None
        self.artifacts[candidate.id] = artifact
        self.on_event(candidate.id, "passed the quality check in an earlier run (resumed)")
        return dataclasses.replace(outcome, cached=False)  # timed in this run

    def check(self, candidate: Candidate) -> Outcome:
        """Build the candidate and judge its outputs; keep its session open when it passes."""
        started = time.monotonic()
        recipe = candidate.recipe
        try:
            self.on_event(candidate.id, "building")
            artifact = self.builder.build(recipe.steps, get_runtime(recipe.runtime).formats)
            session = open_session(recipe.runtime, artifact, recipe.options)
            outcome = Outcome(candidate, "ok", settings=session.describe())
            self._judge(outcome, session)
        except Exception as err:  # a candidate that crashes fails alone; the search goes on
            reason = f"{type(err).__name__}: {first_line(err)}"
            outcome = Outcome(candidate, "failed", reason=reason)
        outcome.build_s = time.monotonic() - started
        if outcome.status == "ok":
            self.sessions[candidate.id] = session
            self.artifacts[candidate.id] = artifact
            outcome.size_mb = artifact.size_mb()
        self.on_event(candidate.id, outcome.reason or "passed the quality check")
        return outcome

    def _judge(self, outcome: Outcome, session: Session) -> None:
        evidence = self.evidence
        sample = fidelity(self.model, session, evidence.check, evidence.check_reference)
        outcome.quality = sample
        if isinstance(self.evidence.budget, MetricBudget):
            outcome.metric = self._metric(session, self.evidence.budget)
            outcome.reason = self.evidence.budget.judge(outcome.metric)
        elif (reason := self.evidence.budget.judge(sample)) is not None:
            outcome.reason = reason
        else:
            batches = [b for size in evidence.timing for b in evidence.timing[size]]
            refs = [r for size in evidence.timing for r in evidence.timing_reference[size]]
            full = fidelity(
                self.model,
                session,
                [*evidence.check, *batches, *evidence.held_out],
                [*evidence.check_reference, *refs, *evidence.held_out_reference],
            )
            outcome.quality = full
            outcome.reason = self.evidence.budget.judge(full)
        if evidence.calibration:
            outcome.tuned_quality = fidelity(
                self.model, session, evidence.calibration, evidence.calibration_reference
            )
        if outcome.reason is not None:
            outcome.status = "rejected"

    def _metric(self, session: Session, budget: MetricBudget) -> float:
        outputs = metric_outputs(self.model, session, self.evidence.metric_data)
        return score(budget.metric, budget.name, outputs, budget.data)

    def time_survivors(self, outcomes: Sequence[Outcome], first_rung_s: float) -> None:
        """Successive halving over the candidates with open sessions, baseline in every rung."""
        baseline = next(o for o in outcomes if o.candidate.id == self.baseline)
        if self.baseline not in self.sessions:
            raise BadInput(
                f"the baseline, {baseline.candidate.label}, cannot run this model "
                f"({baseline.reason}): nothing can be timed against it"
            )
        contenders = [
            o
            for o in outcomes
            if o.candidate.id in self.sessions and not o.cached and o is not baseline
        ]
        seconds, predicted_s = first_rung_s, 0.0
        while True:
            # The first rung always runs: without it nothing, not even the baseline, is timed.
            if (
                self.deadline is not None
                and predicted_s
                and time.monotonic() + predicted_s > self.deadline
            ):
                self.on_event(self.baseline, "time budget spent: the halving stops here")
                return
            entrants = [baseline, *contenders]
            started = time.monotonic()
            self._rung(entrants, seconds)
            if len(contenders) <= 1:
                return
            contenders.sort(key=lambda o: -(o.speedup(self.objective) or 0.0))
            contenders = contenders[: math.ceil(len(contenders) / 2)]
            # The next rung: twice the time for each of fewer entrants.
            predicted_s = (time.monotonic() - started) * 2 * (len(contenders) + 1) / len(entrants)
            seconds *= 2

    def _rung(self, entrants: Sequence[Outcome], seconds: float) -> None:
        names = ", ".join(o.candidate.id for o in entrants)
        self.on_event(self.baseline, f"timing {len(entrants)} for {seconds:.1f} s each: {names}")
        config = MeasureConfig(
            warmup_runs=2, min_time_s=seconds, min_runs=5, round_time_s=min(0.25, seconds / 4)
        )
        sessions = {o.candidate.id: self.sessions[o.candidate.id] for o in entrants}
        # Every batch size timed before any is kept: a rung cut short (Ctrl-C, between sizes)
        # leaves each outcome's numbers all from one earlier round, never from two.
        rung = {
            size: measure(sessions, b, config, tokens=real_tokens(self.model.family, b))
            for size, b in self.evidence.timing.items()
        }
        for size, perfs in rung.items():
            for outcome in entrants:
                outcome.perf[size] = perfs[outcome.candidate.id]
                outcome.baseline_perf[size] = perfs[self.baseline]
        for outcome in entrants:
            outcome.rounds += 1
            speedup = outcome.speedup(self.objective) or 0.0
            outcome.speedups.append(speedup)
            self.on_event(outcome.candidate.id, f"{speedup:.2f}x the baseline")


@dataclass
class Searched:
    """What a search found: every outcome, the best within budget, whether it ran to the end
    (False when Ctrl-C or the time budget cut it short)."""

    outcomes: list[Outcome]
    best: Outcome | None
    complete: bool


def first_rung_seconds(time_left_s: float | None, contenders: int, batch_sizes: int) -> float:
    """Per-candidate timing in the first rung: 1 s without a budget, else what lets about
    log2(n) + 1 rungs (each twice as long per entrant, half as many entrants) fit."""
    if time_left_s is None:
        return 1.0
    rungs = math.ceil(math.log2(max(contenders, 1))) + 1
    share = time_left_s / (rungs * (contenders + 1) * batch_sizes * 1.5)
    return min(2.0, max(0.3, share))


def comparable_speedup(outcome: Outcome, anchor: Outcome, objective: Objective) -> float | None:
    """`outcome`'s speedup on the scale of `anchor`'s final round (the winner's, which took
    part in every round): its speedup in the last round it was timed in, times how far the
    anchor's moved from that round to its last. Its ratio to the anchor's speedup is then the
    ratio measured side by side in that round, so a table or a Pareto front built on these
    numbers never compares speedups taken at different moments (a busy round inflates every
    speedup in it alike). Outcomes from another run (resumed) keep their own numbers."""
    own = outcome.speedup(objective)
    rounds = len(outcome.speedups)
    if own is None or outcome is anchor or outcome.cached or anchor.cached:
        return own
    if not rounds or len(anchor.speedups) < rounds or anchor.speedups[rounds - 1] <= 0:
        return own
    return outcome.speedups[-1] * anchor.speedups[-1] / anchor.speedups[rounds - 1]


def rank(outcomes: Sequence[Outcome], objective: Objective) -> list[Outcome]:
    """Timed candidates within budget, best first: most timing rounds, then speedup."""
    timed = [o for o in outcomes if o.status == "ok" and o.perf]
    return sorted(timed, key=lambda o: (-o.rounds, -(o.speedup(objective) or 0.0)))
