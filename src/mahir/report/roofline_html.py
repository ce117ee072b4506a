"""report.html's roofline section: the baseline and the winner on one batch, each against what
the device allows, in a plot and a sentence each: how much is left on the table, and where.

Works on the report's records (`schema.RooflineRecord`, written by `search/rooflines.py`), so
an old report.json without them renders without the section. The plot's look is `plots.py`'s.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.lines import Line2D

from mahir.report import plots as look
from mahir.report.schema import RooflineRecord, RoofRecord

BOUND_WORDS = {
    "compute": "compute-bound",
    "memory": "memory-bound",
    "overhead": "overhead-bound (time neither roof explains: dispatch, threads, launches)",
    "unknown": "not placed (no peak or cost)",
}


def roofline_section(records: Sequence[RooflineRecord], note: str | None) -> str:
    """The section, or nothing when there is neither a record nor a reason for none."""
    if not records and not note:
        return ""
    parts = ["<section><h2>How much is left on the table</h2>"]
    if records:
        parts.append("<ul>" + "".join(f"<li>{_sentence(r)}</li>" for r in records) + "</ul>")
        parts.append(look.figure(roofline_svg(records), "roofline"))
        parts += [
            f'<p class="note">{html.escape(r.label)}: {html.escape(n)}</p>'
            for r in records
            for n in r.notes
        ]
    if note:
        parts.append(f'<p class="note">Not profiled: {html.escape(note)}.</p>')
    return "".join(parts) + "</section>"


def _sentence(r: RooflineRecord) -> str:
    w = r.whole
    shapes = ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in r.inputs.items())
    where = r.candidate if r.candidate == r.runtime else f"{r.candidate} on {r.runtime}"
    text = f"<b>{html.escape(r.label)}</b> ({html.escape(where)}, {html.escape(shapes)}): "
    text += f"{w.ms:.3g} ms a call, {w.flops / 1e9:.3g} GFLOP and "
    text += f"{w.bytes / 1e6:.3g} MB moved"
    if w.roofline_fraction is not None and w.roofline_fraction > 0:
        left = 1 / w.roofline_fraction
        text += (
            f"; {w.roofline_fraction:.0%} of the roofline, {BOUND_WORDS[w.bound]}: the roofs allow "
            f"{w.ms * w.roofline_fraction:.3g} ms, so up to {left:.1f}x is left on the table"
        )
    heaviest = next((op for op in r.ops if op.advice), None)
    if heaviest is not None:
        text += (
            f". Heaviest: {html.escape(heaviest.op_type)} {html.escape(heaviest.name)} "
            f"({heaviest.ms:.3g} ms, {BOUND_WORDS[heaviest.bound].split(' (')[0]}): "
            f"{html.escape((heaviest.advice or '').rstrip('.'))}"
        )
    return text + "."


@look.styled
def roofline_svg(records: Sequence[RooflineRecord]) -> str:
    """Achieved FLOP/s against intensity for each record's call and heaviest ops, under the
    measured roofs."""
    fig, ax = look.new_axes(4.4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    marks: list[tuple[RooflineRecord, RoofRecord, bool]] = [
        (r, roof, roof is r.whole)
        for r in records
        for roof in (r.whole, *r.ops)
        if roof.intensity and roof.ms > 0 and roof.flops > 0
    ]
    if not marks:
        return look.to_svg(fig, "roofline", [])
    xs = [roof.intensity or 1.0 for _, roof, _ in marks]
    low, high = min(xs) / 4, max(xs) * 4
    _roofs(ax, records[0], low, high)
    tips = []
    for i, (r, roof, whole) in enumerate(marks):
        role = "winner" if r.label == "winner" else "baseline"
        size, shape = (260, "*" if role == "winner" else "o") if whole else (28, "o")
        achieved = roof.flops / (roof.ms / 1e3)
        ax.scatter([roof.intensity or 1.0], [achieved], s=size, marker=shape,
                   fc=look.ROLES[role][1], ec="white", lw=0.8, alpha=1.0 if whole else 0.7,
                   zorder=3, gid=f"pt-{i}")  # fmt: skip
        tips.append(_tip(r, roof, achieved))
    ax.set_xlim(low, high)
    ax.set_xlabel("FLOPs per byte moved (arithmetic intensity)")
    ax.set_ylabel("FLOP/s achieved")
    ax.legend(handles=_legend(records), loc="lower right")
    return look.to_svg(fig, "roofline", tips)


def _roofs(ax: Axes, r: RooflineRecord, low: float, high: float) -> None:
    """The memory slope up to the call's own precision peak, and the other peaks dashed."""
    own = r.compute_peaks.get(r.whole.peak or "")
    if r.bandwidth and own:
        x = np.geomspace(low, high, 200)
        ax.plot(x, np.minimum(own, r.bandwidth * x), color=look.INK, lw=1.6, zorder=2)
        ax.annotate(f"{r.whole.peak} peak {_per_s(own, r.whole.peak)}", (high, own),
                    xytext=(-4, 4), textcoords="offset points", ha="right",
                    color=look.INK)  # fmt: skip
    for dtype, peak in r.compute_peaks.items():
        if dtype != r.whole.peak and math.isfinite(peak):
            ax.axhline(peak, color=look.MUTED, lw=1, ls=(0, (4, 3)), zorder=1)
            ax.annotate(f"{dtype} {_per_s(peak, dtype)}", (low, peak), xytext=(4, 3),
                        textcoords="offset points", color=look.MUTED)  # fmt: skip


def _tip(r: RooflineRecord, roof: RoofRecord, achieved: float) -> str:
    what = "whole call" if roof is r.whole else f"{roof.op_type} {roof.name}"
    share = "" if roof.roofline_fraction is None else f", {roof.roofline_fraction:.0%} of roofline"
    return (
        f"{r.label} ({r.candidate}), {what}: {roof.ms:.3g} ms, {look.per_s(achieved)} at "
        f"{roof.intensity:.3g} FLOP/byte, {roof.bound}-bound{share}"
    )


def _per_s(rate: float, dtype: str | None) -> str:
    """A peak in its own unit: integer operations for int8."""
    return look.per_s(rate, "OP" if dtype == "int8" else "FLOP")


def _legend(records: Sequence[RooflineRecord]) -> list[Artist]:
    handles: list[Artist] = []
    for r in records:
        role = "winner" if r.label == "winner" else "baseline"
        shape = "*" if role == "winner" else "o"
        handles.append(Line2D([], [], ls="", marker=shape, ms=10, mfc=look.ROLES[role][1],
                              mec="white", label=f"{r.label}: {r.candidate}"))  # fmt: skip
    return handles
