"""report.html: one self-contained page that says which candidate won, by how much, and why.

It works on the typed records of report.json (`schema.py`), so it imports nothing from mahir's
other rooms: a report.json copied from another machine renders the same way.
The page loads nothing from the network (inline look.CSS, plots as inline SVG), so it can be mailed,
archived and opened offline; every string taken from the report goes through `html.escape`.

The page reads in the order an engineer asks: what won and by how much; why, one sentence per
candidate (verdicts.py writes them, for the terminal too); the numbers; the plots; then the
machine, model and recipe that make the numbers reproducible. `plots.py` owns the look.
"""

from __future__ import annotations

import datetime as dt
import html
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from mahir.files import write_text_atomically
from mahir.report import plots as look
from mahir.report.roofline_html import roofline_section
from mahir.report.schema import CandidateRecord as Candidate
from mahir.report.schema import PerfRecord, QualityRecord, Report, UtilizationRecord
from mahir.report.verdicts import (
    View,
    budget_line,
    budget_text,
    explain,
    fid_text,
    fidelity_value,
    headline_perf,
    headline_speed,
    perf_text,
    rank_cost,
    read_view,
)

DATE = "%Y-%m-%d %H:%M UTC"


def _date(text: str) -> str:
    try:
        return dt.datetime.fromisoformat(text).astimezone(dt.timezone.utc).strftime(DATE)
    except ValueError:
        return text


def _e(value: object) -> str:
    return html.escape(str(value))


def _order(v: View) -> list[Candidate]:
    """Winner first, then met-budget by speed, then missed, then failed: the table's order."""
    rank = {"winner": 0, "baseline": 1, "ok": 1, "rejected": 2, "failed": 3, "skipped": 4}
    return sorted(v.candidates, key=lambda c: (rank[v.role(c)], rank_cost(c, v.objective)))


def render_html(report: Report) -> str:
    """The whole page as one string; nothing in it points outside the file."""
    v = read_view(report)
    model = report.model.get("name", "model")
    rooflines = roofline_section(report.rooflines, report.roofline_note)
    parts = (
        _banner(v), _headline(v), _why(v), _table(v), _plots(v), rooflines, _context(v), _recipe(v)
    )  # fmt: skip
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>mahir report: {_e(model)}</title><style>{look.CSS}</style></head><body><main>"
        f'<p class="kicker">mahir optimization report &middot; {_e(model)} &middot; '
        f"{_e(_date(report.date))}</p>{''.join(parts)}</main></body></html>\n"
    )


def _banner(v: View) -> str:
    return _busy_banner(v) + _incomplete_banner(v)


def _busy_banner(v: View) -> str:
    note = v.report.machine_load.get("note")
    if not note:
        return ""
    text = _e(note[0].upper() + note[1:])
    return f'<div class="banner"><strong>Busy machine.</strong> {text}.</div>'


def _incomplete_banner(v: View) -> str:
    r = v.report
    if r.complete:
        return ""
    timed = sum(headline_speed(c, v.objective) is not None for c in v.candidates)
    spent = f" after {look.duration(r.elapsed_s)}" if r.elapsed_s is not None else ""
    limit = f" of a {look.duration(r.time_budget_s)} budget" if r.time_budget_s else ""
    return (
        f'<div class="banner"><strong>Incomplete run.</strong> The search stopped{spent}{limit} '
        f"(interrupted or out of time); {timed} of {len(v.candidates)} candidates were timed. "
        f"The result is the best of what finished, not of everything searched.</div>"
    )


def _headline(v: View) -> str:
    w, b = v.winner, v.baseline
    if w is None:
        lead = f'<p class="lead">{_closest(v)}</p>'
        return f"<header><h1>No candidate met the budget</h1>{lead}{_meta(v)}</header>"
    x = look.times(w.speedup)
    if b is not None and w.id == b.id:
        title = f"{v.baseline_name} stays: nothing was faster within the budget"
    elif v.objective == "throughput":
        title = f"{w.label} gives {x} the samples/s of {v.baseline_name}"
    else:
        title = f"{w.label} runs {x} faster than {v.baseline_name}"
    return f"<header><h1>{_e(title)}</h1>{_cards(v, w, b)}{_meta(v)}</header>"


