"""What one `mahir optimize` run times and judges on, gathered once before any candidate.

The inputs are kept apart by purpose, each from its own seed, so no candidate is judged on what
it was tuned on: the timing workload (traffic-shaped batches per batch size), the calibration
batches passes tune on (the user's sentences minus a held-out fifth), a small check sample with
shapes unlike the traffic, and held-out inputs no pass sees (`Family.held_out_batches`); then
the original's outputs on each, and the budget that judges them (fidelity, or the user's metric
with the original's own score). Sits with the search, which reads the `Evidence` it builds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mahir.factory import import_function
from mahir.model import Model
from mahir.runtimes import reference_outputs, reference_session
from mahir.search.budget import FidelityBudget, MetricBudget, metric_outputs, score
from mahir.search.halving import Budget, Evidence
from mahir.workload import Batch, Workload, split_held_out

if TYPE_CHECKING:
    from mahir.search.optimize_config import OptimizeConfig


@dataclass(frozen=True)
class RunInputs:
    """The timing workload, the calibration batches passes may tune on, and the evidence."""

    workload: Workload
    calibration: tuple[Batch, ...]
    evidence: Evidence


def gather(model: Model, config: OptimizeConfig) -> RunInputs:
    """Every input of the run and the original's outputs on them."""
    workload = _workload(model, config, config.sizes, count=config.batches_per_size, seed=0)
    tuning, held_out = split_held_out(config.sentences)
    calibration = _workload(model, config, (8,), count=4, seed=1, sentences=tuning).batches[8]
    check = [*_workload(model, config, (4,), count=2, seed=2).batches[4]]
    check += model.family.verification_batches()
    unseen = model.family.held_out_batches(held_out, batch_size=16, seed=config.seed + 3)
    budget, metric_data = _budget(model, config)
    evidence = Evidence(
        check=check,
        check_reference=reference_outputs(model, check),
        timing=workload.batches,
        timing_reference={s: reference_outputs(model, b) for s, b in workload.batches.items()},
        budget=budget,
        metric_data=metric_data,
        held_out=unseen,
        held_out_reference=reference_outputs(model, unseen),
        calibration=calibration,
        calibration_reference=reference_outputs(model, calibration),
    )
    return RunInputs(workload, tuple(calibration), evidence)


def _workload(
    model: Model,
    config: OptimizeConfig,
    sizes: Sequence[int],
    *,
    count: int,
    seed: int,
    sentences: Sequence[str] | None = None,
) -> Workload:
    """Inputs drawn like the user's traffic (`sentences`, default all the user's); distinct
    seeds keep the timing workload, the calibration batches and the cheap-check sample apart."""
    return model.family.workload(
        sizes,
        texts=(config.sentences if sentences is None else sentences) or None,
        batches_per_size=count,
        token_range=config.token_range,
        seed=config.seed + seed,
    )


def _budget(model: Model, config: OptimizeConfig) -> tuple[Budget, list[Batch]]:
    """The fidelity budget, or the user's metric with the original's score on their data."""
    if config.metric is None or config.data is None:
        return FidelityBudget(config.max_drop), []
    metric = import_function(config.metric, "give --metric as package.module:fn or file.py:fn")
    data, batches = model.family.read_user_data(config.data, batch_size=32)
    session = reference_session(model.original())
    outputs = metric_outputs(model, session, batches)
    baseline = score(metric, config.metric, outputs, data)
    return MetricBudget(metric, config.metric, data, baseline, config.max_drop), batches
