"""Continuous batching for the PyTorch LLM engine: concurrent `stream` calls decoded as one batch,
each sequence joining and leaving it between decode steps.

The invariant: one engine thread owns the model and a KV cache preallocated for `slots`
sequences of `length` tokens; row r holds one sequence's keys and values at positions 0..n-1,
exactly where that sequence alone would hold them. Between two decode steps the thread frees the
rows whose consumer closed its stream, then admits waiting requests into free rows: each prompt
is prefilled alone (the forward a one-stream generation runs, so the first token is the same) and
its keys and values are copied into its row. Then one forward decodes every row: each feeds its
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
free rows masked: one shape, compiled once. Prefills run between steps, so a long prompt delays
the others' next token by its prefill. Tokens reach each consumer's thread through a queue of
its own. Imports torch and transformers; knows nothing of serving.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import Cache, DynamicCache, DynamicLayer, StaticLayer

from mahir.errors import RuntimeFailure, Unsupported, first_line
from mahir.generation import Sampling, choose
from mahir.runtimes.torch_lm import CausalLM

Item = int | BaseException | None
"""What reaches a consumer: a token, the engine's error, or None at the end."""


@dataclass(eq=False)
class _Request:
    prompt: list[int]
    sampling: Sampling
    rng: np.random.Generator
    tokens: queue.SimpleQueue[Item] = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    count: int = 0

    def deliver(self, token: int) -> bool:
        """Hand `token` to the consumer; whether the sequence has ended."""
        self.tokens.put(token)
        self.count += 1
        done = (
            token in self.sampling.stop_token_ids
            or self.count == self.sampling.max_new_tokens
            or self.cancelled.is_set()
        )
        if done:
            self.tokens.put(None)
        return done


@dataclass
class BatchStats:
    """What the batch has decoded so far (a physical number beside its tokens/s)."""

    steps: int = 0
    rows: int = 0
    """Sequences decoded, summed over steps: `rows / steps` is the mean batch."""
    most: int = 0
    """The most sequences one step decoded."""


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
    layers = DynamicCache(config=config).layers
    full = [isinstance(layer, DynamicLayer) and not layer.is_sliding for layer in layers]
    if not full or not all(full):
        raise Unsupported(
            "continuous batching needs full attention in every layer; this model has sliding "
            "or linear attention layers: use slots=1"
        )
    return len(layers)


