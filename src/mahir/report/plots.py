"""How the report looks: the palette the table and plots share, the page's stylesheet, number
formats, small HTML pieces (cards, fact lists), and the three plots as inline SVG (speed against
fidelity, speedups, latency spread).

Plain data in (`Mark`, one candidate as the plots see it), HTML out: this module knows nothing of
report.json, so `html.py` alone decides what each candidate is and says. Figures are built on
`Figure` with an explicit `FigureCanvasSVG`, never through pyplot, so no figure is registered
anywhere and each is freed with its last reference; rcParams change only inside `rc_context`.
Text is drawn as paths, so a plot looks the same on any machine. Imports nothing from mahir.
"""

from __future__ import annotations

import functools
import html
import io
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, ParamSpec

import numpy as np
from matplotlib import rc_context
from matplotlib.axes import Axes
from matplotlib.backends.backend_svg import FigureCanvasSVG
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

P = ParamSpec("P")

# role -> (words in the table and legends, colour in the table and every plot)
ROLES: dict[str, tuple[str, str]] = {
    "winner": ("winner", "#1971c2"),
    "baseline": ("baseline", "#868e96"),
    "ok": ("met budget", "#2f9e44"),
    "rejected": ("missed budget", "#f08c00"),
    "failed": ("failed", "#e03131"),
    "skipped": ("not tried", "#adb5bd"),
}
INK, MUTED, BUDGET = "#212529", "#6c757d", "#c92a2a"
STYLE: dict[RcKeyType, Any] = {
    "svg.fonttype": "path",
    "svg.hashsalt": "mahir",  # stable ids: the same report renders to the same bytes
    "font.family": "DejaVu Sans",
    "font.size": 9.5,
    "axes.edgecolor": "#adb5bd",
    "axes.labelcolor": INK,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.color": "#e9ecef",
    "xtick.color": "#adb5bd",
    "ytick.color": "#adb5bd",
    "xtick.labelcolor": INK,
    "ytick.labelcolor": INK,
    "legend.frameon": False,
}
FLOOR = 1e-6  # cosines within a millionth of 1 sit at 0.999999: "exact" is not a place on a log
FIGURES = {  # plot -> (title, caption)
    "scatter": ("Speed against fidelity", "The grey step line is the Pareto front: nothing is "
                "both faster and more faithful than a point on it. Shaded: outside the budget. "
                "Hover a marker for its numbers."),
    "speedup": ("Speedup over the baseline", "At the batch the objective judges; the baseline "
                "is the model as given, at 1.0."),
    "latency": ("Latency distribution", "Per batch: box from p25 to p75, line at the median, "
                "whiskers p1 to p99, dots beyond. A long tail costs at p99 even when the median "
                "is low."),
    "roofline": ("Roofline", "FLOP/s achieved against FLOPs per byte moved, both logarithmic. "
                 "The solid roof is what the device allows at each intensity (measured bandwidth "
                 "up the slope, the measured matmul peak of the call's precision flat); dashed: "
                 "the other precisions' peaks. Large marks: a whole call; small: its heaviest "
                 "ops. Hover a mark for its numbers."),
}  # fmt: skip


def ms(x: float) -> str:
    """Milliseconds to about three significant digits: 0.412, 3.50, 16.6, 130."""
    return f"{x:,.{3 if x < 1 else 2 if x < 10 else 1 if x < 100 else 0}f}"


