"""Continuous batching for the PyTorch LLM engine: concurrent `stream` calls decoded as one batch,
each sequence joining and leaving it between decode steps.

The invariant: one engine thread owns the model and a KV cache preallocated for `slots`
sequences of `length` tokens; row r holds one sequence's keys and values at positions 0..n-1,
exactly where that sequence alone would hold them. Between two decode steps the thread frees the
rows whose consumer closed its stream, then admits waiting requests into free rows. A joining
prompt is prefilled alone, into a cache of its own, in chunks: each step first feeds up to
`step_tokens` prompt tokens of the rows still prefilling (oldest row first), so a long prompt
delays the others' next token by one chunk, not by its whole length. Once a prompt is in, its
first token is chosen from the last chunk's logits and its keys and values are copied into its
row; a prompt in one chunk is exactly the forward a one-stream generation runs (more chunks
differ from it by a matmul's rounding). Then one forward decodes every decoding row: each feeds its
last token at its own position (`position_ids`), writes its keys and values there, and attends to
its own positions 0..n only (a 4D mask made from the positions). So each sequence computes what
it computes alone; only a batched matmul's rounding may differ.

Why a cache of our own rather than transformers' `StaticCache`: its layers write every row at one
shared offset (`cumulative_length`), so sequences of different lengths would have to end just
before that slot (left-padded), a prompt longer than the slot would wait, and the batch would
have to drain or be compacted when the slot reaches the end of the cache. Writing each row at its
own position (`index_put_` at (row, position)) lets a sequence join whenever a row is free and
leave without moving the others. `SlotCache` subclasses transformers' `Cache` (its public
extension point) and keeps `StaticLayer`s as storage; only where keys and values go is its own.

Eager, a step runs the rows up to the highest one in use (a joiner takes the lowest free row) and
attends as far as the longest sequence; compiled, it runs all `slots` rows over the whole cache,
free rows (and rows still prefilling) masked: one shape, compiled once. The engine thread, the
joining and leaving and each consumer's own queue are `continuous.BatchLoop`'s; this module fills
in the join and the step.
Imports torch and transformers; knows nothing of serving.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Cache, DynamicCache, StaticLayer

from mahir.errors import RuntimeFailure, Unsupported
from mahir.generation import choose
from mahir.runtimes.continuous import BatchLoop, Request
from mahir.runtimes.torch_lm import CausalLM, compile_step, full_attention


@dataclass(eq=False)
class _Row:
    request: Request
    position: int = 0
    """Where the row writes its next token's keys and values."""
    alone: DynamicCache | None = None
    """While the prompt is prefilled in chunks: its own cache (None once it decodes)."""
    prefilled: int = 0
    """Prompt tokens in `alone` so far."""

    def advance(self, token: int) -> bool:
        """A step wrote at `position` and chose `token`: deliver it; whether the row ended."""
        self.position += 1
        return self.request.deliver(token)


