"""What `mahir optimize` found, and how it is written: report.json and report.html, the
output directory (atomically, never over an earlier model when nothing won), and the table the
command prints."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from mahir.errors import BadInput, MahirError, first_line
from mahir.flops import Cost
from mahir.hardware import Machine
from mahir.measure import load_summary
from mahir.model import Model
from mahir.peaks import Peaks, device_name
from mahir.report.schema import (
    BudgetRecord,
    CandidateRecord,
    CostRecord,
    DeviceRecord,
    PeakRecord,
    Report,
    RooflineRecord,
    report_json,
)
from mahir.search.bench import model_summary
from mahir.search.budget import MetricBudget, quality_kind
from mahir.search.halving import Budget, Outcome, comparable_speedup
from mahir.search.optimize_config import OptimizeConfig
from mahir.search.records import outcome_record
from mahir.search.utilization import utilization
from mahir.types import Artifact
from mahir.workload import Workload


@dataclass
class OptimizeResult:
    """Every candidate's outcome, the winner (None if nothing met the budget), and what they
    were measured on. `complete` is False when Ctrl-C or the time budget cut the run short."""

    model: Model
    machine: Machine
    workload: Workload
    config: OptimizeConfig
    budget: Budget
    candidates: list[Outcome]
    best: Outcome | None
    artifact: Artifact | None
    complete: bool
    elapsed_s: float
    peaks: Peaks | None = None
    """The measured matmul peaks of the device the candidates ran on (`peaks.py`)."""
    cost: Cost | None = None
    """FLOPs of one forward per batch size (`flops.py`)."""
    rooflines: list[RooflineRecord] = field(default_factory=list)
    """The baseline and the winner profiled on one batch (`rooflines.py`)."""
    roofline_note: str | None = None
    """Why a roofline is missing, when one is."""
    date: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat())

    def report(self) -> Report:
        """report.json: every candidate's recipe, timing, quality, status and reason."""
        objective = self.config.objective
        if isinstance(self.budget, MetricBudget):
            budget = BudgetRecord(
                kind="metric",
                description=self.budget.describe(),
                metric=self.budget.name,
                max_drop=self.budget.max_drop,
                baseline_metric=self.budget.baseline,
            )
        else:
            kind = next((quality_kind(o.quality) for o in self.candidates if o.quality), "outputs")
            bounds = self.budget.bounds(kind)
            budget = BudgetRecord(
                kind="fidelity",
                description=self.budget.describe(kind),
                max_drop=self.budget.max_drop,
                cosine_mean=bounds.get("cosine_mean"),
                cosine_min=bounds.get("cosine_min"),
            )
        return Report(
            date=self.date,
            complete=self.complete,
            stopped=None if self.complete else "interrupted",
            objective=objective,
            batch_sizes=list(self.config.sizes),
            budget=budget,
            machine=self.machine.to_dict(),
            model=model_summary(self.model),
            workload=self.workload.describe(self.model.family.token_lengths),
            machine_load=self.machine_load(),
            time_budget_s=self.config.time_budget_s,
            elapsed_s=self.elapsed_s,
            baseline=self.candidates[0].candidate.id,
            best=None if self.best is None else self.best.candidate.id,
            rooflines=self.rooflines,
            roofline_note=self.roofline_note,
            device=self._device(),
            cost=None if self.cost is None else CostRecord(**dataclasses.asdict(self.cost)),
            candidates=[self._record(o) for o in self.candidates],
        )

    def _record(self, outcome: Outcome) -> CandidateRecord:
        record = outcome_record(outcome, self.config.objective, self.best)
        record.utilization = utilization(outcome, self.cost, self.peaks)
        return record

    def _device(self) -> DeviceRecord:
        device, peaks = self.config.device, self.peaks
        if peaks is None:
            return DeviceRecord(device=str(device), name=device_name(self.machine, device))
        return DeviceRecord(
            device=peaks.device,
            name=peaks.name,
            method=peaks.method(),
            peaks=[PeakRecord(**dataclasses.asdict(p), busy=p.busy) for p in peaks.peaks],
        )

    def machine_load(self) -> dict[str, Any]:
        """What other processes used while this run timed (see `measure.load_summary`)."""
        timed = [o for o in self.candidates if not o.cached]
        return load_summary(p for o in timed for p in (*o.perf.values(), *o.baseline_perf.values()))

    def save(self, out: str | os.PathLike[str]) -> Path:
        """Write the output directory atomically: the winner (model/, mahir.json, recipe.yaml)
        with report.json and report.html. With no winner, only the reports are written, and
        never over an earlier run's model: then into `<out>-report` beside it. If writing fails
        (a full disk, a folder made read-only during the run), the measurements are not lost:
        the reports go to a new temporary folder, and the BadInput raised says where."""
        from mahir.outdir import MANIFEST
        from mahir.report.html import render_html
        from mahir.search.apply import Applied, write_output_dir

        out = Path(out)
        report = self.report()
        extra = {
            "report.json": report_json(report),
            "report.html": render_html(report),
        }
        applied = None
        if self.best is not None and self.artifact is not None and self.best.quality is not None:
            applied = Applied(self.artifact, self.best.candidate.recipe, self.best.quality)
        elif (out / MANIFEST).is_file():
            out = out.with_name(f"{out.name}-report")
        try:
            write_output_dir(self.model, applied, out, extra=extra)
        except (OSError, MahirError) as err:
            kept = _keep_reports(extra)
            raise BadInput(
                f"cannot write {out} ({first_line(err)}); report.json and report.html are in "
                f"{kept}: put that right and run again with --resume to reuse the measurements"
            ) from err
        return out

    def __rich__(self) -> Table:
        title = f"{self.model.name} on {self.machine.summary()}"
        caption = f"budget: {self.report().budget.description}; quality: mean / worst on "
        caption += "every input judged, held-out ones included; tuned on: worst on calibration"
        if self.best is not None:
            caption += "; speedups on the winner's last timing round (losers against the winner "
            caption += "in the round they were dropped)"
        note = self.machine_load()["note"]
        if note:
            caption += f"\n[bold red]{note}[/bold red]"
        table = Table(title=title, caption=caption)
        columns = ("candidate", "status", "p50 ms", "samples/s", "speedup", "quality", "tuned on")
        for column in columns:
            table.add_column(column, justify="left" if column == "candidate" else "right")
        for outcome in self.candidates:
            table.add_row(*_row(outcome, self.config, self.best))
        return table