def rate(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def per_s(x: float, unit: str = "FLOP") -> str:
    """A rate in SI prefixes, three digits: 149 GFLOP/s, 790 TFLOP/s."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g} {prefix}{unit}/s"
    return f"{x:.3g} {unit}/s"


def share(x: float) -> str:
    """A fraction as a percentage to two significant digits: 49%, 2.3%, 0.041%."""
    percent = 100 * x
    return f"{percent:.0f}%" if percent >= 10 else f"{percent:.2g}%"


def times(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def cos(x: float) -> str:
    """Enough digits to show the first digit that is not a 9 (0.983, 0.99998), at least 3."""
    nines = -math.log10(max(1.0 - x, 1e-12))
    digits = max(3, min(6, math.ceil(nines - 1e-9) + 1))
    return f"{x:.{digits}f}".rstrip("0").ljust(5, "0")


def duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    parts = ([f"{minutes} min"] if minutes else []) + ([f"{secs} s"] if secs else [])
    return " ".join(parts) or "0 s"


def styled(draw: Callable[P, str]) -> Callable[P, str]:
    """Draw with the report's rcParams, restored afterwards: no global matplotlib state changes."""

    @functools.wraps(draw)
    def styled(*args: P.args, **kwargs: P.kwargs) -> str:
        with rc_context(STYLE):
            return draw(*args, **kwargs)

    return styled


@dataclass(frozen=True, slots=True)
class Mark:
    """One timed candidate as the plots see it."""

    label: str
    role: str
    """A key of `ROLES`: its colour and legend words."""
    tooltip: str
    speed: float
    """p50 ms, or samples/s under the throughput objective."""
    fidelity: float | None = None
    speedup: float | None = None
    samples: tuple[float, ...] = ()
    """Latencies in ms at the batch the objective judges."""
    on_front: bool = False


def plots_html(
    marks: Sequence[Mark],
    *,
    batch: int | None,
    metric: str | None,
    budget: float | None,
    baseline: str,
) -> str:
    """The three figures, fastest candidate on top. `batch` is the batch the latency objective
    judges (None: throughput, best batch per candidate); `metric` names the user metric judged
    instead of the worst cosine; `baseline` names what speedups are over. A plot with nothing
    to show is left out."""
    throughput = batch is None
    marks = sorted(marks, key=lambda m: -m.speed if throughput else m.speed)
    scatter = [m for m in marks if m.fidelity is not None]
    bars = sorted((m for m in marks if m.speedup is not None), key=lambda m: -(m.speedup or 0))
    boxes = [m for m in marks if m.samples]
    figures = []
    if scatter:
        xlabel = f"p50 latency at batch {batch}, ms (left is better)"
        if throughput:
            xlabel = "samples/s at the best batch (right is better)"
        ylabel = f"{metric} (up is better)" if metric else "worst-sample cosine (up is better)"
        svg = scatter_svg(scatter, throughput=throughput, xlabel=xlabel, ylabel=ylabel,
                          nines=metric is None, budget=budget)  # fmt: skip
        figures.append(figure(svg, "scatter"))
    if bars:
        figures.append(figure(speedup_svg(bars, baseline), "speedup"))
    if boxes:
        figures.append(figure(latency_svg(boxes), "latency"))
    return "".join(figures)


def cards(items: Sequence[tuple[str, str, str]]) -> str:
    """Headline numbers as cards: (what, value, what it is compared with)."""
    body = "".join(
        f'<div class="card"><small>{html.escape(what)}</small><b>{html.escape(value)}</b>'
        f"<span>{html.escape(sub)}</span></div>"
        for what, value, sub in items
    )
    return f'<div class="cards">{body}</div>'


def facts(rows: Mapping[str, str | Sequence[str]]) -> str:
    """A definition list; a sequence value (ISA flags) is shown as a row of code chips."""

    def value(v: str | Sequence[str]) -> str:
        if isinstance(v, str):
            return html.escape(v)
        return " ".join(f"<code>{html.escape(x)}</code>" for x in v)

    return (
        "<dl>"
        + "".join(f"<dt>{html.escape(k)}</dt><dd>{value(v)}</dd>" for k, v in rows.items())
        + "</dl>"
    )


def figure(svg: str, name: str) -> str:
    title, caption = FIGURES[name]
    return f"<figure><h3>{title}</h3>{svg}<figcaption>{caption}</figcaption></figure>"


@styled
def scatter_svg(
    marks: Sequence[Mark],
    *,
    throughput: bool,
    xlabel: str,
    ylabel: str,
    nines: bool,
    budget: float | None,
) -> str:
    """Speed against fidelity, so the trade each candidate makes is visible at a glance."""
    fig, ax = new_axes(4.4)
    top = 1 - FLOOR if nines else math.inf
    points = [(m, m.speed, min(m.fidelity, top)) for m in marks if m.fidelity is not None]
    ys = [y for _, _, y in points] + ([budget] if budget is not None else [])
    if nines:
        _nines_axis(ax, min(ys), max(ys))
    xs = [x for _, x, _ in points]
    log = min(xs) > 0 and max(xs) / min(xs) > 8
    if log:
        ax.set_xscale("log")
    position = np.log(xs) if log else np.array(xs)
    right = position > position.min() + 0.75 * np.ptp(position)  # labels there go leftwards
    front = sorted((x, y) for m, x, y in points if m.on_front)
    if front:
        where: Literal["pre", "post"] = "pre" if throughput else "post"
        ax.step(*zip(*front, strict=True), where=where, color=MUTED, lw=1.4, alpha=0.7, zorder=1)
    for i, (m, x, y) in enumerate(points):
        size, shape = (320, "*") if m.role == "winner" else (70, "o")
        ax.scatter([x], [y], s=size, marker=shape, fc=ROLES[m.role][1], ec="white", lw=1,
                   zorder=3, gid=f"pt-{i}")  # fmt: skip
        if m.on_front or m.role == "rejected":
            ax.annotate(_plain(m.label), (x, y), xytext=(-8 if right[i] else 8, 6),
                        textcoords="offset points", ha="right" if right[i] else "left")  # fmt: skip
    if not nines:
        ax.margins(y=0.15)
    if budget is not None:  # after the points, so the shading spans the final limits
        low, high = ax.get_ylim()
        ax.axhline(budget, color=BUDGET, lw=1, ls=(0, (5, 3)), zorder=1)
        ax.axhspan(min(low, budget), budget, color=BUDGET, alpha=0.05, lw=0, zorder=0)
        ax.set_ylim(low, high)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _legend(ax, marks, front=bool(front), budget=budget is not None)
    return to_svg(fig, "scatter", [m.tooltip for m, _, _ in points])


@styled
def speedup_svg(marks: Sequence[Mark], baseline: str) -> str:
    """Horizontal speedup bars in the given order, top down, with the baseline's 1.0 dashed."""
    fig, ax = new_axes(0.9 + 0.34 * len(marks))
    values = [m.speedup or 0.0 for m in marks]
    ypos = np.arange(len(marks))[::-1]
    bars = ax.barh(ypos, values, color=[ROLES[m.role][1] for m in marks], height=0.62)
    for i, (bar, value) in enumerate(zip(bars.patches, values, strict=True)):
        bar.set_gid(f"bar-{i}")
        ax.annotate(times(value), (value, bar.get_y() + bar.get_height() / 2), xytext=(4, 0),
                    textcoords="offset points", va="center", color=INK)  # fmt: skip
    ax.axvline(1.0, color=INK, lw=1, ls=(0, (4, 3)))
    ax.set_yticks(ypos, [_plain(m.label) for m in marks])
    ax.set_xlim(0, max(*values, 1.0) * 1.12)
    ax.set_xlabel(f"speedup over {baseline} (dashed: 1.0)")
    ax.grid(axis="y", visible=False)
    return to_svg(fig, "speedup", [m.tooltip for m in marks])


@styled
def latency_svg(marks: Sequence[Mark]) -> str:
    """A box per candidate in the given order, top down: the tail that medians hide."""
    fig, ax = new_axes(0.9 + 0.38 * len(marks))
    ypos = np.arange(len(marks))[::-1] + 1
    boxes = ax.boxplot([m.samples for m in marks], positions=ypos, orientation="horizontal",
                       whis=(1, 99), patch_artist=True, widths=0.55,
                       medianprops={"color": INK, "lw": 1.6},
                       flierprops={"ms": 2.5, "mec": "none", "mfc": MUTED})  # fmt: skip
    for i, (box, m) in enumerate(zip(boxes["boxes"], marks, strict=True)):
        box.set(facecolor=ROLES[m.role][1], edgecolor=ROLES[m.role][1], alpha=0.75, gid=f"box-{i}")
    values = [v for m in marks for v in m.samples]
    if min(values) > 0 and max(values) / min(values) > 10:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yticks(ypos, [_plain(m.label) for m in marks])
    ax.set_xlabel("latency per batch, ms")
    ax.grid(axis="y", visible=False)
    return to_svg(fig, "latency", [m.tooltip for m in marks])


def new_axes(height_in: float) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(9.0, height_in), layout="constrained")
    FigureCanvasSVG(fig)
    return fig, fig.add_subplot()


