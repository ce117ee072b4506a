"""Decode latency from streamed tokens' clock readings: each generation's own time per token,
which a bursty stream (a drafting engine, a scheduler handing over tokens a few at a read) does
not fool."""

from __future__ import annotations

import pytest

from mahir.search.llm_timing import stream_timings


def test_a_bursty_stream_is_judged_by_when_it_finishes_not_by_its_gaps() -> None:
    # start, first token at 100 ms, then 8 tokens in 4 bursts of 2, 20 ms apart
    bursty = [0.0, 0.100, 0.120, 0.1201, 0.140, 0.1401, 0.160, 0.1601, 0.180, 0.1801]
    steady = [0.0, 0.100, *(0.100 + 0.005 * k for k in range(1, 9))]
    timed = stream_timings([bursty, steady])
    assert timed["ttft_ms"] == pytest.approx((100.0, 100.0))
    # the median gap of the bursty one is 0.1 ms; its 8 tokens took 80.1 ms
    assert timed["decode_ms"] == pytest.approx((80.1 / 8, 5.0))
    assert timed["tokens"] == 18
    assert timed["seconds"] == pytest.approx(0.1801 + 0.140)


def test_a_generation_of_one_token_has_a_ttft_and_no_decode_time() -> None:
    timed = stream_timings([[0.0, 0.05], [1.0, 1.05, 1.06, 1.07]])
    assert timed["ttft_ms"] == pytest.approx((50.0, 50.0))
    assert timed["decode_ms"] == pytest.approx((10.0,))
    assert timed["tokens"] == 4
