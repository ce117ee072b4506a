"""The baseline and the winner of `mahir optimize` profiled on one batch, for the report's
roofline section: how close each runs to what the device allows, so the report says how much
is left on the table and where.

Each is profiled as `mahir profile` profiles an output directory (`profile/run.py`: the
runtime's own profiler, every op costed from the graph at the batch's shapes, the measured
peaks and bandwidth), at the batch size the objective is judged at: the smallest timed for
latency, the largest for throughput. A candidate on a runtime whose profiler mahir does not
read, or whose profiling fails, is left out with the reason: the report says so, and the run's
result stands. Sits in search: imports profile and the report's records.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

from mahir.errors import first_line
from mahir.families import Family
from mahir.profile.result import Profile
from mahir.profile.roofline import Roofline
from mahir.profile.run import PROFILED, ProfileConfig, profile_artifact
from mahir.report.schema import RooflineRecord, RoofRecord
from mahir.search.candidates import Candidate
from mahir.types import Artifact, Device

End = tuple[str, Candidate, Callable[[], Artifact]]
"""A candidate to profile: its label in the report, itself, and how to get its artifact."""

TOP_OPS = 8
"""Heaviest ops recorded per candidate (the plot's dots)."""
RUNS, SECONDS = 5, 0.25
"""Profiled calls, and seconds timed with the profiler off: a sketch, not a benchmark."""


def profile_ends(
    ends: Sequence[End],
    family: Family,
    model_name: str,
    batch_size: int,
    device: Device,
    workdir: Path,
) -> tuple[list[RooflineRecord], str | None]:
    """Each end profiled; the records, and why any is missing."""
    config = ProfileConfig(batch_size=batch_size, device=device, runs=RUNS, seconds=SECONDS)
    records, missing = [], []
    for label, candidate, built in ends:
        runtime = candidate.recipe.runtime
        if runtime not in PROFILED:
            missing.append(f"the {label} runs on {runtime}, whose profiler mahir does not read")
            continue
        options = dataclasses.replace(candidate.recipe.options, device=device)
        folder = workdir / f"profile-{label}"
        try:
            artifact = built()
            profile = profile_artifact(
                model_name, runtime, artifact, options, family, config, folder
            )
            records.append(record(profile, label, candidate.id))
        except Exception as err:  # the search's result stands without its roofline
            missing.append(f"profiling the {label} failed: {first_line(err)}")
    return records, "; ".join(missing) or None


def record(profile: Profile, label: str, candidate: str) -> RooflineRecord:
    """What the report keeps of a profile: the whole call, the heaviest ops, the roofs."""
    peaks = profile.peaks
    heavy = [_roof(op.name, op.op_type, roof, advice) for op, roof, advice in profile.heaviest()]
    return RooflineRecord(
        label=label,
        candidate=candidate,
        runtime=profile.runtime,
        inputs={name: list(shape) for name, shape in profile.shapes.items()},
        whole=_roof("whole call", "", profile.whole, None),
        ops=heavy[:TOP_OPS],
        compute_peaks={p.dtype: p.flops_per_s for p in peaks.peaks},
        bandwidth=None if peaks.bandwidth is None else peaks.bandwidth.bytes_per_s,
        notes=profile.notes(),
    )


def _roof(name: str, op_type: str, roof: Roofline, advice: str | None) -> RoofRecord:
    return RoofRecord(
        name=name,
        op_type=op_type,
        ms=roof.seconds * 1e3,
        flops=roof.flops,
        bytes=roof.bytes,
        peak=roof.peak,
        roofline_fraction=roof.fraction,
        intensity=roof.intensity,
        bound=roof.bound,
        advice=advice,
    )