def _nines_axis(ax: Axes, low: float, high: float) -> None:
    """Cosines on a 'nines' scale, 0.9, 0.99, 0.999 equally spaced: on a linear axis 0.983 and
    0.99998 both sit in the top pixel row; here both are readable."""

    def forward(y: np.ndarray) -> np.ndarray:
        return np.asarray(-np.log10(np.maximum(1.0 - np.asarray(y), 1e-12)))

    def inverse(z: np.ndarray) -> np.ndarray:
        return np.asarray(1.0 - 10.0 ** (-np.asarray(z)))

    ax.set_yscale("function", functions=(forward, inverse))
    lo, hi = forward(np.array(low)), forward(np.array(high))
    ax.set_ylim(float(inverse(lo - 0.35)), float(inverse(hi + 0.35)))
    ax.yaxis.set_major_locator(FixedLocator([0.0, 0.5, 0.8, *(1 - 10.0**-k for k in range(1, 7))]))
    ax.yaxis.set_minor_locator(FixedLocator([]))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.6f}".rstrip("0").rstrip(".")))


def _legend(ax: Axes, marks: Sequence[Mark], *, front: bool, budget: bool) -> None:
    handles = []
    for role in (r for r in ROLES if any(m.role == r for m in marks)):
        words, colour = ROLES[role]
        shape, size = ("*", 15) if role == "winner" else ("o", 8)
        handles.append(Line2D([], [], ls="", marker=shape, ms=size, color=colour, label=words))
    if front:
        handles.append(Line2D([], [], color=MUTED, lw=1.4, label="Pareto front"))
    if budget:
        handles.append(Line2D([], [], color=BUDGET, lw=1, ls=(0, (5, 3)), label="budget"))
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0, 1.02), ncols=len(handles),
              borderaxespad=0, handletextpad=0.3, columnspacing=1.5)  # fmt: skip


