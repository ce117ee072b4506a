"""report.html: one self-contained page that says which candidate won, by how much, and why.

It works on the plain `report` dict the search saves as report.json (schema 1), so it imports
nothing from mahir's other rooms: a report.json copied from another machine renders the same way.
The page loads nothing from the network (inline look.CSS, plots as inline SVG), so it can be mailed,
archived and opened offline; every string taken from the report goes through `html.escape`.

The page reads in the order an engineer asks: what won and by how much; why, one sentence per
candidate (the sentences `explain` also gives the terminal); the numbers; the plots; then the
machine, model and recipe that make the numbers reproducible. `report_plots.py` owns the look.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mahir import report_plots as look

Candidate = Mapping[str, Any]
BASELINE_NAME = "PyTorch eager fp32"
DATE = "%Y-%m-%d %H:%M UTC"


@dataclass(frozen=True, slots=True)
class _View:
    """What every part of the page needs, read from the report once."""

    report: Mapping[str, Any]
    objective: str
    fidelity: str
    """The quality key the budget judges: "cosine_min", or "metric" when a user metric decides."""
    candidates: tuple[Candidate, ...]
    winner: Candidate | None
    baseline: Candidate | None
    front: tuple[str, ...]

    def role(self, c: Candidate) -> str:
        """A key of `ROLES`: the candidate's status, with the winner and baseline singled out."""
        if self.winner is not None and c["id"] == self.winner["id"]:
            return "winner"
        if self.baseline is not None and c["id"] == self.baseline["id"] and c["status"] == "ok":
            return "baseline"
        return str(c["status"])


def _view(report: Mapping[str, Any]) -> _View:
    objective = str(report.get("objective", "latency"))
    fidelity = "metric" if report.get("budget", {}).get("kind") == "metric" else "cosine_min"
    candidates = tuple(report.get("candidates", ()))
    by_id = {c["id"]: c for c in candidates}
    front = tuple(pareto_front(candidates, objective=objective, fidelity=fidelity))
    winner, baseline = by_id.get(report.get("best")), by_id.get(report.get("baseline"))
    return _View(report, objective, fidelity, candidates, winner, baseline, front)


def headline_perf(c: Candidate, objective: str) -> tuple[int, Mapping[str, Any]] | None:
    """The timing the objective judges: the smallest batch (batch 1) for latency, the batch with
    the most samples/s for throughput; None when the candidate was never timed."""
    perf = c.get("perf") or {}
    if not perf:
        return None
    if objective == "throughput":
        key = max(perf, key=lambda b: perf[b]["throughput"])
    else:
        key = min(perf, key=int)
    return int(key), perf[key]


def _speed(c: Candidate, objective: str) -> float | None:
    timed = headline_perf(c, objective)
    if timed is None:
        return None
    return float(timed[1]["throughput" if objective == "throughput" else "p50_ms"])


def _cost(c: Candidate, objective: str) -> float:
    """Lower is better: minus the speedup over the baseline timed beside it (the comparison
    that survives machine drift between timing rounds), else p50 ms or minus samples/s;
    infinite when never timed."""
    speed = _speed(c, objective)
    if speed is None:
        return math.inf
    if c.get("speedup"):
        return -float(c["speedup"])
    return -speed if objective == "throughput" else speed


def _fid(c: Candidate, key: str) -> float | None:
    value = (c.get("quality") or {}).get(key)
    return None if value is None else float(value)


def pareto_front(
    candidates: Sequence[Candidate], *, objective: str = "latency", fidelity: str = "cosine_min"
) -> list[str]:
    """Ids of the ok candidates that no other ok candidate beats on both speed and fidelity,
    fastest first: the only sensible picks, since every other one is slower and no more faithful
    than one of these. `fidelity` is the quality key judged (higher is better)."""
    points = []
    for c in candidates:
        cost, fid = _cost(c, objective), _fid(c, fidelity)
        if c.get("status") == "ok" and cost < math.inf and fid is not None:
            points.append((cost, -fid, str(c["id"])))

    def dominated(a: tuple[float, float, str]) -> bool:
        return any(b[0] <= a[0] and b[1] <= a[1] and b[:2] != a[:2] for b in points)

    return [p[2] for p in sorted(points) if not dominated(p)]


def explain(report: Mapping[str, Any]) -> dict[str, str]:
    """Candidate id -> one plain sentence saying why it won or lost, with its numbers."""
    view = _view(report)
    return {str(c["id"]): _sentence(view, c) for c in view.candidates}


