"""report.html for `mahir optimize --llm`: one self-contained page, the encoder report's story
told for a decoder LLM.

It reads report.json's plain data (`search/llm_output.py` writes it), so a report copied from
another machine renders the same way: the winner and by how much; one sentence per candidate
on why it won or lost; the table (fidelity against the fp32 reference and the last round's
numbers); decode tokens/s against top-1 agreement and the speedups, drawn by `plots.py`; then
the machine, model, workload and budget. Nothing is loaded from the network; every string from
the report goes through `html.escape`. Imports nothing from mahir but `plots.py`.
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Mapping, Sequence
from typing import Any

from mahir.report import plots as look

Record = Mapping[str, Any]


def _e(value: object) -> str:
    return html.escape(str(value))


def _role(report: Record, c: Record) -> str:
    if c["id"] == report["best"]:
        return "winner"
    if c["id"] == report["baseline"]:
        return "baseline"
    return str(c["status"])


def _last(c: Record) -> Record | None:
    rounds = c["rounds"]
    return rounds[-1] if rounds else None


def render_llm_html(report: Record) -> str:
    """The whole page as one string; nothing in it points outside the file."""
    model = report["model"]["name"]
    parts = (_headline(report), _why(report), _table(report), _plots(report), _context(report))
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>mahir LLM report: {_e(model)}</title><style>{look.CSS}</style></head><body>"
        f'<main><p class="kicker">mahir LLM optimization report &middot; {_e(model)} &middot; '
        f"{_e(_date(report))} UTC</p>{''.join(parts)}</main></body></html>\n"
    )


def _date(report: Record) -> str:
    return str(report["date"])[:16].replace("T", " ")


def _notes(report: Record) -> str:
    notes = ""
    if not report["complete"]:
        notes += "<p><b>The search was cut short</b>: what is here was measured.</p>"
    if report["machine_load"]["busy"]:
        cores = report["machine_load"]["other_cores"]
        notes += f"<p><b>The machine was busy</b>: other processes kept {cores:.2f} cores "
        notes += "busy while timing; PyTorch's threads stall first.</p>"
    return notes


def _headline(report: Record) -> str:
    best = next((c for c in report["candidates"] if c["id"] == report["best"]), None)
    notes = _notes(report)
    if best is None or (last := _last(best)) is None:
        return f"<h1>No candidate met the budget</h1>{notes}"
    quality, budget = best["quality"], report["budget"]
    if report["objective"] == "latency":
        decode = last["decode_ms"]["p50"]
        speed = ("decode", f"{decode:.1f} ms/token", f"{last['decode_tokens_per_s']:.1f} tokens/s")
    else:  # requests at once have no one decode time: whole generations' tokens/s
        at_once = f"{report['concurrency']} request{'s' * (report['concurrency'] > 1)} at once"
        speed = ("throughput", f"{last['output_tokens_per_s']:.1f} tokens/s", at_once)
    cards = look.cards(
        [
            speed,
            ("speedup", f"{last['speedup']:.2f}x", f"over {report['baseline']}, same round"),
            ("top-1", f"{quality['top1_agreement']:.3f}", f"budget >= {budget['min_top1']}"),
            ("mean KL", f"{quality['kl_mean']:.4f}", f"budget <= {budget['max_kl']} nats"),
        ]
    )
    return f"<h1>{_e(best['id'])} wins</h1>{notes}{cards}"


def _why(report: Record) -> str:
    items = "".join(f"<li><b>{_e(c['id'])}</b>: {_e(c['why'])}</li>" for c in report["candidates"])
    return f"<h2>Why</h2><ul>{items}</ul>"


def _table(report: Record) -> str:
    head = ("candidate", "status", "threads", "ms/tok p50", "p90", "TTFT ms", "tok/s",
            "speedup", "rounds", "top-1", "KL", "ppl", "greedy", "MB")  # fmt: skip
    rows = []
    for c in report["candidates"]:
        last, q = _last(c) or {}, c["quality"] or {}
        decode = last.get("decode_ms", {})
        cells = [
            c["threads"],
            _number(decode.get("p50"), ".2f"),
            _number(decode.get("p90"), ".2f"),
            _number(last.get("ttft_ms_p50"), ".0f"),
            _number(last.get("output_tokens_per_s"), ".1f"),
            _number(last.get("speedup"), ".2f", "x"),
            len(c["rounds"]) or "",
            _number(q.get("top1_agreement"), ".3f"),
            _number(q.get("kl_mean"), ".4f"),
            _number(q.get("perplexity"), ".3g"),
            _number(q.get("greedy_agreement"), ".0%"),
            _number(c["size_mb"], ".0f"),
        ]
        colour = look.ROLES[_role(report, c)][1]
        status = c["status"] if c["reason"] is None else f"{c['status']}: {c['reason']}"
        rows.append(
            f'<tr><td><span style="color:{colour}">&#9679;</span> {_e(c["id"])}</td>'
            f"<td>{_e(status)}</td>"
            + "".join(f'<td class="num">{_e(x)}</td>' for x in cells)
            + "</tr>"
        )
    header = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join(rows)
    return (
        f"<h2>Candidates</h2><table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"
    )


def _number(value: float | None, spec: str, unit: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{unit}"


def _plots(report: Record) -> str:
    latency = report["objective"] == "latency"
    speed = "decode_tokens_per_s" if latency else "output_tokens_per_s"
    unit = (
        "decode tokens/s at batch 1"
        if latency
        else f"output tokens/s, {report['concurrency']} at once"
    )
    marks = []
    for c in report["candidates"]:
        last = _last(c)
        if last is None or c["quality"] is None or last[speed] is None:
            continue
        top1 = c["quality"]["top1_agreement"]
        tip = (f"{c['id']}: {last[speed]:.1f} {unit}, "
               f"top-1 {top1:.3f}, KL {c['quality']['kl_mean']:.4f}")  # fmt: skip
        marks.append(look.Mark(c["id"], _role(report, c), tip, last[speed], top1, last["speedup"]))
    if not marks:
        return ""
    marks = [dataclasses.replace(m, on_front=_on_front(m, marks)) for m in marks]
    scatter = look.scatter_svg(
        marks, throughput=True, xlabel=f"{unit} (right is better)",
        ylabel="top-1 agreement with the fp32 reference (up is better)", nines=False,
        budget=report["budget"]["min_top1"],
    )  # fmt: skip
    bars = look.speedup_svg(sorted(marks, key=lambda m: -(m.speedup or 0)), report["baseline"])
    return (
        "<h2>Plots</h2>"
        f"<figure><h3>Speed against fidelity</h3>{scatter}<figcaption>Candidates timed; those "
        "that missed the budget were rejected before timing and are in the table only. The grey "
        "step line is the Pareto front (nothing is both faster and more faithful than a point on "
        "it); shaded: under the top-1 budget.</figcaption></figure>"
        f"<figure><h3>Speedup over the baseline</h3>{bars}<figcaption>Each candidate's last "
        "round, against the baseline timed beside it in that round.</figcaption></figure>"
    )


def _on_front(mark: look.Mark, marks: Sequence[look.Mark]) -> bool:
    """Whether no other mark is both at least as fast and at least as faithful, and better in
    one of the two (the Pareto front the scatter draws and labels)."""
    fidelity = mark.fidelity or 0.0
    return not any(
        o.speed >= mark.speed
        and (o.fidelity or 0.0) >= fidelity
        and (o.speed > mark.speed or (o.fidelity or 0.0) > fidelity)
        for o in marks
    )


def _context(report: Record) -> str:
    machine, model, workload = report["machine"], report["model"], report["workload"]
    budget, seconds = report["budget"], report["time_budget_s"]
    latency = report["objective"] == "latency"
    return "<h2>What was measured</h2>" + look.facts(
        {
            "machine": f"{machine['cpu']}, {machine['physical_cores']} cores, "
            f"{machine['memory_gb']:.0f} GiB",
            "ISA": machine["isa"],
            "model": f"{model['name']} ({model['architecture']}, {model['parameters']:,} "
            f"parameters) from {model['source']}",
            "prompts": f"{workload['prompts']} ({workload['origin']}), batch 1, greedy, stop "
            "tokens ignored while timed",
            "objective": f"{report['objective']}: "
            + ("median decode ms per token" if latency else "output tokens/s, whole generations"),
            "budget": f"top-1 >= {budget['min_top1']}, mean KL <= {budget['max_kl']} nats, "
            "teacher-forced on held-out text against the fp32 reference",
            "time": f"{report['elapsed_s']:.0f} s"
            + ("" if seconds is None else f" of a {seconds:.0f} s budget"),
        }
    )


if __name__ == "__main__":
    import json
    import sys
    from pathlib import Path

    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m mahir.report.llm_html path/to/report.json")
    source = Path(sys.argv[1])
    target = source.with_name("report.html")
    target.write_text(render_llm_html(json.loads(source.read_text())))
    print(target)
