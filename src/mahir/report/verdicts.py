"""What a report says, in numbers and in words: the view of a report.json that both the page and
the terminal read, the Pareto front, and one plain sentence per candidate on why it won or lost.

Reads report.json through its typed records (`schema.py`) only. Losers are compared with the
winner at the timing round they were dropped in, both measured beside the same baseline run,
since raw numbers from different rounds also hold the machine's drift between them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from mahir.report import plots as look
from mahir.report.schema import CandidateRecord as Candidate
from mahir.report.schema import PerfRecord, QualityRecord, Report


@dataclass(frozen=True, slots=True)
class View:
    """What every part of the page needs, read from the report once."""

    report: Report
    objective: str
    fidelity: str
    """The quality key the budget judges: "cosine_min", or "metric" when a user metric decides."""
    candidates: tuple[Candidate, ...]
    winner: Candidate | None
    baseline: Candidate | None
    front: tuple[str, ...]

    @property
    def baseline_name(self) -> str:
        """What every speedup is over: PyTorch eager fp32, or an ONNX source on ONNX Runtime."""
        return self.baseline.label if self.baseline is not None else "the baseline"

    def role(self, c: Candidate) -> str:
        """A key of `ROLES`: the candidate's status, with the winner and baseline singled out."""
        if self.winner is not None and c.id == self.winner.id:
            return "winner"
        if self.baseline is not None and c.id == self.baseline.id and c.status == "ok":
            return "baseline"
        return c.status


def read_view(report: Report) -> View:
    objective = report.objective
    fidelity = "metric" if report.budget.kind == "metric" else "cosine_min"
    candidates = tuple(report.candidates)
    by_id = {c.id: c for c in candidates}
    front = tuple(pareto_front(candidates, objective=objective, fidelity=fidelity))
    winner = None if report.best is None else by_id.get(report.best)
    baseline = None if report.baseline is None else by_id.get(report.baseline)
    return View(report, objective, fidelity, candidates, winner, baseline, front)


def headline_perf(c: Candidate, objective: str) -> tuple[int, PerfRecord] | None:
    """The timing the objective judges: the smallest batch (batch 1) for latency, the batch with
    the most samples/s for throughput; None when the candidate was never timed."""
    perf = c.perf
    if not perf:
        return None
    size = max(perf, key=lambda b: perf[b].throughput) if objective == "throughput" else min(perf)
    return size, perf[size]


def headline_speed(c: Candidate, objective: str) -> float | None:
    timed = headline_perf(c, objective)
    if timed is None:
        return None
    return timed[1].throughput if objective == "throughput" else timed[1].p50_ms


def rank_cost(c: Candidate, objective: str) -> float:
    """Lower is better: minus the speedup over the baseline timed beside it (the comparison
    that survives machine drift between timing rounds), else p50 ms or minus samples/s;
    infinite when never timed."""
    speed = headline_speed(c, objective)
    if speed is None:
        return math.inf
    if c.speedup:
        return -c.speedup
    return -speed if objective == "throughput" else speed


def fidelity_value(c: Candidate, key: str) -> float | None:
    return None if c.quality is None else c.quality.get(key)


def pareto_front(
    candidates: Sequence[Candidate], *, objective: str = "latency", fidelity: str = "cosine_min"
) -> list[str]:
    """Ids of the ok candidates that no other ok candidate beats on both speed and fidelity,
    fastest first: the only sensible picks, since every other one is slower and no more faithful
    than one of these. `fidelity` is the quality key judged (higher is better)."""
    points = []
    for c in candidates:
        cost, fid = rank_cost(c, objective), fidelity_value(c, fidelity)
        if c.status == "ok" and cost < math.inf and fid is not None:
            points.append((cost, -fid, c.id))

    def dominated(a: tuple[float, float, str]) -> bool:
        return any(b[0] <= a[0] and b[1] <= a[1] and b[:2] != a[:2] for b in points)

    return [p[2] for p in sorted(points) if not dominated(p)]


def explain(report: Report) -> dict[str, str]:
    """Candidate id -> one plain sentence saying why it won or lost, with its numbers."""
    view = read_view(report)
    return {c.id: _sentence(view, c) for c in view.candidates}


def _sentence(v: View, c: Candidate) -> str:
    role = v.role(c)
    if role == "winner":
        return _won(v, c)
    if role == "failed":
        return f"Failed: {c.reason or 'no reason was recorded'}."
    if role == "skipped":
        return f"Not tried: {c.reason or 'no reason was recorded'}."
    if role == "rejected":
        return _rejected(v, c)
    if headline_speed(c, v.objective) is None:
        stop = " before the run stopped" if not v.report.complete else ""
        return f"Met the budget ({fid_text(v, c)}) but was not timed{stop}."
    if role == "baseline":
        text = f"The baseline every speedup is measured against: {perf_text(v, c)}"
        if v.winner is not None and v.winner.speedup:
            text += f"; the winner is {look.times(v.winner.speedup)} faster"
        return text + f"{_noisy(v, c)}."
    return _slower(v, c)