def _sentence(v: _View, c: Candidate) -> str:
    role = v.role(c)
    if role == "winner":
        return _won(v, c)
    if role == "failed":
        return f"Failed: {c.get('reason') or 'no reason was recorded'}."
    if role == "skipped":
        return f"Not tried: {c.get('reason') or 'no reason was recorded'}."
    if role == "rejected":
        return _rejected(v, c)
    if _speed(c, v.objective) is None:
        stop = " before the run stopped" if not v.report.get("complete", True) else ""
        return f"Met the budget ({_fid_text(v, c)}) but was not timed{stop}."
    if role == "baseline":
        text = f"The baseline every speedup is measured against: {_perf_text(v, c)}"
        if v.winner is not None and v.winner.get("speedup"):
            text += f"; the winner is {look.times(v.winner['speedup'])} faster"
        return text + f"{_noisy(v, c)}."
    return _slower(v, c)


def _won(v: _View, c: Candidate) -> str:
    if v.baseline is not None and c["id"] == v.baseline["id"]:
        return f"Won: nothing within the budget beat {BASELINE_NAME} ({_perf_text(v, c)})."
    return (
        f"Won: the fastest within the budget at {_perf_text(v, c)}, {look.times(c.get('speedup'))} "
        f"{BASELINE_NAME}, with {_fid_text(v, c)}{_noisy(v, c)}."
    )


def _slower(v: _View, c: Candidate) -> str:
    text, w = f"Met the budget ({_fid_text(v, c)})", v.winner
    ratio = None if w is None else _ratio(v, w, c)
    if w is None or ratio is None:
        return f"{text} at {_perf_text(v, c)}{_noisy(v, c)}."
    if ratio >= 1.005:
        text += f" but was {ratio:.2f}x slower than the winner"
    else:
        text += " and was within 0.5% of the winner's speed"
    pair = _same_round(w, c)
    if pair is not None:
        text += f" ({look.times(pair[1])} vs {look.times(pair[0])} {BASELINE_NAME} in round"
        text += f" {len(c['speedups'])}, timed side by side)"
    else:
        text += f" ({_perf_text(v, c)} vs {_perf_text(v, w)})"
    if c["id"] in v.front:
        text += f"; it is on the Pareto front, the pick if {_fid_text(v, c, short=True)} matters"
        text += f" more than {ratio:.2f}x speed"
    rounds, most = int(c.get("rounds") or 0), max(int(o.get("rounds") or 0) for o in v.candidates)
    if 0 < rounds < most:
        text += f"; dropped after {rounds} of {most} timing rounds"
    return text + f"{_noisy(v, c, w)}."


def _rejected(v: _View, c: Candidate) -> str:
    reason, numbers = c.get("reason"), _fid_text(v, c).split(", ")
    if reason:  # the reason already names the number that failed; add only the others
        extra = [n for n in numbers if n.rsplit(" ", 1)[-1] not in reason]
        text = f"Missed the budget: {reason}" + (f" ({', '.join(extra)})" if extra else "")
    else:
        text = f"Missed the budget ({_budget_text(v)}) with {', '.join(numbers)}"
    speedup = c.get("speedup")
    if speedup is None:
        return text + "; it was not timed."
    text += f"; it ran at {look.times(speedup)} {BASELINE_NAME}"
    if v.winner is not None and speedup > (v.winner.get("speedup") or 0):
        text += ", faster than the winner: a looser budget would buy speed"
    return text + "."


def _ratio(v: _View, fast: Candidate, slow: Candidate) -> float | None:
    """How many times slower `slow` is than `fast` at the objective (>= 1 when truly slower):
    the ratio of their speedups, each measured beside the baseline in the same timing round,
    since raw numbers from different rounds also hold the machine's drift between them."""
    pair = _same_round(fast, slow)
    if pair is not None:
        return pair[0] / pair[1]
    a, b = _speed(fast, v.objective), _speed(slow, v.objective)
    if a is None or b is None or min(a, b) <= 0:
        return None
    return a / b if v.objective == "throughput" else b / a


def _same_round(fast: Candidate, slow: Candidate) -> tuple[float, float] | None:
    """Both speedups in the last timing round `slow` took part in, when both were in it."""
    a, b = fast.get("speedups") or [], slow.get("speedups") or []
    if not b or len(a) < len(b) or not a[len(b) - 1] or not b[-1]:
        return None
    return float(a[len(b) - 1]), float(b[-1])


def _perf_text(v: _View, c: Candidate) -> str:
    timed = headline_perf(c, v.objective)
    if timed is None:
        return "not timed"
    if v.objective == "throughput":
        return f"{look.rate(timed[1]['throughput'])} samples/s at batch {timed[0]}"
    return f"{look.ms(timed[1]['p50_ms'])} ms p50"


