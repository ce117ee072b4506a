"""The answer to "why is it slow, and how much faster could it get?" for one model, runtime and
batch: the machine and its peaks, the whole model against the roofline, the time by op type,
and the heaviest ops each with its bound and one sentence of advice. It renders itself for
people (`__rich__`) and writes itself for machines (`to_json`), as mahir's other results do.

Sits in profile/: imports hardware, peaks, measure and the other profile rooms.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from mahir.hardware import Machine
from mahir.measure import BUSY_CORES
from mahir.paper_peaks import PaperPeaks
from mahir.peaks import Peaks, rate
from mahir.profile.breakdown import Breakdown, GpuTime, OpTime
from mahir.profile.roofline import Roofline, advice, place, ridge, whole

SEEN = 0.8
"""Below this share of a call in its ops, the time between ops is worth a note."""


@dataclass(frozen=True, slots=True)
class TypeRow:
    """The ops of one type together."""

    op_type: str
    count: int
    roof: Roofline


@dataclass
class Profile:
    """One profiled call: what ran, how long each op took, and how close it came to the roofs."""

    model: str
    runtime: str
    machine: Machine
    shapes: dict[str, tuple[int, ...]]
    """The batch's input shapes."""
    peaks: Peaks
    paper: PaperPeaks
    breakdown: Breakdown
    padding: float = 0.0
    """Share of the batch's tokens that are padding (text models)."""
    top: int = 10
    date: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat())

    @property
    def latency_s(self) -> float:
        return self.breakdown.latency.p50_ms / 1e3

    @property
    def whole(self) -> Roofline:
        return whole(self.breakdown.ops, self.latency_s, self.peaks)

    def by_type(self) -> list[TypeRow]:
        """Op types by the time their ops took together, the most first."""
        groups: dict[str, list[OpTime]] = {}
        for op in self.breakdown.ops:
            groups.setdefault(op.op_type, []).append(op)
        rows = [
            TypeRow(name, len(ops), whole(ops, sum(op.seconds for op in ops), self.peaks))
            for name, ops in groups.items()
        ]
        return sorted(rows, key=lambda row: -row.roof.seconds)

    def heaviest(self) -> list[tuple[OpTime, Roofline, str]]:
        """The `top` ops by time, each placed on the roofline, with its advice."""
        ops = sorted(self.breakdown.ops, key=lambda op: -op.seconds)[: self.top]
        gpu = self.breakdown.gpu is not None
        placed = [(op, place(op, self.peaks)) for op in ops]
        return [
            (op, roof, advice(op, roof, self.peaks, gpu=gpu, padding=self.padding))
            for op, roof in placed
        ]

    def notes(self) -> list[str]:
        """What a reader must know to trust the numbers."""
        found = []
        latency = self.breakdown.latency
        if latency.other_load > BUSY_CORES:
            found.append(
                f"the machine was busy (other processes kept {latency.other_load:.2f} cores "
                "busy while timing): times are likely high and fractions low"
            )
        if any(p.busy for p in self.peaks.peaks):
            found.append("peaks measured on a busy machine: likely low, fractions high")
        if any((place(op, self.peaks).bytes_fraction or 0) > 1 for op in self.breakdown.ops):
            found.append(
                "ops above 100% of the memory bandwidth kept their operands in cache: the roof "
                "is DRAM's, and they beat it"
            )
        b = self.breakdown
        if b.gpu is not None and b.coverage < SEEN:
            found.append(
                f"the GPU computes during {b.coverage:.0%} of a call: the rest it waits on the "
                "host (launching each kernel, copying inputs and outputs); CUDA graphs "
                "(torch-compile on a GPU) launch the whole forward at once"
            )
        elif b.coverage < SEEN:
            found.append(
                f"the profiler sees {b.coverage:.0%} of a call: the rest goes between ops (the "
                "runtime's dispatch, threads handing work over or waiting for a core)"
            )
        elif b.op_seconds < SEEN * b.call_s:
            found.append(
                f"each call spends {b.coverage:.0%} of its time in ops, yet the ops' median times "
                f"sum to {b.op_seconds * 1e3:.3g} of its {b.call_s * 1e3:.3g} ms: ops stall now "
                "and then (threads waiting for a core: another process, or more threads than "
                "free cores)"
            )
        uncosted = sum(op.cost is None for op in self.breakdown.ops)
        if uncosted:
            found.append(f"{uncosted} ops not costed (shapes unknown): off the roofline")
        return [*found, *self.breakdown.notes]

    def to_json(self) -> dict[str, Any]:
        b = self.breakdown
        heavy = {op.name: text for op, _, text in self.heaviest()}
        return {
            "date": self.date,
            "model": self.model,
            "runtime": self.runtime,
            "device": self.peaks.device,
            "machine": self.machine.to_dict(),
            "inputs": {name: list(shape) for name, shape in self.shapes.items()},
            "padding": self.padding,
            "settings": b.settings,
            "peaks": _peaks_json(self.peaks, self.paper),
            "latency": {
                "p50_ms": b.latency.p50_ms,
                "p90_ms": b.latency.p90_ms,
                "runs": len(b.latency.latencies_ms),
                "other_load": b.latency.other_load,
            },
            "profiled": {
                "runs": len(b.calls),
                "call_ms": b.call_s * 1e3,
                "op_ms": b.op_seconds * 1e3,
                "coverage": b.coverage,
            },
            "gpu": None if b.gpu is None else _gpu_json(b.gpu, b.call_s),
            "whole": _roof_json(self.whole),
            "by_type": [
                {"op_type": r.op_type, "count": r.count, **_roof_json(r.roof)}
                for r in self.by_type()
            ],
            "ops": [
                {
                    "name": op.name,
                    "op_type": op.op_type,
                    "kind": op.cost.kind if op.cost else None,
                    "exec_type": op.exec_type,
                    "precision": op.computes_in,
                    **_roof_json(place(op, self.peaks)),
                    "advice": heavy.get(op.name),
                }
                for op in b.ops
            ],
            "notes": self.notes(),
        }

    def __rich__(self) -> Group:
        heaviest = self.heaviest()
        total = self.breakdown.op_seconds
        return Group(
            *(Text(line) for line in self._header()),
            _type_table(self.by_type(), total),
            _heavy_table(heaviest, total),
            *(Text(line) for line in _advice_lines([text for _, _, text in heaviest])),
            *(Text(f"note: {note}", style="bold red") for note in self.notes()),
        )

    def _header(self) -> list[str]:
        b, w = self.breakdown, self.whole
        shapes = ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in self.shapes.items())
        lines = [
            f"{self.model} on {self.runtime}, {self.peaks.device}: {shapes}",
            f"machine: {self.machine.summary()}",
            f"peaks measured: {self.peaks.summary().split(': ', 1)[-1]}",
            f"peaks on paper: {_paper(self.paper)}",
            f"latency {b.latency.p50_ms:.3g} ms (p50 of {len(b.latency.latencies_ms)} calls); "
            f"profiled: calls {b.call_s * 1e3:.3g} ms, ops {b.op_seconds * 1e3:.3g} ms, "
            f"{b.coverage:.0%} of each call seen in its ops (medians of {len(b.calls)})",
        ]
        if b.gpu is not None:
            g = b.gpu
            lines.append(
                f"GPU: kernels {g.kernel_s * 1e3:.3g} ms of the {b.call_s * 1e3:.3g} ms call "
                f"({g.kernel_s / b.call_s:.0%} busy); {g.kernels} kernels, "
                f"{g.launch_s * 1e3:.3g} ms launching them on the host"
            )
        lines.append(f"whole model: {_whole(w, self.peaks)}")
        return lines


