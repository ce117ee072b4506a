"""Outcomes as plain JSON records, and the cache of them that lets `--resume` skip work.

One record type (`report.schema.CandidateRecord`) serves both the report (report.json's
"candidates") and the cache, so what a resumed run reads back is exactly what the report showed.
The cache is an append-only JSON Lines file beside the output directory: a record is appended as
each stage of a candidate completes (checked: rejected, failed or ok; then timed), so Ctrl-C loses
at most the candidate in hand; a torn last line is ignored, and a later record of a recipe replaces
an earlier one. A record counts only for the same model, machine, workload and budget (the run key)
and the same recipe (its hash). A candidate checked but not yet timed needs its artifact to be
timed: its files are kept in a folder beside the file, the record stays the one format, and a live
torch module, which has no files, is built again.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import cast

from mahir.files import staged
from mahir.quality import quality_from_dict, quality_to_dict
from mahir.report.schema import CandidateRecord, PerfRecord, QualityRecord
from mahir.search.candidates import Candidate, Objective
from mahir.search.halving import Outcome, Status, comparable_speedup
from mahir.types import Artifact, InputSpec, Perf

# Latencies kept per batch size in a record: enough to draw a distribution, bounded in size.
MAX_LATENCIES = 400
# What a kept artifact folder holds besides the files: their format, main file and history.
KEPT = "artifact.json"


def outcome_record(
    outcome: Outcome, objective: Objective, anchor: Outcome | None = None
) -> CandidateRecord:
    """The record of `outcome`. With `anchor` (the winner), "speedup" is put on the scale of
    the winner's final round (`search.comparable_speedup`), so every record's speedup compares
    with every other's; "speedup_measured" is the one taken in its own last round."""
    candidate = outcome.candidate
    measured = outcome.speedup(objective)
    return CandidateRecord(
        id=candidate.id,
        label=candidate.label,
        recipe=candidate.recipe.to_dict(),
        recipe_hash=candidate.recipe.hash(),
        runtime=candidate.recipe.runtime,
        device=str(candidate.recipe.options.device),
        settings=outcome.settings,
        status=outcome.status,
        reason=outcome.reason,
        quality=_quality_record(outcome),
        quality_detail=None if outcome.quality is None else quality_to_dict(outcome.quality),
        quality_tuned=None
        if outcome.tuned_quality is None
        else quality_to_dict(outcome.tuned_quality),
        perf={size: _perf_record(p) for size, p in outcome.perf.items()},
        baseline_perf={size: _perf_record(p) for size, p in outcome.baseline_perf.items()},
        speedup=measured if anchor is None else comparable_speedup(outcome, anchor, objective),
        speedup_measured=measured,
        size_mb=outcome.size_mb,
        build_s=outcome.build_s,
        rounds=outcome.rounds,
        speedups=list(outcome.speedups),
        cached=outcome.cached,
    )


def outcome_from_record(candidate: Candidate, record: CandidateRecord) -> Outcome:
    """The outcome a record describes, for `candidate` (whose recipe hash it carries)."""
    detail, tuned = record.quality_detail, record.quality_tuned
    return Outcome(
        candidate=candidate,
        status=cast(Status, record.status),
        reason=record.reason,
        quality=None if detail is None else quality_from_dict(detail),
        tuned_quality=None if tuned is None else quality_from_dict(tuned),
        metric=None if record.quality is None else record.quality.metric,
        perf={size: _perf_from(p) for size, p in record.perf.items()},
        baseline_perf={size: _perf_from(p) for size, p in record.baseline_perf.items()},
        rounds=record.rounds,
        speedups=list(record.speedups),
        build_s=record.build_s,
        size_mb=record.size_mb,
        settings=record.settings,
        cached=True,
    )


def _quality_record(outcome: Outcome) -> QualityRecord | None:
    if outcome.quality is None:
        return None
    head = outcome.quality.headline
    return QualityRecord(
        cosine_mean=head.cosine_mean,
        cosine_min=head.cosine_min,
        max_abs_err=head.max_abs_err,
        top1_agreement=head.top1_agreement,
        metric=outcome.metric,
    )


def _perf_record(perf: Perf) -> PerfRecord:
    step = max(1, len(perf.latencies_ms) // MAX_LATENCIES)
    values = {**dataclasses.asdict(perf), "latencies_ms": list(perf.latencies_ms[::step])}
    return PerfRecord(**values, runs=len(perf.latencies_ms))


def _perf_from(record: PerfRecord) -> Perf:
    fields = {f.name for f in dataclasses.fields(Perf)}
    values = {k: v for k, v in dataclasses.asdict(record).items() if k in fields}
    values["latencies_ms"] = tuple(values["latencies_ms"])
    return Perf(**values)


class OutcomeCache:
    """Records of earlier runs with the same run key, by recipe hash; appends new ones. Files of
    checked candidates are kept in `folder`, one subfolder per run key and recipe hash."""

    def __init__(self, path: Path, run_key: str, *, resume: bool) -> None:
        self.path = path
        self.folder = path.with_suffix(".artifacts")
        self._run_key = run_key
        self._records: dict[str, CandidateRecord] = {}
        if resume and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by an interruption
                if entry.get("run_key") == run_key:
                    record = CandidateRecord.from_dict(entry["record"])
                    self._records[record.recipe_hash] = record
        elif not resume:
            path.unlink(missing_ok=True)
            self.drop_artifacts()

    def get(self, candidate: Candidate) -> Outcome | None:
        record = self._records.get(candidate.recipe.hash())
        if record is None or record.status == "skipped":
            return None
        return outcome_from_record(candidate, record)

    def put(self, outcome: Outcome, objective: Objective) -> None:
        if outcome.status == "skipped" or outcome.cached:
            return
        record = outcome_record(outcome, objective).to_dict()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"run_key": self._run_key, "record": record}) + "\n")

    def keep_artifact(self, candidate: Candidate, artifact: Artifact) -> None:
        """Copy the files of `candidate`'s checked artifact here, whole or not at all, so a
        resumed run can time it without building it; a live torch module has none to keep."""
        files = artifact.files()
        if not files:
            return
        # replaces what a run cut before it recorded the outcome may have kept
        with staged(self._artifact_folder(candidate), folder=True) as staging:
            for file in files:
                shutil.copy2(file, staging / file.name)
            about = {"format": artifact.format, "file": files[0].name, "meta": artifact.meta}
            (staging / KEPT).write_text(json.dumps(about, default=str))

    def kept_artifact(self, candidate: Candidate, spec: InputSpec, into: Path) -> Artifact | None:
        """The artifact `keep_artifact` kept for `candidate`, copied into `into` (the run's work
        folder, so it outlives `drop_artifacts`); None when nothing was kept."""
        folder = self._artifact_folder(candidate)
        if not (folder / KEPT).is_file():
            return None
        about = json.loads((folder / KEPT).read_text())
        shutil.copytree(folder, into / folder.name, ignore=shutil.ignore_patterns(KEPT))
        return Artifact(
            about["format"], spec, path=into / folder.name / about["file"], meta=about["meta"]
        )

    def drop_artifacts(self) -> None:
        """Remove every kept artifact: once all were timed, their records are enough (a cached
        winner is built again), and a new run starts clean."""
        if self.folder.exists():
            shutil.rmtree(self.folder)

    def _artifact_folder(self, candidate: Candidate) -> Path:
        return self.folder / f"{self._run_key}-{candidate.recipe.hash()}"