def _keep_reports(reports: Mapping[str, str]) -> Path:
    """Write `reports` (name -> text) into a new temporary folder, where writing works."""
    folder = Path(tempfile.mkdtemp(prefix="mahir-report-"))
    for name, text in reports.items():
        (folder / name).write_text(text)
    return folder


def _row(outcome: Outcome, config: OptimizeConfig, best: Outcome | None) -> tuple[str, ...]:
    perf = outcome.perf.get(config.sizes[0])
    speedup = outcome.speedup(config.objective)
    if best is not None:
        speedup = comparable_speedup(outcome, best, config.objective)
    quality = ""
    if outcome.metric is not None:
        quality = f"metric {outcome.metric:.4g}"
    elif outcome.quality is not None:
        head = outcome.quality.headline
        quality = f"{head.cosine_mean:.4f} / {head.cosine_min:.4f}"
    tuned = outcome.tuned_quality  # on the calibration inputs: fitted, not judged
    status = outcome.status if outcome.status == "ok" else f"{outcome.status}: {outcome.reason}"
    return (
        f"[bold]{outcome.candidate.id} *[/bold]" if outcome is best else outcome.candidate.id,
        status,
        "" if perf is None else f"{perf.p50_ms:.2f}{' ~' if perf.noisy else ''}",
        "" if not outcome.perf else f"{max(p.throughput for p in outcome.perf.values()):,.0f}",
        "" if speedup is None else f"{speedup:.2f}x",
        quality,
        "" if tuned is None else f"{tuned.headline.cosine_min:.4f}",
    )