def _fid_text(v: _View, c: Candidate, *, short: bool = False) -> str:
    q = c.get("quality") or {}
    if v.fidelity == "metric":
        if q.get("metric") is None:
            return "metric not measured"
        drop = "" if short or q.get("metric_drop") is None else f", drop {q['metric_drop']:.4g}"
        return f"metric {q['metric']:.4g}{drop}"
    if q.get("cosine_min") is None:
        return "fidelity not measured"
    mean = "" if short or q.get("cosine_mean") is None else f", mean {look.cos(q['cosine_mean'])}"
    return f"worst cosine {look.cos(q['cosine_min'])}{mean}"


def _noisy(v: _View, *cs: Candidate) -> str:
    for c in cs:
        timed = headline_perf(c, v.objective)
        if timed is not None and timed[1].get("noisy"):
            return "; timing was noisy (jitter over 10%), so treat the ratio as approximate"
    return ""


def _budget_text(v: _View) -> str:
    return str(v.report.get("budget", {}).get("description") or "not recorded")


def _budget_line(v: _View) -> float | None:
    """The fidelity bound as a number, for the plot. Optional in the schema: a fidelity budget
    may carry `cosine_min`; a metric budget gives `baseline_metric - max_drop`."""
    b = v.report.get("budget", {})
    if v.fidelity != "metric":
        return None if b.get("cosine_min") is None else float(b["cosine_min"])
    if b.get("baseline_metric") is None or b.get("max_drop") is None:
        return None
    return float(b["baseline_metric"]) - float(b["max_drop"])


def _date(text: str) -> str:
    try:
        return dt.datetime.fromisoformat(text).astimezone(dt.timezone.utc).strftime(DATE)
    except ValueError:
        return text


def _e(value: object) -> str:
    return html.escape(str(value))


def _order(v: _View) -> list[Candidate]:
    """Winner first, then met-budget by speed, then missed, then failed: the table's order."""
    rank = {"winner": 0, "baseline": 1, "ok": 1, "rejected": 2, "failed": 3, "skipped": 4}
    return sorted(v.candidates, key=lambda c: (rank[v.role(c)], _cost(c, v.objective)))


def render_html(report: Mapping[str, Any]) -> str:
    """The whole page as one string; nothing in it points outside the file."""
    v = _view(report)
    model = report.get("model", {}).get("name", "model")
    parts = (_banner(v), _headline(v), _why(v), _table(v), _plots(v), _context(v), _recipe(v))
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>mahir report: {_e(model)}</title><style>{look.CSS}</style></head><body><main>"
        f'<p class="kicker">mahir optimization report &middot; {_e(model)} &middot; '
        f"{_e(_date(str(report.get('date', ''))))}</p>{''.join(parts)}</main></body></html>\n"
    )


def _banner(v: _View) -> str:
    r = v.report
    if r.get("complete", True):
        return ""
    timed = sum(_speed(c, v.objective) is not None for c in v.candidates)
    spent = f" after {look.duration(r['elapsed_s'])}" if r.get("elapsed_s") is not None else ""
    limit = f" of a {look.duration(r['time_budget_s'])} budget" if r.get("time_budget_s") else ""
    return (
        f'<div class="banner"><strong>Incomplete run.</strong> The search stopped{spent}{limit} '
        f"(interrupted or out of time); {timed} of {len(v.candidates)} candidates were timed. "
        f"The result is the best of what finished, not of everything searched.</div>"
    )


def _headline(v: _View) -> str:
    w, b = v.winner, v.baseline
    if w is None:
        lead = f'<p class="lead">{_closest(v)}</p>'
        return f"<header><h1>No candidate met the budget</h1>{lead}{_meta(v)}</header>"
    x = look.times(w.get("speedup"))
    if b is not None and w["id"] == b["id"]:
        title = f"{BASELINE_NAME} stays: nothing was faster within the budget"
    elif v.objective == "throughput":
        title = f"{w['label']} gives {x} the samples/s of {BASELINE_NAME}"
    else:
        title = f"{w['label']} runs {x} faster than {BASELINE_NAME}"
    return f"<header><h1>{_e(title)}</h1>{_cards(v, w, b)}{_meta(v)}</header>"


