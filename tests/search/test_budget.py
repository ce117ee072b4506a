from __future__ import annotations

import numpy as np
import pytest

from mahir.errors import BadInput
from mahir.search.budget import FidelityBudget, MetricBudget, quality_kind, score
from mahir.types import OutputFidelity, Quality


def fid(mean: float, worst: float, top1: float | None = None, rel: float = 0.0) -> OutputFidelity:
    return OutputFidelity(0.1, rel, mean, worst, top1)


def test_sentence_embeddings_are_judged_on_mean_and_worst_cosine() -> None:
    budget = FidelityBudget(0.01)
    ok = Quality({"x": fid(0.5, 0.5)}, embedding=fid(0.995, 0.985))
    assert budget.judge(ok) is None
    low_mean = Quality({"x": fid(1, 1)}, embedding=fid(0.985, 0.985))
    assert budget.judge(low_mean) == "mean cosine 0.9850 < 0.99"
    low_worst = Quality({"x": fid(1, 1)}, embedding=fid(0.995, 0.975))
    assert budget.judge(low_worst) == "worst cosine 0.9750 < 0.98"
    assert quality_kind(ok) == "embedding"
    assert "mean >= 0.99 and worst >= 0.98" in budget.describe("embedding")


def test_classifiers_are_judged_on_top1_agreement() -> None:
    budget = FidelityBudget(0.01)
    assert budget.judge(Quality({"logits": fid(0.9, 0.5, top1=0.995)})) is None
    reason = budget.judge(Quality({"logits": fid(1, 1, top1=0.98)}))
    assert reason == "logits: top-1 agreement 98.00% < 99.0%"


def test_every_output_is_judged_by_its_kind() -> None:
    # RoBERTa-like: a candidate may agree on a pooled vector and still break the hidden states
    budget = FidelityBudget(0.01)
    pooled_ok, hidden_bad = fid(1, 0.9998), fid(0.99, 0.95)
    reason = budget.judge(Quality({"pooler_output": pooled_ok, "last_hidden_state": hidden_bad}))
    assert reason == "last_hidden_state: worst cosine 0.9500 < 0.98"
    mixed = Quality({"logits": fid(0.9, 0.5, top1=1.0), "hidden": fid(1, 0.97)})
    assert quality_kind(mixed) == "mixed"
    assert budget.judge(mixed) == "hidden: worst cosine 0.9700 < 0.98"
    assert "logits: top-1" in budget.describe("mixed")


def test_other_outputs_need_cosine_and_bounded_error() -> None:
    budget = FidelityBudget(0.01)
    assert budget.judge(Quality({"y": fid(1, 0.99, rel=0.05)})) is None
    assert "y: worst cosine" in (budget.judge(Quality({"y": fid(1, 0.97)})) or "")
    assert "max error" in (budget.judge(Quality({"y": fid(1, 1, rel=0.2)})) or "")


def test_a_metric_may_drop_by_max_drop_and_nan_never_passes() -> None:
    budget = MetricBudget(lambda o, d: 0.0, "acc", None, baseline=0.9, max_drop=0.02)
    assert budget.judge(0.885) is None
    assert budget.judge(0.87) == "acc 0.87 < 0.88 (original 0.9)"
    assert budget.judge(float("nan")) is not None


def test_a_failing_metric_is_one_line_of_bad_input() -> None:
    def broken(outputs: object, data: object) -> float:
        raise KeyError("label")

    with pytest.raises(BadInput, match="metric m:broken raised KeyError"):
        score(broken, "m:broken", [{"y": np.zeros((2, 3))}], None)


def test_outputs_of_different_lengths_reach_the_metric_as_a_list() -> None:
    seen = {}

    def metric(outputs: dict[str, object], data: object) -> float:
        seen.update(outputs)
        return 1.0

    score(
        metric,
        "m",
        [
            {"t": np.zeros((2, 5)), "e": np.zeros((2, 4))},
            {"t": np.zeros((1, 7)), "e": np.ones((1, 4))},
        ],
        None,
    )
    assert isinstance(seen["t"], list)
    assert len(seen["t"]) == 2
    assert isinstance(seen["e"], np.ndarray)
    assert seen["e"].shape == (3, 4)


def test_out_of_range_drops_are_refused() -> None:
    with pytest.raises(BadInput, match="max-drop"):
        FidelityBudget(0.7)
