"""Outcomes as plain JSON records, and the cache of them that lets `--resume` skip work.

One record format serves both the report (report.json's "candidates") and the cache, so what a
resumed run reads back is exactly what the report showed. The cache is an append-only JSON Lines
file beside the output directory: a record is appended as soon as a candidate's result is
final (rejected, failed) or newly timed (ok), so Ctrl-C loses at most the candidate in hand; a
torn last line is ignored. A record counts only for the same model, machine, workload and
budget (the run key) and the same recipe (its hash).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from mahir.candidates import Candidate, Objective
from mahir.quality import quality_from_dict, quality_to_dict
from mahir.search import Outcome
from mahir.types import Perf

# Latencies kept per batch size in a record: enough to draw a distribution, bounded in size.
MAX_LATENCIES = 400


def outcome_record(outcome: Outcome, objective: Objective) -> dict[str, Any]:
    candidate = outcome.candidate
    return {
        "id": candidate.id,
        "label": candidate.label,
        "recipe": candidate.recipe.to_dict(),
        "recipe_hash": candidate.recipe.hash(),
        "runtime": candidate.recipe.runtime,
        "settings": outcome.settings,
        "status": outcome.status,
        "reason": outcome.reason,
        "quality": _quality_record(outcome),
        "quality_detail": None if outcome.quality is None else quality_to_dict(outcome.quality),
        "perf": {str(size): _perf_record(p) for size, p in outcome.perf.items()},
        "baseline_perf": {str(size): _perf_record(p) for size, p in outcome.baseline_perf.items()},
        "speedup": outcome.speedup(objective),
        "size_mb": outcome.size_mb,
        "build_s": outcome.build_s,
        "rounds": outcome.rounds,
        "speedups": outcome.speedups,
        "cached": outcome.cached,
    }


def outcome_from_record(candidate: Candidate, record: dict[str, Any]) -> Outcome:
    """The outcome a record describes, for `candidate` (whose recipe hash it carries)."""
    detail = record["quality_detail"]
    return Outcome(
        candidate=candidate,
        status=record["status"],
        reason=record["reason"],
        quality=None if detail is None else quality_from_dict(detail),
        metric=(record["quality"] or {}).get("metric"),
        perf={int(k): _perf_from(v) for k, v in record["perf"].items()},
        baseline_perf={int(k): _perf_from(v) for k, v in record["baseline_perf"].items()},
        rounds=record["rounds"],
        speedups=list(record.get("speedups", [])),
        build_s=record["build_s"],
        size_mb=record["size_mb"],
        settings=record["settings"],
        cached=True,
    )


def _quality_record(outcome: Outcome) -> dict[str, Any] | None:
    if outcome.quality is None:
        return None
    head = outcome.quality.headline
    return {
        "cosine_mean": head.cosine_mean,
        "cosine_min": head.cosine_min,
        "max_abs_err": head.max_abs_err,
        "top1_agreement": head.top1_agreement,
        "metric": outcome.metric,
    }


def _perf_record(perf: Perf) -> dict[str, Any]:
    record = dataclasses.asdict(perf)
    record["runs"] = len(perf.latencies_ms)
    step = max(1, len(perf.latencies_ms) // MAX_LATENCIES)
    record["latencies_ms"] = list(perf.latencies_ms[::step])
    return record


def _perf_from(record: dict[str, Any]) -> Perf:
    fields = {f.name for f in dataclasses.fields(Perf)}
    values = {k: v for k, v in record.items() if k in fields}
    values["latencies_ms"] = tuple(values["latencies_ms"])
    return Perf(**values)


class OutcomeCache:
    """Records of earlier runs with the same run key, by recipe hash; appends new ones."""

    def __init__(self, path: Path, run_key: str, *, resume: bool) -> None:
        self.path = path
        self._run_key = run_key
        self._records: dict[str, dict[str, Any]] = {}
        if resume and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by an interruption
                if entry.get("run_key") == run_key:
                    self._records[entry["record"]["recipe_hash"]] = entry["record"]
        elif path.exists():
            path.unlink()

    def get(self, candidate: Candidate) -> Outcome | None:
        record = self._records.get(candidate.recipe.hash())
        if record is None or record["status"] == "skipped":
            return None
        return outcome_from_record(candidate, record)

    def put(self, outcome: Outcome, objective: Objective) -> None:
        if outcome.status == "skipped" or outcome.cached:
            return
        record = outcome_record(outcome, objective)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"run_key": self._run_key, "record": record}) + "\n")