def _cards(v: _View, w: Candidate, b: Candidate | None) -> str:
    """The winner's numbers, each beside what it is compared with."""
    line, base = _budget_line(v), f"{BASELINE_NAME}: "
    fid_label, _, fid_value = _fid_text(v, w, short=True).rpartition(" ")
    fid_sub = _fid_text(v, w).partition(", ")[2] + (f" · budget ≥ {line:.4g}" if line else "")
    size, base_size = w.get("size_mb"), None if b is None else b.get("size_mb")
    return look.cards([
        ("speedup", look.times(w.get("speedup")), f"over {BASELINE_NAME}"),
        (v.objective, _perf_text(v, w), base + _perf_text(v, b) if b is not None else ""),
        (fid_label, fid_value, fid_sub),
        ("size on disk", "n/a" if size is None else f"{size:.1f} MB",
         "" if base_size is None else f"{base}{base_size:.1f} MB"),
    ])  # fmt: skip


def _meta(v: _View) -> str:
    r, batch = v.report, min(v.report.get("batch_sizes") or [1])
    judged = (
        "best samples/s of any batch" if v.objective == "throughput" else f"p50 at batch {batch}"
    )
    searched = (
        f"{look.duration(r.get('elapsed_s') or 0)} of {look.duration(r.get('time_budget_s') or 0)}"
    )
    return (
        f'<p class="meta"><b>Objective</b> {_e(v.objective)}, {judged} &middot; <b>Budget</b> '
        f"{_e(_budget_text(v))} &middot; <b>Searched</b> {len(v.candidates)} candidates in "
        f"{searched}</p>"
    )


def _closest(v: _View) -> str:
    """With no winner: the rejected candidate nearest the budget, and the budget that admits it."""
    missed = [
        c for c in v.candidates if c["status"] == "rejected" and _fid(c, v.fidelity) is not None
    ]
    if not missed:
        return "Every candidate failed or went untimed; the reasons are below."
    c = max(missed, key=lambda m: _fid(m, v.fidelity) or 0.0)
    q, budget = c["quality"], v.report.get("budget", {})
    if v.fidelity == "metric":
        drop = q.get("metric_drop") or 0.0
        relax = f"Allowing a metric drop of {drop:.4g} (now {budget.get('max_drop')})"
    else:
        relax = f"A budget of worst cosine ≥ {math.floor(q['cosine_min'] * 1e4) / 1e4:.4f}"
        if (q.get("cosine_mean") or 1.0) < (budget.get("cosine_mean") or 0.0):
            relax += f" and mean ≥ {math.floor(q['cosine_mean'] * 1e4) / 1e4:.4f}"
    speed = f", at {look.times(c['speedup'])} {BASELINE_NAME}" if c.get("speedup") else ""
    return (
        f"Closest: <b>{_e(c['label'])}</b> with {_e(_fid_text(v, c) + speed)}. {_e(relax)} would "
        "accept it; recipes that keep more precision (per-channel int8, bf16, fp32 on a faster "
        "runtime) may meet the budget as it is."
    )


def _why(v: _View) -> str:
    sentences = explain(v.report)
    items = "".join(
        f'<li><span class="dot" style="--c:{look.ROLES[v.role(c)][1]}"></span>'
        f"<b>{_e(c['label'])}</b> &mdash; {_e(sentences[c['id']])}</li>"
        for c in _order(v)
    )
    return f'<section><h2>Why</h2><ul class="why">{items}</ul></section>'


def _table(v: _View) -> str:
    throughput = v.objective == "throughput"
    quality = ("Metric", "Drop") if v.fidelity == "metric" else ("Cos mean", "Cos worst")
    heads = ("Candidate", "Status", *(("Batch",) if throughput else ()), "p50 ms", "p90 ms",
             "p99 ms", "Samples/s", "Speedup", *quality, "Size MB", "Rounds")  # fmt: skip
    head = "".join(f"<th>{h}</th>" for h in heads)
    rows = "".join(_table_row(v, c) for c in _order(v))
    note = (
        "Timings at the batch the objective judges; ~ marks noisy timing (jitter over 10%). "
        "Hover a status for its reason."
    )
    return (
        f'<section><h2>Candidates</h2><div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f'<tbody>{rows}</tbody></table></div><p class="note">{note}</p></section>'
    )


def _table_row(v: _View, c: Candidate) -> str:
    role = v.role(c)
    words, colour = look.ROLES[role]
    size, p = headline_perf(c, v.objective) or (None, {})
    q = c.get("quality") or {}
    metric = v.fidelity == "metric"
    fid: Callable[[Any], str] = (lambda x: f"{x:.4g}") if metric else look.cos
    cells: list[tuple[Any, Callable[[Any], str]]] = [
        *(((size, str),) if v.objective == "throughput" else ()),
        (p.get("p50_ms"), lambda x: ("~" if p.get("noisy") else "") + look.ms(x)),
        (p.get("p90_ms"), look.ms), (p.get("p99_ms"), look.ms), (p.get("throughput"), look.rate),
        (c.get("speedup"), look.times),
        (q.get("metric" if metric else "cosine_mean"), fid),
        (q.get("metric_drop" if metric else "cosine_min"), fid),
        (c.get("size_mb"), lambda x: f"{x:.1f}"), (c.get("rounds"), str),
    ]  # fmt: skip
    numbers = "".join(
        f'<td class="n">{"&ndash;" if x is None else _e(f(x))}</td>' for x, f in cells
    )
    return (
        f'<tr class="{role}"><td><b>{_e(c["label"])}</b><small>{_e(c.get("runtime", ""))} '
        f'&middot; {_e(c["id"])}</small></td><td><span class="pill" style="--c:{colour}" '
        f'title="{_e(c.get("reason") or words)}">{words}</span></td>{numbers}</tr>'
    )


