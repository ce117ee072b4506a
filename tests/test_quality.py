"""Fidelity numbers on small arrays where the right answer can be worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from mahir.errors import ExportMismatch
from mahir.pooling import Pooling, pool
from mahir.quality import compare

RNG = np.random.default_rng(0)
HIDDEN = RNG.standard_normal((3, 5, 4)).astype(np.float32)
LOGITS = RNG.standard_normal((3, 6)).astype(np.float32)
MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])


def test_identical_outputs_are_perfect() -> None:
    outputs = [{"last_hidden_state": HIDDEN, "logits": LOGITS}] * 2
    quality = compare(outputs, outputs, attention_masks=[MASK, MASK], logits=frozenset({"logits"}))
    hidden, logits = quality.outputs["last_hidden_state"], quality.outputs["logits"]
    for fidelity in (hidden, logits):
        assert (fidelity.max_abs_err, fidelity.max_rel_err) == (0.0, 0.0)
        assert fidelity.cosine_mean == pytest.approx(1.0, abs=1e-12)
        assert fidelity.cosine_min == pytest.approx(1.0, abs=1e-12)
    assert logits.top1_agreement == 1.0
    assert hidden.top1_agreement is None  # hidden states are not class scores
    assert quality.embedding is None


def test_known_perturbation_gives_known_numbers() -> None:
    reference = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], dtype=np.float32)
    candidate = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.5]], dtype=np.float32)
    fidelity = compare([{"y": candidate}], [{"y": reference}]).outputs["y"]
    cosine = 2.0 / np.sqrt(4.25)
    assert fidelity.max_abs_err == pytest.approx(0.5)
    assert fidelity.max_rel_err == pytest.approx(0.25)  # 0.5 over the largest |reference|, 2
    assert fidelity.cosine_min == pytest.approx(cosine)
    assert fidelity.cosine_mean == pytest.approx((1 + cosine) / 2)
    assert fidelity.top1_agreement is None  # two columns, but not declared logits


def test_a_sign_flip_is_the_worst_cosine() -> None:
    fidelity = compare([{"y": -HIDDEN}], [{"y": HIDDEN}]).outputs["y"]
    assert fidelity.cosine_min == pytest.approx(-1.0)


def test_relative_error_is_not_blown_up_by_values_near_zero() -> None:
    reference = np.array([[1e-9, 1.0]])
    candidate = np.array([[2e-9, 1.0]])  # elementwise, the first value is 100% off
    fidelity = compare([{"y": candidate}], [{"y": reference}]).outputs["y"]
    assert fidelity.max_rel_err == pytest.approx(1e-9)


def test_top1_counts_samples_whose_answer_changed() -> None:
    reference = np.array([[0.1, 0.2], [0.5, 0.4], [0.0, 1.0], [2.0, 1.0]])
    candidate = np.array([[0.3, 0.2], [0.5, 0.4], [0.0, 1.0], [0.9, 1.0]])
    quality = compare([{"y": candidate}], [{"y": reference}], logits=frozenset({"y"}))
    assert quality.outputs["y"].top1_agreement == 0.5


def test_padded_positions_are_excluded() -> None:
    candidate = HIDDEN.copy()
    candidate[MASK == 0] = 1000.0  # garbage where there are no tokens
    masked = compare([{"h": candidate}], [{"h": HIDDEN}], attention_masks=[MASK]).outputs["h"]
    assert masked.max_abs_err == 0.0
    assert masked.cosine_min == pytest.approx(1.0)
    unmasked = compare([{"h": candidate}], [{"h": HIDDEN}]).outputs["h"]
    assert unmasked.max_abs_err > 900
    assert unmasked.cosine_min < 0.5


def test_padded_reference_values_do_not_set_the_scale() -> None:
    reference = HIDDEN.copy()
    reference[MASK == 0] = 1e6
    candidate = reference + np.float32(0.01)
    fidelity = compare([{"h": candidate}], [{"h": reference}], attention_masks=[MASK]).outputs["h"]
    assert fidelity.max_rel_err == pytest.approx(0.01 / np.abs(HIDDEN[MASK == 1]).max(), rel=1e-3)


def test_token_logits_count_real_positions_only() -> None:
    reference = np.zeros((2, 3, 2))
    reference[..., 0] = 1.0  # class 0 everywhere
    candidate = reference.copy()
    candidate[1, 2] = [0.0, 1.0]  # a padded position disagrees: not counted
    candidate[1, 0] = [0.0, 1.0]  # a real position disagrees
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    fidelity = compare(
        [{"token_logits": candidate}],
        [{"token_logits": reference}],
        attention_masks=[mask],
        logits=frozenset({"token_logits"}),
    ).outputs["token_logits"]
    assert fidelity.top1_agreement == pytest.approx(4 / 5)


def test_span_logits_never_pick_a_padded_position() -> None:
    # (batch, seq) start logits: a large value at a pad must not become the answer.
    reference = np.array([[0.1, 0.9, -5.0], [0.8, 0.2, -5.0]])
    candidate = reference.copy()
    candidate[:, 2] = 50.0
    mask = np.array([[1, 1, 0], [1, 1, 0]])
    fidelity = compare(
        [{"start_logits": candidate}],
        [{"start_logits": reference}],
        attention_masks=[mask],
        logits=frozenset({"start_logits"}),
    ).outputs["start_logits"]
    assert fidelity.top1_agreement == 1.0
    assert fidelity.max_abs_err == 0.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_the_worst_fidelity(bad: float) -> None:
    candidate = LOGITS.copy()
    candidate[1, 3] = bad
    quality = compare([{"logits": candidate}], [{"logits": LOGITS}], logits=frozenset({"logits"}))
    fidelity = quality.outputs["logits"]
    assert fidelity.cosine_min == -1.0
    assert fidelity.cosine_mean == pytest.approx((1 + -1 + 1) / 3)
    assert fidelity.max_abs_err == np.inf
    assert fidelity.max_rel_err == np.inf
    assert fidelity.top1_agreement == pytest.approx(2 / 3)


def test_a_nan_at_a_padded_position_is_still_caught() -> None:
    candidate = HIDDEN.copy()
    candidate[2, 4] = np.nan
    fidelity = compare([{"h": candidate}], [{"h": HIDDEN}], attention_masks=[MASK]).outputs["h"]
    assert fidelity.cosine_min == -1.0
    assert fidelity.max_abs_err == np.inf


def test_zero_vectors() -> None:
    reference = np.array([[0.0, 0.0], [0.0, 0.0]])
    candidate = np.array([[0.0, 0.0], [0.0, 1.0]])
    fidelity = compare([{"y": candidate}], [{"y": reference}]).outputs["y"]
    assert fidelity.cosine_mean == 0.5  # both zero: agree; zero against non-zero: not at all
    assert fidelity.max_rel_err == np.inf  # an error against a reference of all zeros


def test_half_precision_candidate_against_fp32_reference() -> None:
    candidate = HIDDEN.astype(np.float16)
    fidelity = compare([{"h": candidate}], [{"h": HIDDEN}]).outputs["h"]
    assert 0 < fidelity.max_abs_err < 1e-2
    assert fidelity.cosine_min > 0.9999


def test_sentence_embedding_fidelity() -> None:
    pooling = Pooling("mean", normalize=True)
    candidate = HIDDEN.copy()
    candidate[MASK == 0] = 99.0  # pads do not reach a mean-pooled embedding
    candidate[0, 0] += 0.5  # a real token does
    quality = compare(
        [{"h": candidate}],
        [{"h": HIDDEN}],
        attention_masks=[MASK],
        pooling=pooling,
        embedding_output="h",
    )
    assert quality.embedding is not None
    assert quality.headline == quality.embedding
    got, want = pool(candidate, MASK, pooling), pool(HIDDEN, MASK, pooling)
    cosines = (got * want).sum(axis=1)  # unit vectors
    assert quality.embedding.cosine_min == pytest.approx(cosines.min(), rel=1e-6)
    assert quality.embedding.cosine_min < 0.9999
    assert quality.embedding.max_abs_err == pytest.approx(np.abs(got - want).max(), rel=1e-5)
    assert list(cosines[1:]) == pytest.approx([1.0, 1.0])


def test_headline_without_pooling_is_the_worst_output() -> None:
    outputs = [{"a": HIDDEN, "b": -HIDDEN}]
    quality = compare(outputs, [{"a": HIDDEN, "b": HIDDEN}])
    assert quality.headline == quality.outputs["b"]


def test_shape_mismatch_names_the_output_and_both_shapes() -> None:
    with pytest.raises(ExportMismatch, match=r"'h'.*\(3, 5, 3\).*\(3, 5, 4\)"):
        compare([{"h": HIDDEN[..., :3]}], [{"h": HIDDEN}])


def test_missing_and_extra_outputs_are_named() -> None:
    with pytest.raises(ExportMismatch, match=r"missing \['logits'\], unexpected \['other'\]"):
        compare([{"h": HIDDEN, "other": HIDDEN}], [{"h": HIDDEN, "logits": LOGITS}])


def test_caller_mistakes_are_value_errors() -> None:
    outputs = [{"h": HIDDEN}]
    with pytest.raises(ValueError, match="one set of outputs per reference batch"):
        compare(outputs, outputs * 2)
    with pytest.raises(ValueError, match="attention masks"):
        compare(outputs, outputs, attention_masks=[MASK, MASK])
    with pytest.raises(ValueError, match="both or neither"):
        compare(outputs, outputs, pooling=Pooling("mean", normalize=False))
    with pytest.raises(ValueError, match="no output 'nope'"):
        compare(outputs, outputs, pooling=Pooling("cls", False), embedding_output="nope")
