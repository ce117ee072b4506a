"""A transformers causal LM as the PyTorch LLM engine calls it: one forward with a KV cache, and a
prefill that keeps only the last position's logits.

Shared by the one-stream generator (`torch_generator.py`) and the continuous batch
(`torch_batching.py`), so that a sequence prefilled by either runs the very same forward. It
holds no generator state (no cache, no thread): the batch's engine thread keeps one without
keeping the generator alive. Imports torch only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mahir.errors import Unsupported


@dataclass(frozen=True, slots=True)
class CausalLM:
    """A causal LM module on its device, run with the engine's thread count."""

    module: Any
    where: torch.device
    threads: int
    cache_arg: str
    """The forward's name for the KV cache (transformers renamed `past_key_values` to `cache`)."""
    keep_last: bool
    """Whether the forward takes `logits_to_keep` (a prefill then projects one position)."""

    @classmethod
    def of(cls, module: Any, where: torch.device, threads: int) -> CausalLM:
        cache_arg = "cache" if _takes(module, "cache") else "past_key_values"
        return cls(module, where, threads, cache_arg, _takes(module, "logits_to_keep"))

    def forward(self, ids: torch.Tensor, cache: Any, **extra: Any) -> torch.Tensor:
        """(batch, len(ids), vocab) logits; `cache` takes the new keys and values."""
        out = self.module(input_ids=ids, use_cache=True, **{self.cache_arg: cache}, **extra)
        logits: torch.Tensor = out.logits
        return logits

    def prefill(self, prompt: Sequence[int], cache: Any, **extra: Any) -> torch.Tensor:
        """The logits after `prompt`'s last token (vocab,), `cache` filled with the prompt. Sets
        torch's process-wide thread count: a generation starts here."""
        torch.set_num_threads(self.threads)
        ids = torch.tensor([list(prompt)], device=self.where)
        if self.keep_last:
            extra["logits_to_keep"] = 1
        with torch.inference_mode():
            return self.forward(ids, cache, **extra)[0, -1]


WINDOWED = (
    "this model has sliding-window or linear attention layers, which the compiled static cache "
    "does not run: use the eager torch engine or llama.cpp"
)
"""Why a compiled engine refuses a model `full_attention` finds None for: said where it opens
and, before any work, where the bench and the search choose engines."""


def full_attention(config: Any) -> int | None:
    """The model's layer count where every layer attends to all positions; None where some
    have sliding windows or linear attention, whose caches a preallocated, position-indexed
    cache (the compiled step's, the continuous batch's) does not hold."""
    from transformers import DynamicCache, DynamicLayer

    layers = DynamicCache(config=config).layers
    full = [isinstance(layer, DynamicLayer) and not layer.is_sliding for layer in layers]
    return len(layers) if full and all(full) else None


Step = Callable[..., torch.Tensor]


def compile_step(step: Step, where: torch.device) -> Step:
    """`step` (a decode step: one shape) as torch.compile compiles it here. On a GPU a small
    model's step is hundreds of short kernels, so it is captured as a CUDA graph and its matmuls
    autotuned ("max-autotune"; SmolLM2-135M's shape on an H200, bf16: 0.99 ms of GPU time a step
    against 1.50 as "reduce-overhead"). Inductor's freezing (weights as constants, matmuls that
    share an input merged) is not used: with it the step's writes to the static KV cache count
    as mutated inputs and the CUDA graph is skipped (9.1 ms a token against 1.1 there)."""
    mode = "max-autotune" if where.type == "cuda" else None
    return torch.compile(step, fullgraph=True, dynamic=False, mode=mode)


def _takes(module: Any, name: str) -> bool:
    """Whether the model's forward takes keyword `name`: transformers renames arguments between
    releases (`past_key_values` became `cache`), and the old name warns."""
    return name in inspect.signature(module.forward).parameters


def context_of(config: Any) -> int:
    """The model's context length from its config."""
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise Unsupported("the model's config gives no context length (max_position_embeddings)")