def _cards(v: View, w: Candidate, b: Candidate | None) -> str:
    """The winner's numbers, each beside what it is compared with."""
    line, base = budget_line(v), f"{v.baseline_name}: "
    fid_label, _, fid_value = fid_text(v, w, short=True).rpartition(" ")
    fid_sub = fid_text(v, w).partition(", ")[2] + (f" · budget ≥ {line:.4g}" if line else "")
    size, base_size = w.size_mb, None if b is None else b.size_mb
    return look.cards([
        ("speedup", look.times(w.speedup), f"over {v.baseline_name}"),
        (v.objective, perf_text(v, w), base + perf_text(v, b) if b is not None else ""),
        (fid_label, fid_value, fid_sub),
        ("size on disk", "n/a" if size is None else f"{size:.1f} MB",
         "" if base_size is None else f"{base}{base_size:.1f} MB"),
    ])  # fmt: skip


def _meta(v: View) -> str:
    r, batch = v.report, min(v.report.batch_sizes or [1])
    judged = (
        "best samples/s of any batch" if v.objective == "throughput" else f"p50 at batch {batch}"
    )
    searched = f"{look.duration(r.elapsed_s or 0)} of {look.duration(r.time_budget_s or 0)}"
    return (
        f'<p class="meta"><b>Objective</b> {_e(v.objective)}, {judged} &middot; <b>Budget</b> '
        f"{_e(budget_text(v))} &middot; <b>Searched</b> {len(v.candidates)} candidates in "
        f"{searched}</p>"
    )


def _closest(v: View) -> str:
    """With no winner: the rejected candidate nearest the budget, and the budget that admits it."""
    missed = [
        c
        for c in v.candidates
        if c.status == "rejected" and fidelity_value(c, v.fidelity) is not None
    ]
    if not missed:
        return "Every candidate failed or went untimed; the reasons are below."
    c = max(missed, key=lambda m: fidelity_value(m, v.fidelity) or 0.0)
    q, budget = c.quality or QualityRecord(), v.report.budget
    if v.fidelity == "metric":
        drop = q.metric_drop or 0.0
        relax = f"Allowing a metric drop of {drop:.4g} (now {budget.max_drop})"
    else:
        relax = f"A budget of worst cosine ≥ {_floor(q.cosine_min or 0.0)}"
        if (q.cosine_mean or 1.0) < (budget.cosine_mean or 0.0):
            relax += f" and mean ≥ {_floor(q.cosine_mean or 0.0)}"
    speed = f", at {look.times(c.speedup)} {v.baseline_name}" if c.speedup else ""
    return (
        f"Closest: <b>{_e(c.label)}</b> with {_e(fid_text(v, c) + speed)}. {_e(relax)} would "
        "accept it; recipes that keep more precision (per-channel int8, bf16, fp32 on a faster "
        "runtime) may meet the budget as it is."
    )


def _floor(cosine: float) -> str:
    """Rounded down to 4 places: a bound at this value admits the candidate."""
    return f"{math.floor(cosine * 1e4) / 1e4:.4f}"


def _why(v: View) -> str:
    sentences = explain(v.report)
    items = "".join(
        f'<li><span class="dot" style="--c:{look.ROLES[v.role(c)][1]}"></span>'
        f"<b>{_e(c.label)}</b> &mdash; {_e(sentences[c.id])}</li>"
        for c in _order(v)
    )
    return f'<section><h2>Why</h2><ul class="why">{items}</ul></section>'


def _table(v: View) -> str:
    throughput = v.objective == "throughput"
    quality = ("Metric", "Drop") if v.fidelity == "metric" else ("Cos mean", "Cos worst")
    heads = ("Candidate", "Status", *(("Batch",) if throughput else ()), "p50 ms", "p90 ms",
             "p99 ms", "Samples/s", "Of peak", "Speedup", *quality, "Size MB",
             "Rounds")  # fmt: skip
    head = "".join(f"<th>{h}</th>" for h in heads)
    rows = "".join(_table_row(v, c) for c in _order(v))
    note = (
        "Timings at the batch the objective judges; ~ marks noisy timing (jitter over 10%). "
        "Hover a status for its reason. " + _peak_note(v)
    )
    return (
        f'<section><h2>Candidates</h2><div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f'<tbody>{rows}</tbody></table></div><p class="note">{note}</p></section>'
    )


