"""How much of the device each candidate used: achieved FLOP/s and the share of the peak.

As nanoGPT's `estimate_mfu()`: the model's FLOPs per batch (`flops.py`) over the time a batch
takes, here the candidate's median batch latency at that batch size, as a fraction of a peak,
here the one measured on this device (`peaks.py`) in the precision the candidate computes in:
fp32 for fp32, bf16 or fp16 for those, int8 for int8 where an int8 peak was measured, else the
best float peak, and the record says so. They are the original model's FLOPs, not the work a
candidate does: a pruned candidate does less, so its share is what the original's work would
need at its speed; an int8 model's layers kept in float count as int8.

Sits in search: it reads recipes (which steps quantize) and outcomes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mahir.flops import Cost
from mahir.passes.fallback import AccuracyAwareInt8
from mahir.passes.float8 import TorchaoFloat8
from mahir.passes.nncf import NncfAccuracyControl, NncfInt8
from mahir.passes.precision import Float16, TorchLowPrecision
from mahir.passes.quantize import DynamicInt8, StaticInt8
from mahir.passes.torchao import Pt2eInt8, TorchaoInt8
from mahir.peaks import Peaks
from mahir.recipe import Recipe
from mahir.report.schema import UtilizationRecord
from mahir.search.halving import Outcome

INT8_STEPS = (
    DynamicInt8,
    StaticInt8,
    AccuracyAwareInt8,
    NncfInt8,
    NncfAccuracyControl,
    TorchaoInt8,
    Pt2eInt8,
)
"""Steps after which the matmuls run in int8; weight-only compression (`OrtWeightOnly`,
`NncfWeightCompression`, `TorchaoInt8(weight_only=True)`) computes in float."""
SESSION_PRECISIONS = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}
"""A session's own word for its precision (OpenVINO's inference precision, a torch module's
dtype) -> mahir's: OpenVINO picks bf16 by itself on CPUs with bf16 instructions."""


def precision_of(recipe: Recipe, settings: Mapping[str, Any]) -> str:
    """What a candidate's matmuls compute in: int8 (fp8) after a quantizing step, the dtype a
    precision step chose, else what its session reported, else fp32."""
    for step in recipe.steps:
        if isinstance(step, INT8_STEPS) and not getattr(step, "weight_only", False):
            return "int8"
        if isinstance(step, TorchaoFloat8):
            return "fp8"
    for step in reversed(recipe.steps):
        if isinstance(step, Float16):
            return "fp16"
        if isinstance(step, TorchLowPrecision):
            return "bf16" if step.dtype == "bfloat16" else "fp16"
    return SESSION_PRECISIONS.get(str(settings.get("precision")), "fp32")


def utilization(
    outcome: Outcome, cost: Cost | None, peaks: Peaks | None
) -> dict[int, UtilizationRecord]:
    """`outcome`'s achieved FLOP/s and share of the peak at each batch size it was timed at;
    empty when the FLOPs were not counted."""
    if cost is None or not cost.flops_per_batch:
        return {}
    precision = precision_of(outcome.candidate.recipe, outcome.settings)
    peak, note = (None, "no peak measured") if peaks is None else peaks.denominator(precision)
    records = {}
    for size, perf in outcome.perf.items():
        flops = cost.flops_per_batch.get(size)
        if flops is None or perf.p50_ms <= 0:
            continue
        achieved = flops / (perf.p50_ms / 1e3)
        records[size] = UtilizationRecord(
            flops_per_s=achieved,
            precision=precision,
            peak=None if peak is None else peak.dtype,
            fraction=None if peak is None else achieved / peak.flops_per_s,
            note=note,
        )
    return records