def _plain(text: str) -> str:
    """Matplotlib reads `$...$` as mathematics; a label never is."""
    return text.replace("$", r"\$")


def to_svg(fig: Figure, name: str, tooltips: Sequence[str]) -> str:
    """The figure as an inline `<svg>`: ids prefixed with the plot's name (three plots share one
    page), and a `<title>` tooltip on each element drawn with gid `pt-i`, `bar-i` or `box-i`."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata=dict.fromkeys(("Creator", "Date", "Format", "Type")))
    svg = buf.getvalue()
    svg = svg[svg.index("<svg") :]
    svg = re.sub(r"<defs>\s*<style[^<]*</style>\s*</defs>", "", svg, count=1)  # page CSS has it
    svg = re.sub(r'(\bid="|xlink:href="#|url\(#)', rf"\g<1>{name}-", svg)
    svg = re.sub(r' xmlns(:xlink)?="[^"]*"', "", svg, count=2)  # HTML knows SVG's namespaces

    def titled(match: re.Match[str]) -> str:
        tip = html.escape(tooltips[int(match[2])])
        return f'<g id="{match[1]}" class="mark"><title>{tip}</title>'

    svg = re.sub(rf'<g id="({name}-(?:pt|bar|box)-(\d+))">', titled, svg)
    return svg.replace("<svg ", f'<svg id="plot-{name}" class="plot" role="img" ', 1)


CSS = """
:root{--ink:#212529;--muted:#6c757d;--line:#dee2e6;--bg:#f8f9fa;
--font:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
*{box-sizing:border-box}body{margin:0;background:#fff;color:var(--ink);font:15px/1.55 var(--font)}
main{max-width:1100px;margin:0 auto;padding:32px 28px 64px}
.kicker{color:var(--muted);font-size:13px;letter-spacing:.02em;margin:0 0 6px}
h1{font-size:26px;line-height:1.25;margin:0 0 18px;font-weight:650}
h2{font-size:17px;margin:40px 0 12px;padding-bottom:6px;border-bottom:1px solid var(--line)}
.lead{font-size:16px}.note,figcaption{color:var(--muted);font-size:13px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(200px,1fr));gap:12px}
.card{background:var(--bg);border:1px solid var(--line);border-radius:8px;padding:12px 16px}
.card small{display:block;color:var(--muted);font-size:12px;text-transform:uppercase;
letter-spacing:.04em}.card b{display:block;font-size:24px;font-weight:650;margin:2px 0}
.card span{color:var(--muted);font-size:13px}
.meta{color:var(--muted);font-size:13.5px;margin:14px 0 0}.meta b{color:var(--ink);font-weight:600}
.banner{background:#fff4e6;border:1px solid #ffa94d;border-left:6px solid #f76707;
border-radius:6px;padding:12px 16px;margin:0 0 20px}
ul.why{list-style:none;padding:0;margin:0}ul.why li{padding:6px 0 6px 22px;position:relative}
.dot{position:absolute;left:2px;top:13px;width:10px;height:10px;border-radius:50%;
background:var(--c)}
.scroll{overflow-x:auto}table{border-collapse:collapse;width:100%;font-size:13px}
th{text-align:left;color:var(--muted);font-weight:600;border-bottom:2px solid var(--line);
padding:6px 5px;white-space:nowrap}td{padding:6px 5px;border-bottom:1px solid var(--line);
vertical-align:top}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.winner td{background:#e7f5ff}td:first-child{min-width:200px}
td small{display:block;color:var(--muted);font-size:12px}
.pill{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;white-space:nowrap;
color:#fff;background:var(--c);cursor:help}
figure{margin:24px 0 32px}figcaption{margin-top:4px}
h3{font-size:15px;margin:0 0 6px;font-weight:600}
svg.plot{display:block;width:100%;height:auto}svg.plot *{stroke-linejoin:round;stroke-linecap:butt}
svg.plot .mark{cursor:help}
.cols{display:grid;grid-template-columns:1fr 1fr;gap:0 36px}
@media (max-width:760px){.cols{grid-template-columns:1fr}}
dl{display:grid;grid-template-columns:max-content 1fr;gap:6px 16px;margin:0;font-size:14px}
dt{color:var(--muted)}dd{margin:0;overflow-wrap:anywhere}
dd code{background:var(--bg);border:1px solid var(--line);border-radius:4px;padding:0 5px;
font-size:12.5px}
code,pre{font-family:"DejaVu Sans Mono",ui-monospace,Menlo,Consolas,monospace}
pre{background:var(--bg);border:1px solid var(--line);border-radius:8px;padding:14px 16px;
font-size:13px;overflow-x:auto}
"""
