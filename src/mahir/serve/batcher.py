"""Dynamic batching: many small requests become few full batches, each answer back to its own
request.

The invariant: every admitted request is run exactly once, inside one batch, and gets back
exactly the rows that came from its own inputs, cut back to its own sequence length; what it
receives equals what it would get alone, within the artifact's fidelity (padding positions are
masked, so they change nothing). A batch always holds the oldest waiting request, so nothing
starves; the rest of the batch is filled with the requests closest to it in length, so a batch
holds similar lengths and little padding, up to `max_batch_size` items, `max_batch_tokens`
padded tokens and `max_padding` wasted tokens per real one (for a session that runs batches
without padding, `packed`, real tokens and no padding limit). A batch starts when it is full or
when its oldest request has waited `max_delay_ms` (default 0: as soon as the worker is free).
Waiting pays only while company comes: once a wait ended with its request still alone, lone
requests start at once, until two or more are seen waiting together again; so a tuned delay
costs nothing at low load (a closed loop of one client never waits).
Inference runs on worker threads, off the event loop, while the next batch gathers: one by
default; `workers` batches at once where the session runs several (OpenVINO streams; on a GPU,
one worker's batch computes while another's is packed and copied). A batch's
arrays are merged (padded, stacked) and split on threads too, never on the event loop. While
every worker is busy and the next batch is full (no waiting request could still join it), it is
taken ahead and merged on a thread of its own, so it starts the moment a worker frees, before
the finished batch's answers go out (on a GPU, the host's work overlaps the device's); a batch
that could still grow is taken only when a worker frees, so taking ahead never shrinks a batch
(a later request could not have joined it anyway). The queue is bounded in items, not
requests: a request is admitted whole or not at all, and one that does not fit now is refused
at once (`Overloaded`), never queued into a timeout; one that could never fit (more items than
the queue holds, or a part with more rows than a batch) is refused as `TooLarge`. A request
whose client went away or whose deadline passed before its batch started is dropped unrun
(from a batch taken ahead too: it is merged again without it), and so are the other parts of a
request once one part failed.
A failed batch fails only the request that caused it: its requests are run again one by one.
After any failure the session is probed with known-good inputs before it serves again; while
the probe fails the batcher is not `healthy` and refuses batches (`Unavailable`).

Knows only `Session` and numpy arrays (`merging.py` does the array work): nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from mahir.errors import DeadlineExceeded, Overloaded, TooLarge, Unavailable
from mahir.serve.merging import merge, shape_key, split
from mahir.types import Outputs, Session

Inputs = dict[str, np.ndarray]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class BatcherConfig:
    max_batch_size: int = 32
    """Items (rows) per batch at most."""
    max_batch_tokens: int = 8192
    """Tokens per batch at most, for text models: padded tokens (items x longest length); for
    a session that runs batches without padding (`packed = True` on the session), real tokens
    (the sum of the items' lengths)."""
    max_delay_ms: float = 0.0
    """How long the oldest request may wait for others to join its batch. 0: start as soon as
    the worker is free; requests that arrive while a batch runs form the next one, so batches
    grow with load and a lone request waits for nobody."""
    max_padding: float = 0.5
    """Padded tokens a batch may compute beyond its real ones, as a share of them: a request
    that would push the batch past it waits for the next batch, among closer lengths. No limit
    for a `packed` session: padding costs it nothing."""
    max_queue: int = 1024
    """Items waiting at most (a batch taken ahead still waits): a request that would pass it is
    refused (retry later), one that holds more items on its own is too large."""
    timeout_ms: float = 30_000.0
    """A request not started within this is answered with DeadlineExceeded."""
    group_by_length: bool = True
    """Fill batches with the requests closest in length to the oldest; False: arrival order."""
    workers: int = 1
    """Batches running at once, each on its own thread: for a session that runs several
    (`Runtime.concurrent_on`): OpenVINO with that many streams, a GPU session that queues one
    worker's batch while another's is prepared."""

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_batch_tokens", "max_queue", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_delay_ms < 0 or self.timeout_ms <= 0 or self.max_padding < 0:
            raise ValueError("max_delay_ms and max_padding must be >= 0, timeout_ms > 0")


@dataclass
class _Request:
    inputs: Inputs
    items: int
    length: int
    """Sequence length (1 for models without one)."""
    shape_key: tuple[object, ...]
    """Requests batch together only when their non-batch, non-sequence shapes match."""
    arrived: float
    future: asyncio.Future[Outputs]
    deadline: float


@dataclass(frozen=True, slots=True)
class _Ahead:
    """The next batch, taken while every worker was busy, its inputs merging on a thread."""

    batch: list[_Request]
    merged: Future[Inputs]
    items: int


@dataclass
class BatchObserver:
    """Hooks for metrics: each is called with plain numbers, on the event loop."""

    queued: Callable[[int], None] = lambda depth: None
    batch: Callable[[int, int, float], None] = lambda items, tokens, seconds: None
    waited: Callable[[float], None] = lambda seconds: None


@dataclass
class Batcher:
    session: Session
    """A session that declares `packed = True` runs a batch without its padding (it is sent the
    padded arrays and their attention mask, and drops the padding itself): its batches are
    budgeted in real tokens."""
    config: BatcherConfig = field(default_factory=BatcherConfig)
    sequence_inputs: frozenset[str] = frozenset()
    """Inputs whose axis 1 is the sequence: padded with 0 (the attention mask hides it)."""
    token_outputs: frozenset[str] = frozenset()
    """Outputs whose axis 1 is the sequence: cut back to each request's own length."""
    observer: BatchObserver = field(default_factory=BatchObserver)
    clock: Callable[[], float] = time.monotonic
    probe: Inputs | None = None
    """Inputs the session must answer to be trusted again after it raised; None: trusted."""

    def __post_init__(self) -> None:
        self._waiting: list[_Request] = []
        self._waiting_items = self._waiting_tokens = 0
        self._ahead: _Ahead | None = None
        self._retry_ahead = (0, 0)
        """Waiting items or tokens at which a batch is looked for ahead again."""
        self.healthy = True
        """False while the session fails its probe after an error: readiness says so."""
        self._wakeup = asyncio.Event()
        """Set when a request arrives and when a worker frees."""
        workers = self.config.workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mahir-infer")
        self._preparer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mahir-prepare")
        self._busy = 0
        self._running: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._alone = False
        """The last wait for company ended with its request alone: lone ones start at once."""
        self._packed = bool(getattr(self.session, "packed", False))

    @property
    def depth(self) -> int:
        """Items admitted and not started: waiting, or in the batch taken ahead."""
        return self._waiting_items + (self._ahead.items if self._ahead is not None else 0)

    @property
    def prepared(self) -> int:
        """Items in a batch taken ahead and merged, waiting only for a worker (0: none)."""
        ahead = self._ahead
        return ahead.items if ahead is not None and ahead.merged.done() else 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Refuse new requests, run every admitted one without waiting for company, stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        if self._running:
            await asyncio.gather(*self._running)
        self._executor.shutdown(wait=True)
        self._preparer.shutdown(wait=True)

    async def submit(self, inputs: Inputs) -> Outputs:
        """Queue one request (any number of rows) and wait for its own outputs."""
        return (await self.submit_many([inputs]))[0]

    async def submit_many(self, parts: Sequence[Inputs]) -> list[Outputs]:
        """Queue one request made of parts that may run in different batches (the texts of one
        embeddings request, each batched with others of its length): all admitted or none, and
        once one part fails or the caller goes away, the parts not yet started are dropped."""
        now = self.clock()
        loop = asyncio.get_running_loop()
        deadline = now + self.config.timeout_ms / 1000
        requests = [self._request(inputs, now, deadline, loop) for inputs in parts]
        self._admit(requests)
        self._waiting.extend(requests)
        self._waiting_items += sum(r.items for r in requests)
        self._waiting_tokens += sum(r.items * r.length for r in requests)
        self.observer.queued(self.depth)
        if self._busy < self.config.workers or (self._full() and self._may_take_ahead()):
            self._wakeup.set()  # the loop can act on it: start a batch, or take one ahead
        try:
            if len(requests) == 1:  # the common case, without gather's wrapper
                return [await requests[0].future]
            return list(await asyncio.gather(*(r.future for r in requests)))
        finally:
            for request in requests:  # a no-op for answered ones; the others are dropped unrun
                request.future.cancel()

    def _request(
        self, inputs: Inputs, now: float, deadline: float, loop: asyncio.AbstractEventLoop
    ) -> _Request:
        first = next(iter(inputs.values()))
        length = max((inputs[n].shape[1] for n in self.sequence_inputs if n in inputs), default=1)
        return _Request(
            inputs=inputs,
            items=int(first.shape[0]),
            length=int(length),
            shape_key=shape_key(inputs, self.sequence_inputs),
            arrived=now,
            future=loop.create_future(),
            deadline=deadline,
        )

    def _admit(self, requests: Sequence[_Request]) -> None:
        self.check_admission(sum(r.items for r in requests), max(r.items for r in requests))

    def check_admission(self, items: int, widest: int = 1) -> None:
        """Whether a request of `items` in all, `widest` in its largest part, would be admitted
        now: refuse what can never fit (TooLarge) before what does not fit now (Overloaded).
        Callers ask before costly preparation; `submit_many` asks again."""
        limit, rows = self.config.max_queue, self.config.max_batch_size
        if widest > rows:
            raise TooLarge(f"{widest} items in one input; a batch holds {rows}: split the request")
        if items > limit:
            raise TooLarge(f"{items} items in one request; at most {limit}: split the request")
        if self._closing:
            raise Overloaded("the server is shutting down: retry on another replica")
        if self.depth + items > limit:
            raise Overloaded(
                f"{self.depth} items waiting, {items} more would pass the limit of "
                f"{limit}: retry shortly"
            )

    async def _run(self) -> None:
        while self._waiting or self._ahead is not None or not self._closing:
            free = self._busy < self.config.workers
            if free and self._ahead is not None:
                self._start_ahead()
                continue
            if not self._waiting:
                await self._sleep()
                continue
            oldest = self._waiting[0]
            delay = oldest.arrived + self.config.max_delay_ms / 1000 - self.clock()
            full = self._full()
            lone = len(self._waiting) == 1
            if not lone:
                self._alone = False
            if delay > 0 and not full and not self._closing and not (lone and self._alone):
                await self._sleep(delay)
                continue
            if not free:  # every worker busy: take the next batch now only if it is full
                batch = self._take_batch(ahead=True) if full and self._may_take_ahead() else []
                if batch:
                    merged = self._preparer.submit(merge, batch, self.sequence_inputs)
                    self._ahead = _Ahead(batch, merged, sum(r.items for r in batch))
                    self.observer.queued(self.depth)
                else:
                    await self._sleep()  # until a worker frees or more requests arrive
                continue
            if self.config.max_delay_ms > 0 and lone:
                self._alone = True
            batch = self._take_batch()
            if batch:
                self._start(batch, None)

    async def _sleep(self, timeout: float | None = None) -> None:
        """Until a request arrives or a worker frees, or `timeout` seconds pass."""
        self._wakeup.clear()
        if timeout is None:
            await self._wakeup.wait()
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout=timeout)

    def _full(self) -> bool:
        """The queue holds at least a batch: waiting longer could not add to the next one."""
        config = self.config
        return (
            self._waiting_items >= config.max_batch_size
            or self._waiting_tokens >= config.max_batch_tokens
        )

    def _start(self, batch: list[_Request], merged: Future[Inputs] | None) -> None:
        self._busy += 1
        task = asyncio.get_running_loop().create_task(self._execute(batch, merged))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def _start_ahead(self) -> None:
        """The batch taken ahead holds the oldest requests: it goes first."""
        if self._ahead is not None:
            ahead, self._ahead = self._ahead, None
            self._start(ahead.batch, ahead.merged)
            self.observer.queued(self.depth)

    def _free_worker(self) -> None:
        """A worker is done with its batch: the batch taken ahead starts on it at once, before
        the finished batch's answers wake their clients (the device would otherwise wait for
        the event loop to get through them)."""
        self._busy -= 1
        self._start_ahead()
        self._wakeup.set()

    def _may_take_ahead(self) -> bool:
        """No batch is taken ahead yet, and enough arrived since one was found short to fill it."""
        items, tokens = self._retry_ahead
        return self._ahead is None and (
            self._waiting_items >= items or self._waiting_tokens >= tokens
        )

    def _take_batch(self, *, ahead: bool = False) -> list[_Request]:
        """The oldest live request plus the closest in length that fit; drops dead ones.
        `ahead`: only a full batch, one no request could still join (one that could is taken
        when a worker frees, from more requests); a batch found short is looked for again once
        as many items or tokens arrived as it lacked, so a busy queue is not sorted per arrival."""
        live = self._live(self._waiting, self.clock())
        self._set_waiting(live)
        if not live:
            return []
        oldest = live[0]
        peers = [r for r in live[1:] if r.shape_key == oldest.shape_key]
        if self.config.group_by_length:  # a stable sort: equally close ones by arrival
            peers.sort(key=lambda r: abs(r.length - oldest.length))
        batch, items, longest = [oldest], oldest.items, oldest.length
        real = oldest.items * oldest.length
        for request in peers:
            if self._full_batch(items, longest, real):  # none of the rest could join
                break
            new_items, new_longest = items + request.items, max(longest, request.length)
            new_real = real + request.items * request.length
            if new_items > self.config.max_batch_size:
                continue
            if self._tokens(new_items, new_longest, new_real) > self.config.max_batch_tokens:
                continue
            wasted = new_items * new_longest > new_real * (1 + self.config.max_padding)
            if wasted and not self._packed:
                continue
            batch.append(request)
            items, longest, real = new_items, new_longest, new_real
        if ahead and not self._full_batch(items, longest, real):
            lacking = self.config.max_batch_size - items
            room = self.config.max_batch_tokens - self._tokens(items, longest, real)
            self._retry_ahead = (self._waiting_items + lacking, self._waiting_tokens + room)
            return []
        self._retry_ahead = (0, 0)
        taken = {id(r) for r in batch}
        self._set_waiting([r for r in live if id(r) not in taken])
        return batch

    def _full_batch(self, items: int, longest: int, real: int) -> bool:
        """No request could join: the rows are taken, or even one of the batch's longest
        length (one token, packed) would pass the token budget."""
        least = 1 if self._packed else longest
        return (
            items >= self.config.max_batch_size
            or self._tokens(items + 1, longest, real + least) > self.config.max_batch_tokens
        )

    def _tokens(self, items: int, longest: int, real: int) -> int:
        """The tokens a batch costs the session: real ones if it packs, else padded ones."""
        return real if self._packed else items * longest

    def _live(self, requests: Sequence[_Request], now: float) -> list[_Request]:
        """The requests still to run: drops those whose client went away, fails late ones."""
        live = []
        for request in requests:
            if request.future.done():  # the client went away
                continue
            if now > request.deadline:
                request.future.set_exception(DeadlineExceeded("waited past its timeout"))
                continue
            live.append(request)
        return live

    def _set_waiting(self, waiting: list[_Request]) -> None:
        self._waiting = waiting
        self._waiting_items = sum(r.items for r in waiting)
        self._waiting_tokens = sum(r.items * r.length for r in waiting)
        self.observer.queued(self.depth)

    async def _execute(self, batch: list[_Request], merged: Future[Inputs] | None) -> None:
        started = self.clock()
        if merged is not None:  # taken ahead: who left or ran out of time since is dropped now
            live = self._live(batch, started)
            if len(live) < len(batch):
                batch, merged = live, None  # merged again, without them
        for request in batch:
            self.observer.waited(started - request.arrived)
        try:
            answers = await self._outputs(batch, started, merged) if batch else []
        finally:
            self._free_worker()
        for request, part in answers:
            if not request.future.done():
                request.future.set_result(part)

    async def _outputs(
        self, batch: list[_Request], started: float, merged: Future[Inputs] | None = None
    ) -> list[tuple[_Request, Outputs]]:
        """Each request's own outputs, from one run of the batch; if it fails, from each run
        again alone, so only the request that caused it fails (its future gets the error)."""
        if not self.healthy and not await self._probe():
            for request in batch:
                _fail(request, Unavailable("the model failed its health check: retry shortly"))
            return []
        try:
            parts = await self._on_worker(functools.partial(self._run_batch, batch, merged))
        except Exception as err:  # one request's inputs, or the runtime: find out which
            alone = len(batch) == 1
            if alone:  # the culprit: it fails
                _fail(batch[0], err)
            await self._probe()
            if alone:
                return []
            answers = []
            for request in batch:  # each again on its own, so only the culprit fails
                if not request.future.done():
                    answers += await self._outputs([request], self.clock())
            return answers
        items = sum(r.items for r in batch)
        longest, real = max(r.length for r in batch), sum(r.items * r.length for r in batch)
        self.observer.batch(items, self._tokens(items, longest, real), self.clock() - started)
        return list(zip(batch, parts, strict=True))

    def _run_batch(self, batch: list[_Request], merged: Future[Inputs] | None) -> list[Outputs]:
        """On a worker thread: the batch's inputs (merged ahead, or now), one run, each
        request's own rows."""
        inputs = merge(batch, self.sequence_inputs) if merged is None else merged.result()
        return split(self.session.run(inputs), batch, self.token_outputs)

    async def _on_worker(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def _probe(self) -> bool:
        """Whether the session answers the probe: a session that raised must be known good
        again before it serves (a runtime can stay broken after one bad input)."""
        if self.probe is not None:
            try:
                await self._on_worker(functools.partial(self.session.run, self.probe))
            except Exception:  # any failure means the same: not healthy
                self.healthy = False
                return False
        self.healthy = True
        return True


def _fail(request: _Request, err: BaseException) -> None:
    if not request.future.done():
        request.future.set_exception(err)
