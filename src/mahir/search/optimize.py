"""`mahir optimize`: the main job. Propose candidates for this machine, search, keep the best.

The order of work: read the machine; gather the run's inputs once (evidence.py: the timing
workload, calibration batches, a check sample, held-out inputs, and the fp32 original's outputs
on all of them); then let the search build, check and time the candidates (halving.py states
its invariant). The result is the winner, every candidate's outcome and why, and the workload
and machine they were measured on; `OptimizeResult.save` writes the output directory. Sits
beside bench and apply, above search; the CLI and `mahir.search.optimize` call it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from mahir.errors import BadInput, MahirError, first_line
from mahir.evidence import gather
from mahir.families import refuse_text_options
from mahir.flops import Cost, model_cost
from mahir.hardware import Machine, detect
from mahir.measure import load_summary
from mahir.model import Model, load_model, one_forward
from mahir.passes import PassContext
from mahir.peaks import Peaks, device_name, device_peaks, rate
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
from mahir.runtimes import get_runtime
from mahir.search.bench import model_summary
from mahir.search.budget import FidelityBudget, MetricBudget, quality_kind
from mahir.search.builder import ArtifactBuilder
from mahir.search.candidates import Candidate, Objective, propose
from mahir.search.halving import (
    Budget,
    Events,
    Outcome,
    Search,
    comparable_speedup,
)
from mahir.search.records import OutcomeCache, outcome_record
from mahir.search.rooflines import End, profile_ends
from mahir.search.utilization import utilization
from mahir.types import CPU, Artifact, Device
from mahir.workload import Workload

THROUGHPUT_SIZES = {"cpu": (8, 32), "cuda": (64, 256)}
"""Batch sizes timed for throughput when none are given: a GPU idles at a CPU's batches."""

# Share of the time budget kept for timing when candidates are built: building stops when less
# than this is left, so the survivors are still measured properly.
TIMING_SHARE = 0.35


@dataclass(frozen=True, slots=True)
class OptimizeConfig:
    """What `optimize` searches for, on which inputs, within what quality and time."""

    objective: Objective = "latency"
    """latency: batch-1 p50 (the smallest batch size); throughput: best samples/s."""
    batch_sizes: tuple[int, ...] = ()
    """Batch sizes timed; default (1,) for latency, (8, 32) for throughput."""
    max_drop: float = 0.01
    """Quality budget: fidelity drop (see budget.py), or the user metric's absolute drop."""
    time_budget_s: float | None = None
    """Wall time for the whole search; None: try every candidate."""
    only: tuple[str, ...] = ()
    """Candidate ids to try (the baseline always runs); empty: all proposed."""
    sentences: tuple[str, ...] = ()
    """The user's sentences for the workload; generated text when empty."""
    token_range: tuple[int, int] | None = None
    batches_per_size: int = 8
    metric: str | None = None
    """`module:fn` or `file.py:fn` scoring (outputs, data) -> float, higher is better."""
    data: Path | None = None
    """The data the metric scores (see `Family.read_user_data`)."""
    seed: int = 0
    device: Device = CPU
    """Where the candidates run: the CPU's candidates, or a CUDA GPU's (search/cuda.py)."""
    roofline: bool = True
    """Profile the baseline and the winner for the report's roofline (`rooflines.py`: a second
    or two for a small model); False: the report goes without it."""

    def __post_init__(self) -> None:
        if self.objective not in ("latency", "throughput"):
            raise BadInput(f"objective must be latency or throughput, got {self.objective!r}")
        if (self.metric is None) != (self.data is None):
            raise BadInput("--metric and --data go together: the metric scores that data")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise BadInput(f"--time-budget must be > 0 minutes, got {self.time_budget_s / 60:g}")
        if any(size < 1 for size in self.batch_sizes):
            raise BadInput(f"batch sizes must be >= 1, got {list(self.batch_sizes)}")
        if self.metric is None:
            FidelityBudget(self.max_drop)  # refuses a drop outside [0, 0.5), as the search would
        elif not (math.isfinite(self.max_drop) and self.max_drop >= 0):
            raise BadInput(f"--max-drop must be a number >= 0 for a metric, got {self.max_drop}")
        if self.data is not None and not self.data.is_file():
            raise BadInput(f"{self.data} does not exist: give the data file the metric scores")

    def check_model(self, model: Model) -> None:
        """Refuse what `model` cannot use instead of ignoring it: sentences and token counts
        shape text, which only text models read."""
        given = {"--sentences": bool(self.sentences), "--tokens": self.token_range is not None}
        refuse_text_options(model.family, model.name, given)

    @property
    def sizes(self) -> tuple[int, ...]:
        if self.batch_sizes:
            return tuple(sorted(set(self.batch_sizes)))
        return (1,) if self.objective == "latency" else THROUGHPUT_SIZES[self.device.kind]


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


