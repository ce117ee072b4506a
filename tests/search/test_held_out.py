"""Fidelity is judged on inputs no pass tuned on: the user's held-out share, shipped sentences
from one word to past the maximum length; self-tuning passes aim inside the budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mahir.hardware import detect
from mahir.model import Model
from mahir.passes import PassContext
from mahir.passes.nncf import NncfAccuracyControl
from mahir.recipe import Recipe
from mahir.runtimes import reference_outputs
from mahir.search.budget import FidelityBudget
from mahir.search.builder import ArtifactBuilder
from mahir.search.candidates import Candidate, propose
from mahir.search.halving import Evidence, Search
from mahir.search.records import outcome_record
from mahir.workload import split_held_out


def test_every_fifth_user_sentence_is_held_out_from_tuning() -> None:
    sentences = [f"sentence number {i}" for i in range(20)]
    tuning, held = split_held_out(sentences)
    assert len(held) == 4
    assert len(tuning) == 16
    assert not set(tuning) & set(held)
    assert split_held_out(sentences[:9]) == (tuple(sentences[:9]), ())  # too few to split


def test_held_out_text_spans_one_token_to_the_maximum_length(minilm: Model) -> None:
    batches = minilm.family.held_out_batches(["a sentence of the user's own"])
    lengths = np.concatenate([b["attention_mask"].sum(axis=1) for b in batches])
    assert lengths.min() <= 3  # "ok", "?": one token between [CLS] and [SEP]
    assert lengths.max() == minilm.family.max_length  # past the end, truncated as served
    assert len(lengths) >= 60


def test_the_budget_is_judged_on_held_out_inputs_too(mlp: Model, tmp_path: Path) -> None:
    batches = mlp.family.workload([4], batches_per_size=2, seed=0).batches[4]
    held_out = mlp.family.held_out_batches()
    calibration = mlp.family.workload([8], batches_per_size=2, seed=1).batches[8]
    wrong = [{k: -v for k, v in out.items()} for out in reference_outputs(mlp, held_out)]
    evidence = Evidence(
        check=batches,
        check_reference=reference_outputs(mlp, batches),
        timing={4: batches},
        timing_reference={4: reference_outputs(mlp, batches)},
        budget=FidelityBudget(),
        held_out=held_out,
        held_out_reference=wrong,  # a candidate fine on its sample, wrong on unseen inputs
        calibration=calibration,
        calibration_reference=reference_outputs(mlp, calibration),
    )
    ctx = PassContext(model=mlp, workdir=tmp_path, calibration=tuple(calibration))
    search = Search(mlp, ArtifactBuilder(ctx), evidence, "latency", "torch")
    outcome = search.check(Candidate("onnxruntime", "ORT", Recipe((), "onnxruntime")))
    assert outcome.status == "rejected"
    assert outcome.tuned_quality is not None  # measured on the calibration inputs too
    assert outcome.tuned_quality.headline.cosine_min > 0.9999
    record = outcome_record(outcome, "latency")
    assert record.quality_tuned is not None
    assert record.quality_tuned["outputs"]["output"]["cosine_min"] > 0.9999


def test_self_tuning_passes_aim_inside_the_budget(minilm: Model) -> None:
    proposed, skipped = propose(minilm, detect(gpus=False), "latency", max_drop=0.01)
    every = [*proposed, *(c for c, _ in skipped)]
    aims = [
        step.max_drop
        for c in every
        for step in c.recipe.steps
        if isinstance(step, NncfAccuracyControl)
    ]
    assert aims
    assert all(aim == 0.005 for aim in aims)
