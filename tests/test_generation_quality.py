"""Fidelity for generation on hand-made distributions: identical answers agree fully at KL 0, a
known pair gives its KL and perplexities, non-finite answers never pass, greedy continuations are
compared up to their first divergence, and the budget names what it misses."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest

from mahir.generation import Sampling
from mahir.generation_quality import (
    GenerationBudget,
    agreed_prefix,
    judge,
    reference_answers,
    teacher_forced,
)
from mahir.types import CPU

REF = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]], np.float32))
CAND = np.log(np.array([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.2, 0.2, 0.6]], np.float32))
TOKENS = [0, 1, 2, 0]  # position i predicts TOKENS[i + 1]: 1, 2, 0


def _forced(cand: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    rows = np.vstack([ref, ref[:1]])  # a last position, which has no next token to judge
    return teacher_forced([np.vstack([cand, cand[:1]])], [rows], [TOKENS])


def test_identical_answers_agree_fully_at_kl_zero() -> None:
    forced = _forced(REF, REF)
    assert forced["top1_agreement"] == 1.0
    assert forced["kl_mean"] == pytest.approx(0.0, abs=1e-7)
    assert forced["perplexity"] == pytest.approx(forced["reference_perplexity"])
    assert forced["positions"] == 3


def test_a_known_pair_gives_its_kl_top1_and_perplexity() -> None:
    p, q = np.exp(REF.astype(np.float64)), np.exp(CAND.astype(np.float64))
    kl = (p * np.log(p / q)).sum(axis=1)  # 0.027, 0.412 and 0: the second row's argmax moves
    forced = _forced(CAND, REF)
    assert forced["top1_agreement"] == pytest.approx(2 / 3)
    assert forced["kl_mean"] == pytest.approx(kl.mean(), rel=1e-5)
    assert forced["kl_max"] == pytest.approx(kl.max(), rel=1e-5)
    # The true next tokens are 1, 2, 0: the reference gives them 0.2, 0.3, 0.2.
    assert forced["reference_perplexity"] == pytest.approx(_perplexity([0.2, 0.3, 0.2]))
    assert forced["perplexity"] == pytest.approx(_perplexity([0.3, 0.1, 0.2]))


def _perplexity(probabilities: list[float]) -> float:
    return math.exp(-np.log(probabilities).mean())


def test_non_finite_answers_never_pass() -> None:
    broken = CAND.copy()
    broken[1] = np.nan
    forced = _forced(broken, REF)
    assert forced["top1_agreement"] == pytest.approx(2 / 3)  # rows 0 and 2 agree, 1 is NaN
    assert forced["kl_mean"] == math.inf


def test_agreed_prefix() -> None:
    assert agreed_prefix([1, 2, 3], [1, 2, 3]) == 3
    assert agreed_prefix([1, 2, 4, 5], [1, 2, 3, 5]) == 2
    assert agreed_prefix([9], [1]) == 0


class Scripted:
    """A `Generator` that answers from scripts: logprobs by sequence, tokens by prompt."""

    engine = "scripted"
    device = CPU
    context_length = 64

    def __init__(self, logprobs: np.ndarray, continuation: list[int]) -> None:
        self._logprobs, self._continuation = logprobs, continuation

    def stream(self, prompt: Sequence[int], sampling: Sampling) -> Iterator[int]:
        return iter(self._continuation[: sampling.max_new_tokens])

    def logprobs(self, tokens: Sequence[int]) -> np.ndarray:
        return self._logprobs[: len(tokens)]

    def describe(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        """Nothing to release."""


def test_judge_compares_both_views_and_the_budget_names_what_it_misses() -> None:
    rows = np.vstack([REF, REF[:1]])
    reference = reference_answers(Scripted(rows, [5, 6, 7, 8]), [TOKENS], [[1, 2]], 4)
    same = judge(Scripted(rows, [5, 6, 7, 8]), reference)
    assert (same.top1_agreement, same.greedy_agreed, same.greedy_agreement) == (1.0, (4,), 1.0)
    assert GenerationBudget().failures(same) == []
    worse = judge(Scripted(np.vstack([CAND, CAND[:1]]), [5, 6, 9, 8]), reference)
    assert worse.greedy_agreed == (2,)
    assert worse.greedy_agreement == 0.5
    failures = GenerationBudget().failures(worse)
    assert len(failures) == 2
    assert failures[0].startswith("top-1 agreement 0.667 < 0.93")
    assert failures[1].startswith("mean KL 0.1462 > 0.02")
    assert worse.to_dict()["greedy_agreement"] == 0.5


def test_on_a_real_engine_the_reference_passes_and_a_broken_copy_fails(tiny_llm: Any) -> None:
    """The tiny Llama against itself, and against a copy whose weights carry 30% noise."""
    import copy

    import torch

    from mahir.generation_quality import Judging, held_out_answers
    from mahir.runtimes.engines import open_engine
    from mahir.types import RuntimeOptions

    judging = Judging(passages=3, tokens=64, prompts=2, greedy_tokens=8)
    options = RuntimeOptions(threads=1)
    reference = open_engine("torch", tiny_llm.original(), options)
    answers = held_out_answers(reference, tiny_llm.family, judging)
    itself = judge(reference, answers)
    assert (itself.top1_agreement, itself.kl_mean, itself.greedy_agreement) == (1.0, 0.0, 1.0)
    assert itself.positions == 3 * 63
    noisy = copy.deepcopy(tiny_llm.module)
    torch.manual_seed(0)
    with torch.no_grad():
        for weight in noisy.parameters():
            weight.add_(torch.randn_like(weight) * weight.std() * 0.3)
    broken = judge(open_engine("torch", tiny_llm.original().derive(module=noisy), options), answers)
    assert GenerationBudget().failures(broken)
    assert broken.kl_mean > 0.02