def _table_row(v: View, c: Candidate) -> str:
    role = v.role(c)
    words, colour = look.ROLES[role]
    size, p = headline_perf(c, v.objective) or (None, None)
    q = c.quality or QualityRecord()
    metric = v.fidelity == "metric"
    fid: Callable[[Any], str] = (lambda x: f"{x:.4g}") if metric else look.cos
    timing: list[tuple[Any, Callable[[Any], str]]] = [
        *(((size, str),) if v.objective == "throughput" else ()),
        (p and p.p50_ms, lambda x: ("~" if p and p.noisy else "") + look.ms(x)),
        (p and p.p90_ms, look.ms), (p and p.p99_ms, look.ms), (p and p.throughput, look.rate),
    ]  # fmt: skip
    rest: list[tuple[Any, Callable[[Any], str]]] = [
        (c.speedup, look.times),
        (q.get("metric" if metric else "cosine_mean"), fid),
        (q.get("metric_drop" if metric else "cosine_min"), fid),
        (c.size_mb, lambda x: f"{x:.1f}"), (c.rounds, str),
    ]  # fmt: skip
    used = None if size is None else c.utilization.get(size)
    return (
        f'<tr class="{role}"><td><b>{_e(c.label)}</b><small>{_e(_where(c))} '
        f'&middot; {_e(c.id)}</small></td><td><span class="pill" style="--c:{colour}" '
        f'title="{_e(c.reason or words)}">{words}</span></td>{_numbers(timing)}'
        f"{_of_peak(used)}{_numbers(rest)}</tr>"
    )


def _numbers(cells: list[tuple[Any, Callable[[Any], str]]]) -> str:
    return "".join(f'<td class="n">{"&ndash;" if x is None else _e(f(x))}</td>' for x, f in cells)


def _of_peak(used: UtilizationRecord | None) -> str:
    """The share of the measured peak, the peak's dtype under it; hover: FLOP/s achieved."""
    if used is None:
        return '<td class="n">&ndash;</td>'
    unit = "OP" if used.peak == "int8" else "FLOP"
    title = f"{look.per_s(used.flops_per_s, unit)} achieved, computing in {used.precision}"
    title += f"; {used.note}" if used.note else ""
    if used.fraction is None:
        return f'<td class="n" title="{_e(title)}">{_e(look.per_s(used.flops_per_s, unit))}</td>'
    mark = "*" if used.note else ""
    return (
        f'<td class="n" title="{_e(title)}">{_e(look.share(used.fraction))}'
        f"<small>of {_e(used.peak)}{mark}</small></td>"
    )


def _peak_note(v: View) -> str:
    """What "of peak" divides by, or why the column is empty."""
    cost, device = v.report.cost, v.report.device
    if cost is None or device is None:
        return ""
    if cost.note:
        return f"Of peak: {_e(cost.note)}."
    return (
        "Of peak: the model's FLOPs per batch (as counted for the original) over the median batch "
        f"latency, as a share of the peak measured on {_e(device.name)} in the precision the "
        "candidate computes in; * marks a share of another precision's peak (hover for why). "
        "A pruned candidate does fewer FLOPs than counted."
    )


def _where(c: Candidate) -> str:
    """The runtime, and the device when it is not the CPU."""
    return c.runtime + ("" if c.device == "cpu" else f" on {c.device}")


def _plots(v: View) -> str:
    marks = [_mark(v, c) for c in v.candidates if headline_speed(c, v.objective) is not None]
    if not marks:
        return "<section><h2>Plots</h2><p>No candidate was timed: nothing to plot.</p></section>"
    metric = (v.report.budget.metric or "metric") if v.fidelity == "metric" else None
    batch = None if v.objective == "throughput" else min(v.report.batch_sizes or [1])
    figures = look.plots_html(
        marks, batch=batch, metric=metric, budget=budget_line(v), baseline=v.baseline_name
    )
    return f"<section><h2>Plots</h2>{figures}</section>"


