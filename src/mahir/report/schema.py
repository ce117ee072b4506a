"""report.json as typed records: the run, its candidates, their timing and quality.

The search makes a `Report` (`search/optimize.py`, each candidate from `search/records.py`)
and `report_json` is the one place it becomes JSON; the page and the terminal read it back
through `Report.from_dict`. Reading is lenient so reports written by older versions still
render: a missing key takes its field's default and an unknown one is ignored; so a new field
(a device, say) is one line with a default here, and older reports keep rendering. The JSON is
schema 1, key for key.

Imports nothing of mahir's other rooms: a report.json copied from another machine reads the same.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

SCHEMA = 1

T = TypeVar("T")


def _known(cls: type[T], data: dict[str, Any], **typed: Any) -> T:
    """`cls` from the keys of `data` it has fields for; `typed` overrides (nested records)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names and k not in typed}, **typed)


@dataclass(kw_only=True, slots=True)
class PerfRecord:
    """Timing at one batch size (`types.Perf`), latencies thinned to a bounded number."""

    batch_size: int | None = None
    latencies_ms: list[float] = field(default_factory=list)
    p50_ms: float
    p90_ms: float | None = None
    p99_ms: float | None = None
    throughput: float
    tokens_per_s: float | None = None
    spread: float | None = None
    noisy: bool = False
    other_load: float = 0.0
    device: str = "cpu"
    runs: int = 0
    """Runs timed, before the latencies were thinned."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PerfRecord:
        return _known(cls, data)


@dataclass(kw_only=True, slots=True)
class QualityRecord:
    """The headline fidelity the budget judged, or the user's metric."""

    cosine_mean: float | None = None
    cosine_min: float | None = None
    max_abs_err: float | None = None
    top1_agreement: float | None = None
    metric: float | None = None
    metric_drop: float | None = None

    def get(self, key: str) -> float | None:
        """The value of one quality key (the one a budget judges, chosen at run time)."""
        value = getattr(self, key)
        return None if value is None else float(value)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QualityRecord:
        return _known(cls, data)


@dataclass(kw_only=True, slots=True)
class UtilizationRecord:
    """What a candidate got out of the device at one batch size (`search/utilization.py`)."""

    flops_per_s: float
    """Achieved: the original model's FLOPs per batch over the median batch latency."""
    precision: str = "fp32"
    """What the candidate computes in: fp32, bf16, fp16 or int8."""
    peak: str | None = None
    """The dtype of the measured peak it is a fraction of: its own precision's where one was
    measured, else the best float peak (then `note` says so)."""
    fraction: float | None = None
    note: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UtilizationRecord:
        return _known(cls, data)


@dataclass(kw_only=True, slots=True)
class CandidateRecord:
    """One candidate: its recipe, what became of it and why, its numbers."""

    id: str
    label: str
    recipe: dict[str, Any] = field(default_factory=dict)
    recipe_hash: str = ""
    runtime: str = ""
    device: str = "cpu"
    """Where it ran ("cpu", "cuda:N"); records before devices existed ran on the CPU."""
    settings: dict[str, Any] = field(default_factory=dict)
    status: str
    """ok, rejected, failed or skipped."""
    reason: str | None = None
    quality: QualityRecord | None = None
    quality_detail: dict[str, Any] | None = None
    """Every output's fidelity (`quality.quality_to_dict`), on everything judged."""
    quality_tuned: dict[str, Any] | None = None
    """The same on the calibration inputs the passes tuned on."""
    perf: dict[int, PerfRecord] = field(default_factory=dict)
    baseline_perf: dict[int, PerfRecord] = field(default_factory=dict)
    speedup: float | None = None
    """On the scale of the winner's final timing round (`search.comparable_speedup`)."""
    speedup_measured: float | None = None
    size_mb: float | None = None
    build_s: float = 0.0
    rounds: int = 0
    speedups: list[float] = field(default_factory=list)
    cached: bool = False
    utilization: dict[int, UtilizationRecord] = field(default_factory=dict)
    """Achieved FLOP/s and share of the measured peak per timed batch size; empty where the
    FLOPs were not counted (an ONNX source) or nothing was timed."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CandidateRecord:
        quality = data.get("quality")
        return _known(
            cls,
            data,
            quality=None if quality is None else QualityRecord.from_dict(quality),
            perf=_perfs_from(data.get("perf")),
            baseline_perf=_perfs_from(data.get("baseline_perf")),
            utilization={
                int(size): UtilizationRecord.from_dict(u)
                for size, u in (data.get("utilization") or {}).items()
            },
        )

    def to_dict(self) -> dict[str, Any]:
        record = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        record["quality"] = None if self.quality is None else dataclasses.asdict(self.quality)
        for key in ("perf", "baseline_perf", "utilization"):
            record[key] = {str(size): dataclasses.asdict(p) for size, p in record[key].items()}
        return record


def _perfs_from(data: dict[str, Any] | None) -> dict[int, PerfRecord]:
    return {int(size): PerfRecord.from_dict(p) for size, p in (data or {}).items()}


@dataclass(kw_only=True, slots=True)
class BudgetRecord:
    """The quality budget: fidelity floors, or a user metric's allowed drop."""

    kind: str = "fidelity"
    description: str | None = None
    metric: str | None = None
    max_drop: float | None = None
    baseline_metric: float | None = None
    cosine_mean: float | None = None
    cosine_min: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Only the keys that apply to this kind (a fidelity budget names no metric)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(kw_only=True, slots=True)