class SlotCache(Cache):
    """`slots` rows of `length` positions per layer; each row written at its own position
    (`at`), and read up to `width` positions."""

    def __init__(self, layers: int, slots: int, length: int, device: torch.device) -> None:
        self.storage = [StaticLayer(length) for _ in range(layers)]
        """Transformers' static layers, holding (slots, heads, length, dim) keys and values."""
        super().__init__(layers=list(self.storage))
        self.slots = slots
        self.at = torch.zeros(slots, dtype=torch.long, device=device)
        """Where each row writes its next token's keys and values."""
        self.width = length
        """Positions a step attends over: the whole cache, or (eager) the longest row's."""

    def place(self, row: int, alone: Cache) -> None:
        """Copy a sequence prefilled alone into `row`, at positions 0..n-1."""
        for layer, source in zip(self.storage, alone.layers, strict=True):
            keys, values = _tensors(source)  # (1, heads, n, dim)
            if not layer.is_initialized:  # the model's own heads, dim and dtype
                layer.lazy_initialization(
                    keys.expand(self.slots, -1, -1, -1), values.expand(self.slots, -1, -1, -1)
                )
            all_keys, all_values = _tensors(layer)
            all_keys[row, :, : keys.shape[2]] = keys[0]
            all_values[row, :, : values.shape[2]] = values[0]

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step's keys and values (rows, heads, 1, dim), each row at its own `at`."""
        keys, values = _tensors(self.storage[layer_idx])
        rows = key_states.shape[0]
        index = torch.arange(rows, device=key_states.device)
        at = self.at[:rows]
        keys[index, :, at] = key_states[:, :, -1]
        values[index, :, at] = value_states[:, :, -1]
        return keys[:rows, :, : self.width], values[:rows, :, : self.width]

    @property
    def dtype(self) -> torch.dtype:
        return _tensors(self.storage[0])[0].dtype

    def mask(self, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """(rows, 1, 1, width) additive mask: each row sees its positions up to its `at`."""
        seen = torch.arange(self.width, device=self.at.device) <= self.at[:rows, None]
        blank = torch.zeros(seen.shape, dtype=dtype, device=self.at.device)
        return blank.masked_fill(~seen, torch.finfo(dtype).min)[:, None, None, :]


def attention_layers(config: Any) -> int:
    """The model's layers, refused unless all are full attention (not sliding windows, not
    linear attention): the slot cache keeps every position and one mask serves all layers."""
    layers = full_attention(config)
    if layers is None:
        raise Unsupported(
            "continuous batching needs full attention in every layer; this model has sliding "
            "or linear attention layers: use slots=1"
        )
    return layers


class ContinuousBatch(BatchLoop[_Row]):
    """An engine thread decoding up to `slots` sequences together (see the module's note)."""

    def __init__(
        self,
        lm: CausalLM,
        *,
        slots: int,
        length: int,
        compiled: bool,
        step_tokens: int = 256,
    ) -> None:
        super().__init__(slots, "mahir-batch")
        layers = attention_layers(lm.module.config)
        self._lm, self._compiled, self._step_tokens = lm, compiled, step_tokens
        self._cache = SlotCache(layers, slots, length, lm.where)
        self._ids = torch.zeros((slots, 1), dtype=torch.long, device=lm.where)
        """Each row's last token: the next step's input."""
        self._step = self._decode
        if compiled:
            self._step = compile_step(self._decode, lm.where)
        self._start()

    def request_of(self, row: _Row) -> Request:
        return row.request

    def engine_scope(self) -> contextlib.AbstractContextManager[object]:
        return torch.inference_mode()

    def join(self, request: Request, index: int) -> _Row | None:
        """Take the row; its prompt is prefilled in the steps that follow."""
        return _Row(request, alone=DynamicCache(config=self._lm.module.config))

    def release(self, index: int) -> None:
        """Nothing to drop: a joiner's prefill overwrites the row's positions it uses."""

    def step(self) -> None:
        """A chunk of the prompts still prefilling, then one decode step for every decoding
        row; each row's token delivered, ended rows freed."""
        self._prefill()
        decoding = {i: r for i, r in enumerate(self.rows) if r is not None and r.alone is None}
        if not decoding:
            return
        used = list(decoding)
        cache = self._cache
        rows = self.slots if self._compiled else used[-1] + 1
        positions = [decoding[i].position if i in decoding else 0 for i in range(self.slots)]
        cache.at.copy_(torch.tensor(positions, device=cache.at.device))
        if not self._compiled:
            cache.width = max(positions[index] for index in used) + 1
        torch.set_num_threads(self._lm.threads)
        try:
            logits = self._step(self._ids[:rows], cache)
            requests = [decoding[i].request if i in decoding else None for i in range(rows)]
            tokens, chosen = self._choose(logits, requests)
            self._ids[:rows, 0] = tokens
        except Exception as err:  # the engine's: every stream in the batch raises it
            self.fail(used, err)
            return
        self.settle(used, lambda index, row: row.advance(chosen[index]))

    def _prefill(self) -> None:
        """Up to `step_tokens` prompt tokens of the rows still prefilling, oldest first; a row
        whose prompt is in delivers its first token and moves into the slot cache."""
        budget = self._step_tokens
        prefilling = [
            (row.request.order, index, row, row.alone)
            for index, row in enumerate(self.rows)
            if row is not None and row.alone is not None
        ]
        for _, index, row, alone in sorted(prefilling, key=lambda entry: entry[0]):
            if budget <= 0:
                return
            prompt = row.request.prompt
            chunk = prompt[row.prefilled : row.prefilled + budget]
            try:
                logits = self._lm.prefill(chunk, alone)
                row.prefilled += len(chunk)
                budget -= len(chunk)
                if row.prefilled < len(prompt):
                    continue
                _, (token,) = self._choose(logits[None], [row.request])
            except Exception as err:  # the engine's: this request's stream raises it
                self.fail([index], err)
                continue
            if row.request.deliver(token):
                self.free(index)
                continue
            self._cache.place(index, alone)
            self._ids[index, 0] = token
            row.position, row.alone = len(prompt), None

    def _decode(self, ids: torch.Tensor, cache: SlotCache) -> torch.Tensor:
        """The decode step (what torch.compile compiles): (rows, vocab) logits."""
        rows = ids.shape[0]
        mask = cache.mask(rows, cache.dtype)
        positions = cache.at[:rows, None]
        return self._lm.forward(ids, cache, attention_mask=mask, position_ids=positions)[:, -1]

    def _choose(
        self, logits: torch.Tensor, requests: Sequence[Request | None]
    ) -> tuple[torch.Tensor, list[int]]:
        """Each row's next token, on the device and on the host: argmax on the device, then
        on the host the rows that sample or asked for log-probabilities (`Token`s)."""
        tokens = torch.argmax(logits, dim=-1)
        chosen: list[int] = tokens.tolist()
        for row, request in enumerate(requests):
            if request is None:
                continue
            sampling = request.sampling
            if not sampling.argmax_only:
                row_logits = logits[row].float().cpu().numpy()
                chosen[row] = choose(row_logits, sampling, request.rng)
                tokens[row] = chosen[row]
        return tokens, chosen


def _tensors(layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache layer's keys and values, once it holds any."""
    if layer.keys is None or layer.values is None:
        raise RuntimeFailure("a KV cache layer was read before anything was written to it")
    keys: torch.Tensor = layer.keys
    values: torch.Tensor = layer.values
    return keys, values