def _mark(v: View, c: Candidate) -> look.Mark:
    size, perf = headline_perf(c, v.objective) or (0, PerfRecord(p50_ms=0.0, throughput=0.0))
    role, label = v.role(c), c.label
    return look.Mark(
        label=f"{label} (batch {size})" if v.objective == "throughput" else label,
        role=role,
        tooltip=f"{label} ({look.ROLES[role][0]}): {perf_text(v, c)}, {fid_text(v, c)}",
        speed=headline_speed(c, v.objective) or 0.0,
        fidelity=fidelity_value(c, v.fidelity),
        speedup=c.speedup,
        samples=tuple(perf.latencies_ms),
        on_front=c.id in v.front,
    )


def _context(v: View) -> str:
    """Machine, model and workload: the facts without which the numbers mean nothing."""
    m, model, w = v.report.machine, v.report.model, v.report.workload
    gpus = [f"{g['name']} ({g['memory_gb']:.0f} GiB)" for g in m.get("gpus", ())]
    pool, tokens = model.get("pooling"), w.get("tokens")
    machine = {
        "CPU": m.get("cpu", "unknown"),
        "Cores": f"{m.get('physical_cores', '?')} physical, {m.get('logical_cores', '?')} logical",
        "Memory": f"{m.get('memory_gb') or 0:.1f} GiB",
        "GPU": ", ".join(gpus) or "none",
        "ISA": m.get("isa") or "no AVX2",
        **_device_facts(v),
    }
    facts = {
        "Model": f"{model.get('name', '?')} ({model.get('source', '?')})",
        "Inputs": ", ".join(f"{i['name']} {i['dtype']}" for i in model.get("inputs", ()))
        + (f"; max length {model['max_length']}" if model.get("max_length") else ""),
        "Outputs": ", ".join(model.get("outputs", ())),
        "Pooling": f"{pool['mode']}{', normalized' * bool(pool.get('normalize'))}" if pool else "-",
        "Batch sizes": ", ".join(map(str, w.get("batch_sizes", v.report.batch_sizes))),
        "Tokens": f"{tokens['min']} to {tokens['max']}, median {tokens['median']:g}"
        if tokens else "not text",
        **_cost_facts(v),
    }  # fmt: skip
    return (
        f'<section class="cols"><div><h2>Machine</h2>{look.facts(machine)}</div><div><h2>Model '
        f"and workload</h2>{look.facts(facts)}</div></section>"
    )


def _device_facts(v: View) -> dict[str, str]:
    """The device the candidates ran on and its peaks, measured here (no datasheet numbers)."""
    device = v.report.device
    if device is None:
        return {}
    peaks = ", ".join(
        f"{p.dtype} {look.per_s(p.flops_per_s, 'OP' if p.dtype == 'int8' else 'FLOP')}"
        + (" (busy machine: likely low)" if p.busy else "")
        for p in device.peaks
    )
    when = sorted({p.measured[:10] for p in device.peaks if p.measured})
    how = f"{device.method}; " if device.method else ""
    how += f"measured {', '.join(when)}" if when else ""
    return {
        "Timed on": f"{device.device} ({device.name})",
        "Measured peak": f"{peaks} ({how})" if peaks else "not measured",
    }


def _cost_facts(v: View) -> dict[str, str]:
    cost = v.report.cost
    if cost is None:
        return {}
    if not cost.flops_per_batch:
        return {"FLOPs": cost.note or "not counted"}
    per_batch = ", ".join(
        f"batch {size}: {look.per_s(f).removesuffix('/s')}"
        for size, f in sorted(cost.flops_per_batch.items())
    )
    return {"FLOPs per forward": f"{per_batch} ({cost.method})"}


def _recipe(v: View) -> str:
    w = v.winner
    if w is None:
        return ""
    keep = {"recipe": w.recipe, "settings": w.settings, "hash": w.recipe_hash}
    return (
        f"<section><h2>Recipe of the winner</h2><pre>{_e(yaml.safe_dump(keep, sort_keys=False))}"
        f'</pre><p class="note">Replay it with <code>mahir apply</code>; built in '
        f"{w.build_s:.1f} s.</p></section>"
    )


def write_html(report: Report, path: Path) -> None:
    """Write the page whole or not at all: a reader (or a crash) never sees half a report."""
    write_text_atomically(path, render_html(report))


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m mahir.report.html path/to/report.json")
    source = Path(sys.argv[1])
    target = source.with_name("report.html")
    write_html(Report.read(source), target)
    print(target)
