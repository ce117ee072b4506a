"""The inverse-CDF draw mahir's vLLM worker samples with (`vllm_worker.draw_by_cdf`), in
mahir's own environment (it needs torch only): tokens come as often as softmax says, a masked
token never comes, a seeded row repeats, and a vocabulary that is not a whole number of blocks
reaches its last token."""

from __future__ import annotations

import torch

from mahir.runtimes.vllm_worker import CHUNK, _below, draw_by_cdf


def _frequencies(logits: torch.Tensor, draws: int) -> torch.Tensor:
    rows = logits.expand(256, -1).contiguous()
    counts = sum(
        torch.bincount(draw_by_cdf(rows, {}), minlength=logits.shape[1])
        for _ in range(draws // 256)
    )
    assert isinstance(counts, torch.Tensor)
    return counts / counts.sum()


def test_tokens_come_as_often_as_softmax_says() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 3 * CHUNK + 17) * 4  # peaked; not a whole number of blocks
    logits[0, -1] = logits.max() + 1  # the very last entry is the likeliest
    expected = torch.softmax(logits[0], dim=0)
    found = _frequencies(logits, 65_536)
    assert 0.5 * (found - expected).abs().sum() < 0.02  # total variation: sampling noise ~0.01
    assert abs(found[-1] - expected[-1]) < 0.01


def test_a_masked_token_never_comes_and_a_seeded_row_repeats() -> None:
    torch.manual_seed(1)
    logits = torch.zeros(4, 2 * CHUNK)
    logits[:, CHUNK - 1 : CHUNK + 1] = float("-inf")  # the two entries around a block's edge
    drawn = torch.cat([draw_by_cdf(logits, {}) for _ in range(2_000)])
    assert not ((drawn == CHUNK - 1) | (drawn == CHUNK)).any()
    assert len(drawn.unique()) > CHUNK  # uniform over the rest: most entries come
    total = torch.tensor([[3.0]], dtype=torch.float64)  # a target the sums rounded up to it
    assert _below(total.clone(), total) < total  # stays under: the entry it ends has weight
    first = draw_by_cdf(logits, {2: torch.Generator().manual_seed(7)})
    again = draw_by_cdf(logits, {2: torch.Generator().manual_seed(7)})
    assert first[2] == again[2]