def _whole(w: Roofline, peaks: Peaks) -> str:
    parts = [f"{w.flops / 1e9:.3g} GFLOP and {w.bytes / 1e6:.3g} MB moved a call"]
    if w.flops_fraction is not None and w.peak:
        parts.append(
            f"{rate(w.flops / w.seconds)}FLOP/s = {w.flops_fraction:.0%} of the {w.peak} peak"
        )
    if w.bytes_fraction is not None:
        parts.append(f"{rate(w.bytes / w.seconds)}B/s = {w.bytes_fraction:.0%} of bandwidth")
    if w.fraction is not None and w.roof_s is not None:
        parts.append(
            f"the roofs allow {w.roof_s * 1e3:.3g} ms of its {w.seconds * 1e3:.3g} ms: "
            f"{w.fraction:.0%} of the roofline, {w.bound}-bound"
        )
    point = ridge(peaks, w.peak or "fp32")
    if w.intensity is not None and point is not None:
        parts.append(f"intensity {w.intensity:.3g} FLOP/B (ridge {point:.3g})")
    return "; ".join(parts)


def _paper(paper: PaperPeaks) -> str:
    found = ", ".join(
        f"{d} {rate(v)}{'OP' if d == 'int8' else 'FLOP'}/s" for d, v in paper.flops_per_s.items()
    )
    if paper.bytes_per_s is not None:
        found += f", memory {rate(paper.bytes_per_s)}B/s"
    how = f" ({paper.how})" if paper.how else ""
    unknown = f"; {paper.unknown}" if paper.unknown else ""
    return f"{found or 'unknown'}{how}{unknown}"