def _plots(v: _View) -> str:
    marks = [_mark(v, c) for c in v.candidates if _speed(c, v.objective) is not None]
    if not marks:
        return "<section><h2>Plots</h2><p>No candidate was timed: nothing to plot.</p></section>"
    metric = v.report["budget"].get("metric", "metric") if v.fidelity == "metric" else None
    batch = None if v.objective == "throughput" else min(v.report.get("batch_sizes") or [1])
    figures = look.plots_html(marks, batch=batch, metric=metric, budget=_budget_line(v))
    return f"<section><h2>Plots</h2>{figures}</section>"


def _mark(v: _View, c: Candidate) -> look.Mark:
    size, perf = headline_perf(c, v.objective) or (0, {})
    role, label = v.role(c), str(c["label"])
    return look.Mark(
        label=f"{label} (batch {size})" if v.objective == "throughput" else label,
        role=role,
        tooltip=f"{label} ({look.ROLES[role][0]}): {_perf_text(v, c)}, {_fid_text(v, c)}",
        speed=_speed(c, v.objective) or 0.0,
        fidelity=_fid(c, v.fidelity),
        speedup=c.get("speedup"),
        samples=tuple(perf.get("latencies_ms") or ()),
        on_front=c["id"] in v.front,
    )


def _context(v: _View) -> str:
    """Machine, model and workload: the facts without which the numbers mean nothing."""
    m, model, w = (v.report.get(k) or {} for k in ("machine", "model", "workload"))
    gpus = [f"{g['name']} ({g['memory_gb']:.0f} GiB)" for g in m.get("gpus", ())]
    pool, tokens = model.get("pooling"), w.get("tokens")
    machine = {
        "CPU": m.get("cpu", "unknown"),
        "Cores": f"{m.get('physical_cores', '?')} physical, {m.get('logical_cores', '?')} logical",
        "Memory": f"{m.get('memory_gb') or 0:.1f} GiB",
        "GPU": ", ".join(gpus) or "none",
        "ISA": m.get("isa") or "no AVX2",
    }
    facts = {
        "Model": f"{model.get('name', '?')} ({model.get('source', '?')})",
        "Inputs": ", ".join(f"{i['name']} {i['dtype']}" for i in model.get("inputs", ()))
        + (f"; max length {model['max_length']}" if model.get("max_length") else ""),
        "Outputs": ", ".join(model.get("outputs", ())),
        "Pooling": f"{pool['mode']}{', normalized' * bool(pool.get('normalize'))}" if pool else "-",
        "Batch sizes": ", ".join(map(str, w.get("batch_sizes", v.report.get("batch_sizes", [])))),
        "Tokens": f"{tokens['min']} to {tokens['max']}, median {tokens['median']:g}"
        if tokens else "not text",
    }  # fmt: skip
    return (
        f'<section class="cols"><div><h2>Machine</h2>{look.facts(machine)}</div><div><h2>Model '
        f"and workload</h2>{look.facts(facts)}</div></section>"
    )


def _recipe(v: _View) -> str:
    w = v.winner
    if w is None:
        return ""
    keep = {"recipe": w.get("recipe"), "settings": w.get("settings"), "hash": w.get("recipe_hash")}
    return (
        f"<section><h2>Recipe of the winner</h2><pre>{_e(yaml.safe_dump(keep, sort_keys=False))}"
        f'</pre><p class="note">Replay it with <code>mahir apply</code>; built in '
        f"{w.get('build_s') or 0:.1f} s.</p></section>"
    )


def write_html(report: Mapping[str, Any], path: Path) -> None:
    """Write the page through a temporary file and a rename, so a reader (or a crash) never
    sees half a report."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(render_html(report), encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m mahir.report path/to/report.json")
    source = Path(sys.argv[1])
    target = source.with_name("report.html")
    write_html(json.loads(source.read_text(encoding="utf-8")), target)
    print(target)