class ContinuousBatch:
    """An engine thread decoding up to `slots` sequences together (see the module's note)."""

    def __init__(
        self, lm: CausalLM, *, slots: int, length: int, compiled: bool, mode: str | None = None
    ) -> None:
        layers = attention_layers(lm.module.config)
        self._lm, self._slots, self._compiled = lm, slots, compiled
        self._rows: list[_Request | None] = [None] * slots
        self._positions = [0] * slots
        """Where each row writes next (free rows: 0, attending to that one position)."""
        self._cache = SlotCache(layers, slots, length, lm.where)
        self._ids = torch.zeros((slots, 1), dtype=torch.long, device=lm.where)
        """Each row's last token: the next step's input."""
        self._waiting: deque[_Request] = deque()
        self._wake = threading.Condition()
        self._stopped = False
        self.stats = BatchStats()
        self._step = self._decode
        if compiled:
            self._step = torch.compile(self._decode, fullgraph=True, dynamic=False, mode=mode)
        self._thread = threading.Thread(target=self._run, name="mahir-batch", daemon=True)
        self._thread.start()

    def stream(self, prompt: Sequence[int], sampling: Sampling) -> Iterator[int]:
        """`prompt`'s tokens as they are chosen; joins the batch at the first `next`, and
        closing the iterator frees its row at the next step."""
        request = self._submit(prompt, sampling, np.random.default_rng(sampling.seed))
        try:
            yield from _received(request)
        finally:
            request.cancelled.set()

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> list[list[int]]:
        """All prompts at once, each with a generator spawned from `sampling.seed`."""
        seeds = np.random.SeedSequence(sampling.seed).spawn(len(prompts))
        requests = [
            self._submit(p, sampling, np.random.default_rng(s))
            for p, s in zip(prompts, seeds, strict=True)
        ]
        try:
            return [list(_received(request)) for request in requests]
        finally:
            for request in requests:
                request.cancelled.set()

    def stop(self) -> None:
        """End the engine thread; what is running or waiting fails."""
        with self._wake:
            self._stopped = True
            self._wake.notify()

    def _submit(
        self, prompt: Sequence[int], sampling: Sampling, rng: np.random.Generator
    ) -> _Request:
        request = _Request(list(prompt), sampling, rng)
        with self._wake:
            if self._stopped:
                raise RuntimeFailure("the generator was closed: open it again")
            self._waiting.append(request)
            self._wake.notify()
        return request

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while (joining := self._work()) is not None:
                    torch.set_num_threads(self._lm.threads)  # process-wide: others set it too
                    for request in joining:
                        self._join(request)
                    if any(self._rows):
                        self._decode_rows()
        finally:  # stopped, or broken: no consumer is left waiting for a token
            with self._wake:
                self._stopped = True
            closed = RuntimeFailure("the generator was closed")
            for request in [*self._waiting, *filter(None, self._rows)]:
                request.tokens.put(closed)

    def _work(self) -> list[_Request] | None:
        """Wait for something to do; the requests that join now (None: stop)."""
        for row, request in enumerate(self._rows):
            if request is not None and request.cancelled.is_set():
                self._free(row)
        with self._wake:
            while not (self._stopped or self._waiting or any(self._rows)):
                self._wake.wait()
            if self._stopped:
                return None
            joining = min(self._rows.count(None), len(self._waiting))
            return [self._waiting.popleft() for _ in range(joining)]

    def _join(self, request: _Request) -> None:
        """Prefill alone, deliver the first token, and take a row unless that was the last."""
        if request.cancelled.is_set():
            request.tokens.put(None)
            return
        alone = DynamicCache(config=self._lm.module.config)
        try:
            logits = self._lm.prefill(request.prompt, alone)
            (token,) = self._choose(logits[None], [request]).tolist()
            if request.deliver(token):
                return
            row = self._rows.index(None)
            self._cache.place(row, alone)
        except Exception as err:  # the engine's: this request's stream raises it
            request.tokens.put(err)
            return
        self._rows[row], self._positions[row] = request, len(request.prompt)
        self._ids[row, 0] = token

    def _decode_rows(self) -> None:
        """One step for every row in use; each row's token delivered, ended rows freed."""
        cache = self._cache
        used = [row for row, request in enumerate(self._rows) if request is not None]
        rows = self._slots if self._compiled else used[-1] + 1
        cache.at.copy_(torch.tensor(self._positions, device=cache.at.device))
        if not self._compiled:
            cache.width = max(self._positions[row] for row in used) + 1
        try:
            if self._compiled and self._lm.where.type == "cuda":
                # A CUDA graph's outputs live until the next replay: the last step's logits
                # have been read (their tokens are this step's input).
                torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]
            logits = self._step(self._ids[:rows], cache)
            tokens = self._choose(logits, self._rows[:rows])
            self._ids[:rows, 0] = tokens
            chosen = tokens.tolist()
        except Exception as err:  # the engine's: every stream in the batch raises it
            for row in used:
                self._rows[row].tokens.put(err)  # type: ignore[union-attr]
                self._free(row)
            return
        self.stats.steps += 1
        self.stats.rows += len(used)
        self.stats.most = max(self.stats.most, len(used))
        for row in used:
            self._positions[row] += 1
            if self._rows[row].deliver(chosen[row]):  # type: ignore[union-attr]
                self._free(row)

    def _decode(self, ids: torch.Tensor, cache: SlotCache) -> torch.Tensor:
        """The decode step (what torch.compile compiles): (rows, vocab) logits."""
        rows = ids.shape[0]
        mask = cache.mask(rows, cache.dtype)
        positions = cache.at[:rows, None]
        return self._lm.forward(ids, cache, attention_mask=mask, position_ids=positions)[:, -1]

    def _choose(self, logits: torch.Tensor, requests: Sequence[_Request | None]) -> torch.Tensor:
        """Each row's next token: argmax on the device, then the sampled rows' own draws."""
        tokens = torch.argmax(logits, dim=-1)
        for row, request in enumerate(requests):
            if request is not None and not request.sampling.greedy:
                row_logits = logits[row].float().cpu().numpy()
                tokens[row] = choose(row_logits, request.sampling, request.rng)
        return tokens

    def _free(self, row: int) -> None:
        self._rows[row], self._positions[row] = None, 0


def _received(request: _Request) -> Iterator[int]:
    while (item := request.tokens.get()) is not None:
        if isinstance(item, BaseException):
            raise RuntimeFailure(f"the batched generation failed: {first_line(item)}") from item
        yield item


def _tensors(layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache layer's keys and values, once it holds any."""
    if layer.keys is None or layer.values is None:
        raise RuntimeFailure("a KV cache layer was read before anything was written to it")
    keys: torch.Tensor = layer.keys
    values: torch.Tensor = layer.values
    return keys, values