class PeakRecord:
    """One measured matmul peak (`peaks.Peak`): FLOP/s, or int8 operations/s for int8."""

    dtype: str
    flops_per_s: float
    size: int = 0
    """n of the n x n x n matmul that reached it."""
    measured: str = ""
    cached: bool = False
    """Measured by an earlier run on this machine, read from the user's cache."""
    other_load: float = 0.0
    """Cores other processes kept busy while it was measured."""
    busy: bool = False
    """Too busy to trust (`measure.BUSY_CORES`): likely low, so it was not cached."""


@dataclass(kw_only=True, slots=True)
class DeviceRecord:
    """The device the candidates were timed on and its peaks, measured on this machine: never
    a datasheet's numbers."""

    device: str = "cpu"
    """"cpu" or "cuda:N"."""
    name: str = ""
    """The CPU model or the GPU's name."""
    method: str | None = None
    peaks: list[PeakRecord] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceRecord:
        peaks = [_known(PeakRecord, p) for p in data.get("peaks") or ()]
        return _known(cls, data, peaks=peaks)

    def peak(self, dtype: str | None) -> PeakRecord | None:
        return next((p for p in self.peaks if p.dtype == dtype), None)


@dataclass(kw_only=True, slots=True)
class RoofRecord:
    """One op, or a whole call, against the roofs (`profile.roofline.Roofline`)."""

    name: str
    op_type: str = ""
    ms: float
    flops: float
    bytes: float
    peak: str | None = None
    """The dtype whose measured peak is its compute roof."""
    roofline_fraction: float | None = None
    """The least time the roofs allow over the time taken."""
    intensity: float | None = None
    bound: str = "unknown"
    advice: str | None = None


@dataclass(kw_only=True, slots=True)
class RooflineRecord:
    """`mahir profile` of one candidate (the baseline or the winner) on one batch: the whole
    call and its heaviest ops against the device's measured roofs."""

    label: str
    candidate: str
    runtime: str
    inputs: dict[str, list[int]] = field(default_factory=dict)
    whole: RoofRecord
    ops: list[RoofRecord] = field(default_factory=list)
    compute_peaks: dict[str, float] = field(default_factory=dict)
    """Measured FLOP/s (int8: operations/s) by dtype."""
    bandwidth: float | None = None
    """Measured bytes/s (STREAM triad)."""
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RooflineRecord:
        return _known(
            cls,
            data,
            whole=_known(RoofRecord, data["whole"]),
            ops=[_known(RoofRecord, op) for op in data.get("ops") or ()],
        )


@dataclass(kw_only=True, slots=True)
class CostRecord:
    """FLOPs of one forward of the original model per batch size (`flops.Cost`)."""

    flops_per_batch: dict[int, float] = field(default_factory=dict)
    method: str | None = None
    note: str | None = None
    """Why they were not counted (an ONNX source), when they were not."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CostRecord:
        flops = {int(size): float(f) for size, f in (data.get("flops_per_batch") or {}).items()}
        return _known(cls, data, flops_per_batch=flops)


@dataclass(kw_only=True, slots=True)
class Report:
    """A whole run. Machine, model, workload and load are as their own rooms describe them."""

    schema: int = SCHEMA
    date: str = ""
    complete: bool = True
    stopped: str | None = None
    objective: str = "latency"
    batch_sizes: list[int] = field(default_factory=list)
    budget: BudgetRecord = field(default_factory=BudgetRecord)
    machine: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    workload: dict[str, Any] = field(default_factory=dict)
    machine_load: dict[str, Any] = field(default_factory=dict)
    time_budget_s: float | None = None
    elapsed_s: float | None = None
    baseline: str | None = None
    best: str | None = None
    device: DeviceRecord | None = None
    """Where the candidates ran and its measured peaks; None in reports from before peaks."""
    cost: CostRecord | None = None
    candidates: list[CandidateRecord] = field(default_factory=list)
    rooflines: list[RooflineRecord] = field(default_factory=list)
    """The baseline and the winner profiled on one batch (`search/rooflines.py`); empty in
    reports from before, with no winner, or where neither could be profiled."""
    roofline_note: str | None = None
    """Why a roofline is missing, when one is."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        device, cost = data.get("device"), data.get("cost")
        return _known(
            cls,
            data,
            budget=_known(BudgetRecord, data.get("budget") or {}),
            machine_load=data.get("machine_load") or {},
            device=None if device is None else DeviceRecord.from_dict(device),
            cost=None if cost is None else CostRecord.from_dict(cost),
            candidates=[CandidateRecord.from_dict(c) for c in data.get("candidates", ())],
            rooflines=[RooflineRecord.from_dict(r) for r in data.get("rooflines") or ()],
        )

    @classmethod
    def read(cls, path: Path) -> Report:
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    def to_dict(self) -> dict[str, Any]:
        record = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        record["budget"] = self.budget.to_dict()
        for key in ("device", "cost"):
            record[key] = None if record[key] is None else dataclasses.asdict(record[key])
        record["candidates"] = [c.to_dict() for c in self.candidates]
        record["rooflines"] = [dataclasses.asdict(r) for r in self.rooflines]
        return record


def report_json(report: Report) -> str:
    """The text of report.json: the one place a report becomes JSON."""
    return json.dumps(report.to_dict(), indent=2, default=str) + "\n"