def optimize(
    model: Model | str | os.PathLike[str] | None = None,
    config: OptimizeConfig = OptimizeConfig(),
    workdir: str | os.PathLike[str] | None = None,
    *,
    cache_path: str | os.PathLike[str] | None = None,
    resume: bool = False,
    on_event: Events = lambda _id, _text: None,
) -> OptimizeResult:
    """Search this machine's candidates for `model`; Ctrl-C ends it early with what was found.
    `model` is a loaded model or a source for `load_model` (default: the bundled one). Built
    artifacts go to `workdir` (default: a new temporary folder, left for the caller, since the
    winner lives there until `save`). With `cache_path`, outcomes are recorded there as each
    stage completes (checked, timed; a checked candidate's files kept beside until the run
    completes); `resume` reuses them (records.py says how)."""
    if not isinstance(model, Model):
        model = one_forward(load_model(model), "optimize")
    config.check_model(model)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="mahir-optimize-"))
    started = time.monotonic()
    deadline = None if config.time_budget_s is None else started + config.time_budget_s
    machine = detect()
    machine.require(config.device)
    proposed, skipped = propose(
        model, machine, config.objective, max_drop=config.max_drop, device=config.device
    )
    baseline = proposed[0].id
    on_event(baseline, f"machine: {machine.summary()}")
    proposed = _only(proposed, config.only)  # a typo fails before any work
    peaks = device_peaks(machine, config.device)  # before anything else keeps the device busy
    on_event(baseline, f"measured peak: {peaks.summary()}")
    inputs = gather(model, config)
    workload, evidence = inputs.workload, inputs.evidence
    cost = model_cost(model, workload.batches)
    counted = ", ".join(f"batch {n}: {rate(f)}FLOP" for n, f in cost.flops_per_batch.items())
    on_event(baseline, f"FLOPs per forward: {counted or cost.note}")
    ctx = PassContext(model=model, workdir=workdir, calibration=inputs.calibration, machine=machine)
    builder = ArtifactBuilder(ctx)
    build_deadline = None
    if deadline is not None and config.time_budget_s is not None:
        build_deadline = deadline - TIMING_SHARE * config.time_budget_s
    search = Search(
        model, builder, evidence, config.objective, baseline, deadline, build_deadline, on_event
    )
    key = _run_key(model, machine, workload, config)
    cache = OutcomeCache(Path(cache_path), key, resume=resume) if cache_path else None
    if cache is None:
        searched = search.run(proposed, len(config.sizes))
    else:
        searched = search.run(
            proposed,
            len(config.sizes),
            done=_done(cache, proposed),
            reopen=lambda c: _reopen(cache, builder, c, model, workdir / "resumed"),
            on_checked=lambda o, a: _record_check(cache, o, a, config.objective, on_event),
        )
    outcomes = searched.outcomes + [Outcome(c, "skipped", reason=why) for c, why in skipped]
    if cache is not None:
        for outcome in outcomes:
            if outcome.perf.keys() == set(config.sizes):  # a rung cut short is not a timing
                cache.put(outcome, config.objective)
        if searched.complete:  # every checked candidate was timed: its kept files can go
            cache.drop_artifacts()
    best, artifact = searched.best, None
    rooflines: tuple[list[RooflineRecord], str | None] = ([], None)
    if best is not None:
        artifact = search.artifacts.get(best.candidate.id) or _rebuild(builder, best.candidate)
        first = searched.outcomes[0].candidate  # the baseline is always proposed first
        if config.roofline:
            rooflines = _rooflines(model, config, search, builder, first, best, artifact, workdir)
    return OptimizeResult(
        model,
        machine,
        workload,
        config,
        evidence.budget,
        outcomes,
        best,
        artifact,
        searched.complete,
        elapsed_s=time.monotonic() - started,
        peaks=peaks,
        cost=cost,
        rooflines=rooflines[0],
        roofline_note=rooflines[1],
    )


def cache_path(out: Path) -> Path:
    """Where the outcomes of a run writing `out` are recorded for `--resume`: beside it."""
    return out.with_name(f".{out.name}.cache.jsonl")


