"""Attention over packed sequences: a batch of sentences run as one stream of real tokens.

A padded batch computes every row to the longest sentence; with typical text (a median of ~20
tokens, a tail past 100) most of that is padding: 4.9x the real tokens in random order on the
workload in benchmarks/gpu.py. Packed, the batch's tokens are laid end to end (one row of T
tokens, no padding) and attention runs per sentence, between offsets `cu_seqlens`
([0, len0, len0+len1, ...]). Everything else in an encoder layer (projections, MLP,
LayerNorm) works token by token, so it needs no change; the sentence embedding is pooled per
segment at the end.

Pieces:
- `mahir::packed_attention`, a torch custom op: on CUDA PyTorch's varlen flash attention
  (`torch.nn.attention.varlen.varlen_attn`), elsewhere scaled-dot-product attention under a
  block-diagonal mask (correct, quadratic in T: for checking, not for speed). A custom op
  keeps the choice at run time, so a program exported on the CPU runs varlen on the GPU.
- `PackedEncoder`: a transformers encoder switched to that attention through transformers'
  own extension point (`AttentionInterface`), called with packed inputs, pooled per segment.
The host side (laying a padded batch out packed, shape buckets) is `runtimes/packing.py`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

ATTENTION = "mahir_packed"
"""The name the packed attention is registered under with transformers."""
MODEL_TYPES = frozenset({"bert"})
"""Encoders whose position ids are the token's column in the padded row (so packing can pass
them explicitly) and whose attention goes through transformers' attention interface."""


@torch.library.custom_op("mahir::packed_attention", mutates_args=())
def packed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_length: int,
    scale: float,
) -> torch.Tensor:
    """Attention within each segment of packed (tokens, heads, head_dim) tensors."""
    if query.is_cuda:
        from torch.nn.attention.varlen import varlen_attn

        out = varlen_attn(
            query, key, value, cu_seqlens, cu_seqlens, max_length, max_length, scale=scale
        )
        return out if isinstance(out, torch.Tensor) else out[0]
    tokens = torch.arange(query.shape[0], device=query.device)
    segment = torch.searchsorted(cu_seqlens[1:].long(), tokens, right=True)
    same = segment[:, None] == segment[None, :]
    q, k, v = (t.transpose(0, 1) for t in (query, key, value))
    attended = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=same, scale=scale
    )
    return attended.transpose(0, 1).contiguous()


@packed_attention.register_fake
def _(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_length: int,
    scale: float,
) -> torch.Tensor:
    return torch.empty_like(query)


def _transformers_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: (1, heads, T, d) in, (1, T, heads, d) out."""
    cu_seqlens, max_length = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    packed = [t[0].transpose(0, 1) for t in (query, key, value)]
    out = torch.ops.mahir.packed_attention(*packed, cu_seqlens, max_length, scale)
    return out.unsqueeze(0), None


def encoder_inside(module: torch.nn.Module) -> Any:
    """The one transformers model inside a torch artifact's module, or None."""
    from transformers import PreTrainedModel

    found = [m for m in module.modules() if isinstance(m, PreTrainedModel)]
    return found[0] if len(found) == 1 else None


class PackedEncoder(torch.nn.Module):
    """A transformers encoder run on a packed batch, answering with each segment's sentence
    embedding (float32, pooled and normalized as `PooledEmbedding` does on a padded batch).

    Inputs (see runtimes/packing.py): the token inputs as one row (1, T); `position_ids`
    (1, T), each token's column in the padded batch; `cu_seqlens` (S + 1,) int32 segment
    offsets; `segments` (T,), each token's segment. Output: (S, hidden), one row per segment."""

    def __init__(self, encoder: Any, mode: str, normalize: bool, max_length: int) -> None:
        super().__init__()
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION, _transformers_attention)
        self.encoder = copy.deepcopy(encoder)  # its config is switched; the original keeps its own
        self.encoder.set_attn_implementation(ATTENTION)
        self.mode, self.normalize, self.max_length = mode, normalize, max_length

    def forward(
        self,
        cu_seqlens: torch.Tensor,
        segments: torch.Tensor,
        position_ids: torch.Tensor,
        **token_inputs: torch.Tensor,
    ) -> tuple[torch.Tensor]:
        hidden = self.encoder(
            **token_inputs,
            position_ids=position_ids,
            cu_seq_lens_q=cu_seqlens,
            cu_seq_lens_k=cu_seqlens,
            max_length_q=self.max_length,
            max_length_k=self.max_length,
        )[0][0].float()
        pooled = self._pool(hidden, cu_seqlens, segments)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=1, eps=1e-12)
        return (pooled,)

    def _pool(
        self, tokens: torch.Tensor, cu_seqlens: torch.Tensor, segments: torch.Tensor
    ) -> torch.Tensor:
        count = cu_seqlens.shape[0] - 1
        starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
        last_row = tokens.shape[0] - 1
        if self.mode == "mean":
            total = tokens.new_zeros(count, tokens.shape[1]).index_add_(0, segments, tokens)
            return total / (ends - starts).clamp(min=1).unsqueeze(1).to(tokens.dtype)
        if self.mode == "cls":
            return tokens[starts.clamp(max=last_row)]
        if self.mode == "max":
            init = tokens.new_full((count, tokens.shape[1]), -torch.inf)
            index = segments.unsqueeze(1).expand_as(tokens)
            return init.scatter_reduce(0, index, tokens, "amax", include_self=True)
        # lasttoken: an empty segment gives zeros, as on a padded row with no real token
        last = tokens[(ends - 1).clamp(min=0, max=last_row)]
        return torch.where((ends > starts).unsqueeze(1), last, 0)