TYPES_SHOWN = 8


def _type_table(rows: list[TypeRow], total_s: float) -> Table:
    shown, rest = rows[:TYPES_SHOWN], rows[TYPES_SHOWN:]
    caption = None
    if rest:
        rest_s = sum(r.roof.seconds for r in rest)
        caption = f"{len(rest)} more types: {rest_s * 1e3:.3g} ms ({_share(rest_s / total_s)})"
    table = Table(title="time by op type", caption=caption)
    columns = ("op type", "ops", "ms", "% time", "GFLOP", "MB", "GFLOP/s", "GB/s", "roofline")
    for column in (*columns, "bound"):
        table.add_column(column, justify="left" if column == "op type" else "right")
    for row in shown:
        r = row.roof
        table.add_row(
            row.op_type.rsplit(".", 1)[-1],
            str(row.count),
            f"{r.seconds * 1e3:.3g}",
            _share(r.seconds / total_s if total_s > 0 else None),
            *_rates(r),
            _share(r.fraction),
            r.bound,
        )
    return table


def _heavy_table(rows: list[tuple[OpTime, Roofline, str]], total_s: float) -> Table:
    table = Table(title="heaviest ops (what would help: below, by number)")
    columns = ("#", "op", "type", "ran as", "ms", "% time", "GFLOP/s", "% peak", "GB/s", "% bw")
    for column in (*columns, "FLOP/B", "bound"):
        table.add_column(column, justify="left" if column in ("op", "type", "ran as") else "right")
    for i, (op, roof, _) in enumerate(rows, 1):
        table.add_row(
            str(i),
            op.name[-40:],
            op.op_type.rsplit(".", 1)[-1],
            f"{op.exec_type} {op.computes_in}".strip(),
            f"{roof.seconds * 1e3:.3g}",
            _share(roof.seconds / total_s if total_s > 0 else None),
            _per_s(roof.flops, roof),
            _share(roof.flops_fraction),
            _per_s(roof.bytes, roof),
            _share(roof.bytes_fraction),
            "" if roof.intensity is None else f"{roof.intensity:.3g}",
            roof.bound,
        )
    return table


def _advice_lines(texts: list[str]) -> list[str]:
    """One line per distinct advice, led by the numbers of the ops it is for ("1-3, 5")."""
    numbers: dict[str, list[int]] = {}
    for i, text in enumerate(texts, 1):
        numbers.setdefault(text, []).append(i)
    return [f"{_ranges(found)}: {text}" for text, found in numbers.items()]


def _ranges(numbers: list[int]) -> str:
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)


def _rates(r: Roofline) -> tuple[str, str, str, str]:
    """GFLOP, MB, GFLOP/s, GB/s of a row."""
    return f"{r.flops / 1e9:.3g}", f"{r.bytes / 1e6:.3g}", _per_s(r.flops, r), _per_s(r.bytes, r)


def _per_s(amount: float, r: Roofline) -> str:
    """`amount` per second of `r`'s time, in billions."""
    return f"{amount / r.seconds / 1e9:.3g}" if r.seconds > 0 else ""


def _share(value: float | None) -> str:
    return "" if value is None else f"{value:.0%}"


def _roof_json(r: Roofline) -> dict[str, Any]:
    return {
        "ms": r.seconds * 1e3,
        "flops": r.flops,
        "bytes": r.bytes,
        "peak": r.peak,
        "flops_fraction": r.flops_fraction,
        "bytes_fraction": r.bytes_fraction,
        "roofline_fraction": r.fraction,
        "intensity": r.intensity,
        "bound": r.bound,
    }


def _peaks_json(peaks: Peaks, paper: PaperPeaks) -> dict[str, Any]:
    memory = peaks.bandwidth
    return {
        "name": peaks.name,
        "method": peaks.method(),
        "measured": {p.dtype: p.flops_per_s for p in peaks.peaks},
        "bandwidth": None if memory is None else memory.bytes_per_s,
        "paper": {
            "flops_per_s": paper.flops_per_s,
            "bandwidth": paper.bytes_per_s,
            "how": paper.how,
            "unknown": paper.unknown,
        },
    }


def _gpu_json(gpu: GpuTime, call_s: float) -> dict[str, Any]:
    return {
        "kernel_ms": gpu.kernel_s * 1e3,
        "kernels": gpu.kernels,
        "launch_ms": gpu.launch_s * 1e3,
        "idle_ms": max(0.0, call_s - gpu.kernel_s) * 1e3,
    }