def _only(proposed: list[Candidate], only: Sequence[str]) -> list[Candidate]:
    if not only:
        return proposed
    known = {c.id for c in proposed}
    unknown = sorted(set(only) - known)
    if unknown:
        raise BadInput(
            f"unknown candidates {unknown}: on this machine, choose from {sorted(known)}"
        )
    return [c for c in proposed if c is proposed[0] or c.id in only]


def _run_key(model: Model, machine: Machine, workload: Workload, config: OptimizeConfig) -> str:
    """What must match for an earlier run's measurements to count in this one."""
    digest = hashlib.sha256()
    parts = (model.source, machine.summary(), config.objective, config.max_drop, config.metric)
    for part in (*parts, str(config.device)):
        digest.update(repr(part).encode())
    for path in _model_files(model):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    for size, batches in sorted(workload.batches.items()):
        for batch in batches:
            for name in sorted(batch):
                digest.update(f"{size}/{name}".encode() + batch[name].tobytes())
    if config.data is not None:
        digest.update(config.data.read_bytes())
    return str(digest.hexdigest()[:16])


def _model_files(model: Model) -> list[Path]:
    if model.folder is not None:
        return sorted(p for p in model.folder.rglob("*") if p.is_file())
    if model.onnx_path is not None:
        return [model.onnx_path]
    return [Path(model.source.rpartition(":")[0])] if ".py:" in model.source else []


def _done(cache: OutcomeCache, proposed: Sequence[Candidate]) -> dict[str, Outcome]:
    """Earlier outcomes that need no more work (rejected, failed, or ok and timed). The
    baseline's timing comes from the cache only when everything's does: else it is timed anew."""
    cached = {c.id: cache.get(c) for c in proposed}
    done = {cid: o for cid, o in cached.items() if o is not None and _final(o)}
    if len(done) < len(cached):
        done.pop(proposed[0].id, None)
    return done


def _record_check(
    cache: OutcomeCache,
    outcome: Outcome,
    artifact: Artifact | None,
    objective: Objective,
    on_event: Events,
) -> None:
    """Record a checked candidate; one that passed, with its files (kept first, so a record
    never promises files that are not there; without them, a resumed run builds it again)."""
    candidate = outcome.candidate
    if artifact is not None:
        try:
            cache.keep_artifact(candidate, artifact)
        except OSError as err:
            on_event(candidate.id, f"cannot keep its files for --resume ({first_line(err)})")
    cache.put(outcome, objective)


def _final(outcome: Outcome) -> bool:
    """Whether an outcome needs no more work: rejected, failed, or ok and timed."""
    return outcome.status != "ok" or bool(outcome.perf)


def _reopen(
    cache: OutcomeCache, builder: ArtifactBuilder, candidate: Candidate, model: Model, into: Path
) -> tuple[Outcome, Artifact] | None:
    """An earlier run's outcome of `candidate` if it was checked but not timed, with its
    artifact: its kept files copied `into` the work folder, or a live torch module built again
    (it has no files)."""
    earlier = cache.get(candidate)
    if earlier is None or _final(earlier):
        return None
    recipe = candidate.recipe
    if "torch" in get_runtime(recipe.runtime).formats:
        artifact: Artifact | None = _rebuild(builder, candidate)
    else:
        artifact = cache.kept_artifact(candidate, model.spec, into)
    return None if artifact is None else (earlier, artifact)


def _rooflines(
    model: Model,
    config: OptimizeConfig,
    search: Search,
    builder: ArtifactBuilder,
    first: Candidate,
    best: Outcome,
    artifact: Artifact,
    workdir: Path,
) -> tuple[list[RooflineRecord], str | None]:
    """The baseline (`first`) and the winner profiled at the batch size the objective judges."""
    built = search.artifacts.get(first.id)
    ends: list[End] = [("baseline", first, lambda: built or _rebuild(builder, first))]
    if best.candidate.id != first.id:
        ends.append(("winner", best.candidate, lambda: artifact))
    size = min(config.sizes) if config.objective == "latency" else max(config.sizes)
    return profile_ends(ends, model.family, model.name, size, config.device, workdir)


def _rebuild(builder: ArtifactBuilder, candidate: Candidate) -> Artifact:
    """A cached winner's artifact: built again (building is not measuring)."""
    recipe = candidate.recipe
    return builder.build(recipe.steps, get_runtime(recipe.runtime).formats)
