"""Grouped-query attention for one new token, without copying keys and values per query head.

In a model whose query heads share key/value heads in groups (Llama, Qwen2, Mistral, SmolLM2),
transformers' SDPA path repeats every key/value head once per query head of its group
(`repeat_kv`) whenever a mask is given or torch.compile traces it: on a static cache, that is
every decode step, and the step copies the whole cache once per layer. SmolLM2-135M's shape on
an H200 at batch 32: those copies took 18% of a compiled step's GPU time. For one new position,
a group's query heads can be laid out as that group's query rows, (batch, kv_heads, group, dim),
attending to the group's keys and values as they are: the same arithmetic, read once.

`use(module)` switches a grouped model on SDPA to it (`NAME`, registered with transformers'
attention and mask interfaces); everything else (prefill, models without groups, per-head
masks, position biases, soft-capping) goes through transformers' own SDPA function unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "mahir_sdpa"


def grouped_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; (batch, 1, heads, dim) for one new token."""
    groups = int(getattr(module, "num_key_value_groups", 1))
    batch, heads, length, _ = query.shape
    shared_mask = attention_mask is None or attention_mask.shape[1] == 1
    plain = all(kwargs.get(extra) is None for extra in ("position_bias", "softcap"))
    if groups == 1 or length != 1 or not shared_mask or not plain:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    grouped = query.reshape(batch, heads // groups, groups, query.shape[-1])
    out = torch.nn.functional.scaled_dot_product_attention(
        grouped, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling
    )
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def use(module: Any) -> bool:
    """Runs `module` (a transformers model on SDPA) with `grouped_sdpa` from now on, where its
    query heads share key/value heads and its attention goes through transformers' interface;
    whether it does."""
    config = module.config
    heads = getattr(config, "num_attention_heads", None)
    grouped = heads is not None and getattr(config, "num_key_value_heads", heads) < heads
    if not grouped or config._attn_implementation != "sdpa":
        return False
    if not getattr(module, "_supports_attention_backend", False):
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, grouped_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    module.set_attn_implementation(NAME)
    return True
