"""Continuous batching's engine thread, for any engine that decodes many sequences in one step:
concurrent `stream` calls become rows of one batch, each joining and leaving between steps.

The invariant: one thread owns the engine's state (a KV cache of `slots` rows); every other
thread only queues requests and reads tokens. Between two steps the thread frees the rows whose
consumer closed its stream, then lets waiting requests join free rows, then runs one step over
every row in use; each row's token goes to its own consumer's queue, and a row that reached a
stop token or its `max_new_tokens` leaves. An engine's error fails the requests it touched and
no others; a stopped loop fails what is running or waiting, so no consumer waits forever.

How a request joins (prefilled alone, or its prompt fed in chunks beside the others' decode
tokens) and how a step runs belong to the engine: `ContinuousBatch` in `torch_batching.py`,
`LlamaCppBatch` in `llamacpp_batching.py`. Knows numpy and threads; no framework.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

from mahir.errors import RuntimeFailure, first_line
from mahir.generation import Sampling


@dataclass(eq=False)
class Request:
    """One stream's prompt and sampling, and the queue its tokens reach its consumer through."""

    prompt: list[int]
    sampling: Sampling
    rng: np.random.Generator
    tokens: queue.SimpleQueue[int | BaseException | None] = field(default_factory=queue.SimpleQueue)
    """Each token, the exception that stopped the stream, then None (`generation.Item`, less the
    prefix cache this batch does not keep)."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    count: int = 0
    order: int = 0
    """When it was submitted: engines that prefill in chunks feed the oldest prompt first."""

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

    def count(self, rows: int) -> None:
        self.steps += 1
        self.rows += rows
        self.most = max(self.most, rows)


Row = TypeVar("Row")
"""What an engine keeps per row in use (the request, with its position or prompt left)."""


class BatchLoop(ABC, Generic[Row]):
    """An engine thread running up to `slots` sequences together (see the module's note).
    Subclasses make a row of a joining request, run one step over the rows in use, and free a
    row's state; they start the thread (`_start`) once their engine is ready."""

    def __init__(self, slots: int, name: str) -> None:
        self.slots = slots
        self.rows: list[Row | None] = [None] * slots
        self.stats = BatchStats()
        self._waiting: deque[Request] = deque()
        self._submitted = itertools.count()
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @abstractmethod
    def request_of(self, row: Row) -> Request:
        """The request a row serves."""

    @abstractmethod
    def join(self, request: Request, index: int) -> Row | None:
        """Take row `index` for `request` (None: it ended before needing one, answered or
        failed: the engine put its last item)."""

    @abstractmethod
    def step(self) -> None:
        """One step over the rows in use: deliver each row's token, `free` the ended ones."""

    @abstractmethod
    def release(self, index: int) -> None:
        """Drop what the engine holds for row `index` (its KV cache entries)."""

    def engine_scope(self) -> contextlib.AbstractContextManager[object]:
        """Held around the thread's whole life (torch: inference mode)."""
        return contextlib.nullcontext()

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

    def free(self, index: int) -> None:
        """Row `index` is free again (its sequence ended, failed or was closed)."""
        self.rows[index] = None
        self.release(index)

    def used(self) -> list[int]:
        return [index for index, row in enumerate(self.rows) if row is not None]

    def settle(self, indices: Sequence[int], ended: Callable[[int, Row], bool]) -> None:
        """After a step that ran these rows: each takes what the step gave it (`ended(index,
        row)` hands it over and says whether its sequence ended); the ended rows are freed."""
        self.stats.count(len(indices))
        for index in indices:
            row = self.rows[index]
            if row is not None and ended(index, row):
                self.free(index)

    def fail(self, indices: Sequence[int], err: BaseException) -> None:
        """The engine's error: each of these rows' streams raises it, and the rows are freed."""
        for index in indices:
            row = self.rows[index]
            if row is not None:
                self.request_of(row).tokens.put(err)
                self.free(index)

    def _start(self) -> None:
        self._thread.start()

    def _submit(
        self, prompt: Sequence[int], sampling: Sampling, rng: np.random.Generator
    ) -> Request:
        request = Request(list(prompt), sampling, rng, order=next(self._submitted))
        with self._wake:
            if self._stopped:
                raise RuntimeFailure("the generator was closed: open it again")
            self._waiting.append(request)
            self._wake.notify()
        return request

    def _run(self) -> None:
        try:
            with self.engine_scope():
                while (joining := self._work()) is not None:
                    for request in joining:
                        self._join(request)
                    if self.used():
                        self.step()
        finally:  # stopped, or broken: no consumer is left waiting for a token
            with self._wake:
                self._stopped = True
            closed = RuntimeFailure("the generator was closed")
            running = [self.request_of(row) for row in self.rows if row is not None]
            for request in [*self._waiting, *running]:
                request.tokens.put(closed)

    def _work(self) -> list[Request] | None:
        """Wait for something to do; the requests that join now (None: stop)."""
        for index, row in enumerate(self.rows):
            if row is not None and self.request_of(row).cancelled.is_set():
                self.free(index)
        with self._wake:
            while not (self._stopped or self._waiting or self.used()):
                self._wake.wait()
            if self._stopped:
                return None
            joining = min(self.rows.count(None), len(self._waiting))
            return [self._waiting.popleft() for _ in range(joining)]

    def _join(self, request: Request) -> None:
        if request.cancelled.is_set():
            request.tokens.put(None)
            return
        index = self.rows.index(None)
        try:
            row = self.join(request, index)
        except Exception as err:  # the engine's: this request's stream raises it
            request.tokens.put(err)
            self.release(index)
            return
        self.rows[index] = row


def _received(request: Request) -> Iterator[int]:
    while (item := request.tokens.get()) is not None:
        if isinstance(item, BaseException):
            raise RuntimeFailure(f"the batched generation failed: {first_line(item)}") from item
        yield item
