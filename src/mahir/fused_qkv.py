"""A BERT-style self-attention with its query, key and value projections as one matmul.

Built by the `FuseQKV` pass (`passes/fuse_qkv.py`, which says why). The module keeps the
original's attention function: the model's configured one (SDPA, flash ...) through
transformers' registry, or its family's eager one, so only the projections change.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

SELF_ATTENTION = frozenset(
    {
        "BertSelfAttention",
        "RobertaSelfAttention",
        "XLMRobertaSelfAttention",
        "CamembertSelfAttention",
    }
)
"""transformers' encoder self-attention classes whose forward `FusedSelfAttention` reproduces."""


def fusable(layer: torch.nn.Module) -> bool:
    """Whether `layer` is an encoder's self-attention of `SELF_ATTENTION` with three biased
    projections of one shape."""
    if type(layer).__name__ not in SELF_ATTENTION or getattr(layer.config, "is_decoder", True):
        return False
    parts = [getattr(layer, name, None) for name in ("query", "key", "value")]
    linear = [p for p in parts if isinstance(p, torch.nn.Linear) and p.bias is not None]
    return len(linear) == 3 and len({(p.in_features, p.out_features) for p in linear}) == 1


class FusedSelfAttention(torch.nn.Module):
    """`attention` (see `fusable`) with query, key and value stacked into one `qkv` linear."""

    def __init__(self, attention: Any) -> None:
        super().__init__()
        parts: list[Any] = [attention.query, attention.key, attention.value]
        weight = parts[0].weight
        self.qkv = torch.nn.Linear(
            parts[0].in_features,
            3 * parts[0].out_features,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([p.weight for p in parts]))
            self.qkv.bias.copy_(torch.cat([p.bias for p in parts]))
        self.config: Any = attention.config
        self.scaling: float = attention.scaling
        self.is_causal, self.layer_idx = attention.is_causal, attention.layer_idx
        self.head_size = int(attention.attention_head_size)
        self.dropout: torch.nn.Dropout = attention.dropout
        self.eager = sys.modules[type(attention).__module__].eager_attention_forward
        self.train(attention.training)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        for cache in ("cache", "past_key_values"):  # an encoder is given none
            if kwargs.pop(cache, None) is not None:
                raise ValueError("a fused self-attention takes no KV cache: encoders only")
        shape = hidden_states.shape[:-1]
        fused = self.qkv(hidden_states).view(*shape, 3, -1, self.head_size)
        query, key, value = (part.transpose(1, 2) for part in fused.unbind(2))
        implementation = self.config._attn_implementation
        attend = (
            self.eager if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]
        )
        output, weights = attend(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.dropout.p if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return output.reshape(*shape, -1).contiguous(), weights
