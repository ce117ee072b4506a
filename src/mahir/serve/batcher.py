"""Dynamic batching: many small requests become few full batches, each answer back to its own
request.

The invariant: every admitted request is run exactly once, inside one batch, and gets back
exactly the rows that came from its own inputs, cut back to its own sequence length; what it
receives equals what it would get alone, within the artifact's fidelity (padding positions are
masked, so they change nothing). A batch always holds the oldest waiting request, so nothing
starves; the rest of the batch is filled with the requests closest to it in length, so a batch
holds similar lengths and little padding, up to `max_batch_size` items, `max_batch_tokens`
padded tokens and `max_padding` wasted tokens per real one. A batch starts when it is full or
when its oldest request has waited `max_delay_ms` (default 0: as soon as the worker is free).
Waiting pays only while company comes: once a wait ended with its request still alone, lone
requests start at once, until two or more are seen waiting together again; so a tuned delay
costs nothing at low load (a closed loop of one client never waits).
Inference runs on worker threads, off the event loop, while the next batch gathers: one by
default; `workers` batches at once where the session runs several (OpenVINO streams). The
queue is bounded in items, not requests: a request is admitted whole or not at all, and one that
does not fit now is refused at once (`Overloaded`), never queued into a timeout; one that could
never fit (more items than the queue holds, or a part with more rows than a batch) is refused as
`TooLarge`. A request whose client went away or whose deadline passed before its batch started
is dropped unrun, and so are the other parts of a request once one part failed.
A failed batch fails only the request that caused it: its requests are run again one by one.
After any failure the session is probed with known-good inputs before it serves again; while
the probe fails the batcher is not `healthy` and refuses batches (`Unavailable`).

Knows only `Session` and numpy arrays: nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from mahir.errors import DeadlineExceeded, Overloaded, TooLarge, Unavailable
from mahir.types import Outputs, Session

Inputs = dict[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class BatcherConfig:
    max_batch_size: int = 32
    """Items (rows) per batch at most."""
    max_batch_tokens: int = 8192
    """Padded tokens per batch at most (items x longest length), for text models."""
    max_delay_ms: float = 0.0
    """How long the oldest request may wait for others to join its batch. 0: start as soon as
    the worker is free; requests that arrive while a batch runs form the next one, so batches
    grow with load and a lone request waits for nobody."""
    max_padding: float = 0.5
    """Padded tokens a batch may compute beyond its real ones, as a share of them: a request
    that would push the batch past it waits for the next batch, among closer lengths."""
    max_queue: int = 1024
    """Items waiting at most: a request that would pass it is refused (retry later), one that
    holds more items on its own is too large."""
    timeout_ms: float = 30_000.0
    """A request not started within this is answered with DeadlineExceeded."""
    group_by_length: bool = True
    """Fill batches with the requests closest in length to the oldest; False: arrival order."""
    workers: int = 1
    """Batches running at once, each on its own thread: for a session that runs several
    (`Runtime.concurrent`), e.g. OpenVINO with that many streams."""

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


@dataclass
class BatchObserver:
    """Hooks for metrics: each is called with plain numbers, on the event loop."""

    queued: Callable[[int], None] = lambda depth: None
    batch: Callable[[int, int, float], None] = lambda items, tokens, seconds: None
    waited: Callable[[float], None] = lambda seconds: None


@dataclass
class Batcher:
    session: Session
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
        self._waiting_items = 0
        self.healthy = True
        """False while the session fails its probe after an error: readiness says so."""
        self._wakeup = asyncio.Event()
        workers = self.config.workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mahir-infer")
        self._free = asyncio.Semaphore(workers)
        self._running: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._alone = False
        """The last wait for company ended with its request alone: lone ones start at once."""

    @property
    def depth(self) -> int:
        """Items waiting."""
        return self._waiting_items

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
        self.observer.queued(self._waiting_items)
        self._wakeup.set()
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
            shape_key=_shape_key(inputs, self.sequence_inputs),
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
        if self._waiting_items + items > limit:
            raise Overloaded(
                f"{self._waiting_items} items waiting, {items} more would pass the limit of "
                f"{limit}: retry shortly"
            )

    async def _run(self) -> None:
        while self._waiting or not self._closing:
            if not self._waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            oldest = self._waiting[0]
            delay = oldest.arrived + self.config.max_delay_ms / 1000 - self.clock()
            full = self._waiting_items >= self.config.max_batch_size
            lone = len(self._waiting) == 1
            if not lone:
                self._alone = False
            if delay > 0 and not full and not self._closing and not (lone and self._alone):
                self._wakeup.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=delay)
                continue
            if self.config.max_delay_ms > 0 and lone:
                self._alone = True
            await self._free.acquire()  # a worker is free: the batch is taken now, not before
            batch = self._take_batch()
            if not batch:
                self._free.release()
                continue
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._free.release()

    def _take_batch(self) -> list[_Request]:
        """The oldest live request plus the closest in length that fit; drops dead ones."""
        now = self.clock()
        live = []
        for request in self._waiting:
            if request.future.done():  # the client went away
                continue
            if now > request.deadline:
                request.future.set_exception(DeadlineExceeded("waited past its timeout"))
                continue
            live.append(request)
        self._set_waiting(live)
        if not live:
            return []
        oldest = live[0]
        peers = [r for r in live[1:] if r.shape_key == oldest.shape_key]
        if self.config.group_by_length:
            peers.sort(key=lambda r: (abs(r.length - oldest.length), r.arrived))
        batch, items, longest = [oldest], oldest.items, oldest.length
        real = oldest.items * oldest.length
        for request in peers:
            new_items, new_longest = items + request.items, max(longest, request.length)
            new_real = real + request.items * request.length
            if new_items > self.config.max_batch_size:
                continue
            if new_items * new_longest > self.config.max_batch_tokens:
                continue
            if new_items * new_longest > new_real * (1 + self.config.max_padding):
                continue
            batch.append(request)
            items, longest, real = new_items, new_longest, new_real
        taken = {id(r) for r in batch}
        self._set_waiting([r for r in live if id(r) not in taken])
        return batch

    def _set_waiting(self, waiting: list[_Request]) -> None:
        self._waiting = waiting
        self._waiting_items = sum(r.items for r in waiting)
        self.observer.queued(self._waiting_items)

    async def _execute(self, batch: list[_Request]) -> None:
        started = self.clock()
        for request in batch:
            self.observer.waited(started - request.arrived)
        await self._answer(batch, started)

    async def _answer(self, batch: list[_Request], started: float) -> None:
        if not self.healthy and not await self._probe():
            for request in batch:
                _fail(request, Unavailable("the model failed its health check: retry shortly"))
            return
        merged, longest = _merge(batch, self.sequence_inputs)
        try:
            outputs = await self._infer(merged)
            parts = _split(outputs, batch, self.token_outputs)
        except Exception as err:  # one request's inputs, or the runtime: find out which
            alone = len(batch) == 1
            if alone:  # the culprit: it fails
                _fail(batch[0], err)
            await self._probe()
            if not alone:  # each again on its own, so only the culprit fails
                for request in batch:
                    if not request.future.done():
                        await self._answer([request], self.clock())
            return
        items = sum(r.items for r in batch)
        self.observer.batch(items, items * longest, self.clock() - started)
        for request, part in zip(batch, parts, strict=True):
            if not request.future.done():
                request.future.set_result(part)

    async def _infer(self, inputs: Inputs) -> Outputs:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.session.run, inputs)

    async def _probe(self) -> bool:
        """Whether the session answers the probe: a session that raised must be known good
        again before it serves (a runtime can stay broken after one bad input)."""
        if self.probe is not None:
            try:
                await self._infer(self.probe)
            except Exception:  # any failure means the same: not healthy
                self.healthy = False
                return False
        self.healthy = True
        return True


def _fail(request: _Request, err: BaseException) -> None:
    if not request.future.done():
        request.future.set_exception(err)


def _shape_key(inputs: Inputs, sequence_inputs: frozenset[str]) -> tuple[object, ...]:
    return tuple(
        (name, a.dtype.str, a.shape[2:] if name in sequence_inputs else a.shape[1:])
        for name, a in sorted(inputs.items())
    )


def _merge(batch: Sequence[_Request], sequence_inputs: frozenset[str]) -> tuple[Inputs, int]:
    """One input dict for the whole batch, sequence inputs zero-padded to the longest."""
    longest = max(r.length for r in batch)
    merged = {}
    for name in batch[0].inputs:
        parts = [r.inputs[name] for r in batch]
        if name in sequence_inputs:
            merged[name] = _stack_padded(parts, longest)
        else:
            merged[name] = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return merged, longest


def _stack_padded(parts: Sequence[np.ndarray], length: int) -> np.ndarray:
    """The parts one after another along axis 0, each zero-padded on axis 1 to `length`: one
    allocation and a copy per part (np.pad per part then concatenate was 8% of the event
    loop's time at concurrency 32)."""
    if len(parts) == 1 and parts[0].shape[1] == length:
        return parts[0]
    first = parts[0]
    out = np.zeros((sum(len(p) for p in parts), length, *first.shape[2:]), first.dtype)
    row = 0
    for part in parts:
        out[row : row + len(part), : part.shape[1]] = part
        row += len(part)
    return out


def _split(
    outputs: Outputs, batch: Sequence[_Request], token_outputs: frozenset[str]
) -> list[Outputs]:
    counts = [r.items for r in batch]
    if sum(counts) != len(next(iter(outputs.values()))):
        raise ValueError("the batch's outputs have a different number of rows than its inputs")
    parts, start = [], 0
    for request, count in zip(batch, counts, strict=True):
        part = {}
        for name, array in outputs.items():
            rows = array[start : start + count]
            part[name] = rows[:, : request.length] if name in token_outputs else rows
        parts.append(part)
        start += count
    return parts