def _won(v: View, c: Candidate) -> str:
    if v.baseline is not None and c.id == v.baseline.id:
        return f"Won: nothing within the budget beat {v.baseline_name} ({perf_text(v, c)})."
    return (
        f"Won: the fastest within the budget at {perf_text(v, c)}, {look.times(c.speedup)} "
        f"{v.baseline_name}, with {fid_text(v, c)}{_noisy(v, c)}."
    )


def _slower(v: View, c: Candidate) -> str:
    text, w = f"Met the budget ({fid_text(v, c)})", v.winner
    ratio = None if w is None else _ratio(v, w, c)
    if w is None or ratio is None:
        return f"{text} at {perf_text(v, c)}{_noisy(v, c)}."
    if ratio >= 1.005:
        text += f" but was {ratio:.2f}x slower than the winner"
    else:
        text += " and was within 0.5% of the winner's speed"
    pair = _same_round(w, c)
    if pair is not None:
        text += f" ({look.times(pair[1])} vs {look.times(pair[0])} {v.baseline_name} in round"
        text += f" {len(c.speedups)}, timed side by side)"
    else:
        text += f" ({perf_text(v, c)} vs {perf_text(v, w)})"
    if c.id in v.front:
        text += f"; it is on the Pareto front, the pick if {fid_text(v, c, short=True)} matters"
        text += f" more than {ratio:.2f}x speed"
    rounds, most = c.rounds, max(o.rounds for o in v.candidates)
    if 0 < rounds < most:
        text += f"; dropped after {rounds} of {most} timing rounds"
    return text + f"{_noisy(v, c, w)}."


def _rejected(v: View, c: Candidate) -> str:
    reason, numbers = c.reason, fid_text(v, c).split(", ")
    if reason:  # the reason already names the number that failed; add only the others
        extra = [n for n in numbers if n.rsplit(" ", 1)[-1] not in reason]
        text = f"Missed the budget: {reason}" + (f" ({', '.join(extra)})" if extra else "")
    else:
        text = f"Missed the budget ({budget_text(v)}) with {', '.join(numbers)}"
    speedup = c.speedup
    if speedup is None:
        return text + "; it was not timed."
    text += f"; it ran at {look.times(speedup)} {v.baseline_name}"
    if v.winner is not None and speedup > (v.winner.speedup or 0):
        text += ", faster than the winner: a looser budget would buy speed"
    return text + "."


def _ratio(v: View, fast: Candidate, slow: Candidate) -> float | None:
    """How many times slower `slow` is than `fast` at the objective (>= 1 when truly slower):
    the ratio of their speedups, each measured beside the baseline in the same timing round,
    since raw numbers from different rounds also hold the machine's drift between them."""
    pair = _same_round(fast, slow)
    if pair is not None:
        return pair[0] / pair[1]
    a, b = headline_speed(fast, v.objective), headline_speed(slow, v.objective)
    if a is None or b is None or min(a, b) <= 0:
        return None
    return a / b if v.objective == "throughput" else b / a


def _same_round(fast: Candidate, slow: Candidate) -> tuple[float, float] | None:
    """Both speedups in the last timing round `slow` took part in, when both were in it."""
    a, b = fast.speedups, slow.speedups
    if not b or len(a) < len(b) or not a[len(b) - 1] or not b[-1]:
        return None
    return float(a[len(b) - 1]), float(b[-1])


def perf_text(v: View, c: Candidate) -> str:
    timed = headline_perf(c, v.objective)
    if timed is None:
        return "not timed"
    if v.objective == "throughput":
        return f"{look.rate(timed[1].throughput)} samples/s at batch {timed[0]}"
    return f"{look.ms(timed[1].p50_ms)} ms p50"


def fid_text(v: View, c: Candidate, *, short: bool = False) -> str:
    q = c.quality or QualityRecord()
    if v.fidelity == "metric":
        if q.metric is None:
            return "metric not measured"
        drop = "" if short or q.metric_drop is None else f", drop {q.metric_drop:.4g}"
        return f"metric {q.metric:.4g}{drop}"
    if q.cosine_min is None:
        return "fidelity not measured"
    mean = "" if short or q.cosine_mean is None else f", mean {look.cos(q.cosine_mean)}"
    return f"worst cosine {look.cos(q.cosine_min)}{mean}"


def _noisy(v: View, *cs: Candidate) -> str:
    for c in cs:
        timed = headline_perf(c, v.objective)
        if timed is not None and timed[1].noisy:
            return "; timing was noisy (jitter over 10%), so treat the ratio as approximate"
    return ""


def budget_text(v: View) -> str:
    return v.report.budget.description or "not recorded"


def budget_line(v: View) -> float | None:
    """The fidelity bound as a number, for the plot. Optional in the schema: a fidelity budget
    may carry `cosine_min`; a metric budget gives `baseline_metric - max_drop`."""
    b = v.report.budget
    if v.fidelity != "metric":
        return b.cosine_min
    if b.baseline_metric is None or b.max_drop is None:
        return None
    return b.baseline_metric - b.max_drop
