"""The generation contract: sampling settings checked up front, and `choose` greedy, seeded and
held to top-p."""

from __future__ import annotations

import numpy as np
import pytest

from mahir.generation import Sampling, choose

LOGITS = np.array([1.0, 3.0, 2.9, -5.0], np.float32)


def test_greedy_is_the_argmax() -> None:
    assert choose(LOGITS, Sampling(), np.random.default_rng(0)) == 1


def test_a_seed_repeats_a_sample_and_top_p_keeps_to_the_nucleus() -> None:
    hot = Sampling(temperature=1.0, seed=3)
    picks = [choose(LOGITS, hot, np.random.default_rng(3)) for _ in range(2)]
    assert picks[0] == picks[1]
    nucleus = Sampling(temperature=1.0, top_p=0.5)
    rng = np.random.default_rng(0)
    assert {choose(LOGITS, nucleus, rng) for _ in range(200)} <= {1, 2}
    assert {choose(LOGITS, hot, rng) for _ in range(400)} >= {0, 1, 2}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"temperature": -1}, "temperature must be >= 0"),
        ({"top_p": 0}, "top_p must be in"),
    ],
)
def test_bad_settings_are_refused(settings: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Sampling(**settings)  # type: ignore[arg-type]
