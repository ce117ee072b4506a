"""Grouped attention for one new token: the same numbers as transformers' SDPA path, which
repeats each key/value head per query head; anything but one new token goes through that path."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from mahir.runtimes import torch_attention


class Layer(torch.nn.Module):
    """What the attention function reads off a transformers attention layer."""

    num_key_value_groups = 3
    is_causal = True


def _heads(batch: int, heads: int, length: int) -> torch.Tensor:
    return torch.randn(batch, heads, length, 16)


@pytest.mark.parametrize("masked", [True, False])
def test_one_token_attends_as_transformers_sdpa_does(masked: bool) -> None:
    torch.manual_seed(0)
    query, key, value = _heads(2, 6, 1), _heads(2, 2, 12), _heads(2, 2, 12)
    mask = torch.arange(12)[None, None, None, :] < torch.tensor([5, 12])[:, None, None, None]
    mask = mask if masked else None
    hits: list[tuple[int, ...]] = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object) -> torch.Tensor:
        hits.append(tuple(q.shape))
        return original(q, k, v, **kw)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        got, _ = torch_attention.grouped_sdpa(Layer(), query, key, value, mask, scaling=0.25)
    want, _ = sdpa_attention_forward(Layer(), query, key, value, mask, scaling=0.25)
    assert hits == [(2, 2, 3, 16)]  # the groups' query heads as rows; keys not repeated
    assert got.shape == want.shape == (2, 1, 6, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_prompt_goes_through_transformers_path() -> None:
    torch.manual_seed(0)
    query, key, value = _heads(1, 6, 5), _heads(1, 2, 5), _heads(1, 2, 5)
    got, _ = torch_attention.grouped_sdpa(Layer(), query, key, value, None)
    want, _ = sdpa_attention_forward(Layer(), query, key, value, None)
    assert torch.equal(got, want)


def test_soft_capping_is_left_to_transformers_which_refuses_it_on_sdpa() -> None:
    query, key, value = _heads(1, 6, 1), _heads(1, 2, 5), _heads(1, 2, 5)
    with pytest.raises(ValueError, match="softcap"):
        torch_attention.grouped_sdpa(Layer(), query, key, value, None, softcap=30.0)


def _llama(kv_heads: int) -> torch.nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=kv_heads,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def test_only_grouped_models_on_sdpa_are_switched() -> None:
    grouped, plain, eager = _llama(2), _llama(4), _llama(2)
    eager.set_attn_implementation("eager")
    assert torch_attention.use(grouped)
    assert grouped.config._attn_implementation == torch_attention.NAME
    assert not torch_attention.use(plain)
    assert plain.config._attn_implementation == "sdpa"
    assert not torch_attention.use(eager)
    assert eager.config._attn_implementation == "eager"
