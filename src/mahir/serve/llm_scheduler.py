"""The LLM scheduler: owns the generator, decides which requests generate now and which wait.

The invariant: at most `slots` generations run at once (the engine's `max_concurrency`: what it
honestly runs together), each on its own worker thread, because engines block (an engine that
multiplexes its streams itself pushes their tokens instead: `generation.Pushing`); every other
admitted request waits in a FIFO, bounded at `max_waiting`, and takes the first slot that
frees. A request that finds the queue full is refused at once (`Overloaded`: 503), never queued
into a timeout. A pushed generation's slot frees at its end or its cancel; otherwise a slot is
freed only when its generation's thread has stopped: the stream ended, failed, or was
cancelled (a client that went away, a passed deadline), which the thread sees
after its next token and answers by closing the engine's iterator. Each request has one
deadline, from its arrival to its last token: waiting past it is `DeadlineExceeded` (504), and
a generation still running at it is cancelled and its stream raises the same. Tokens cross
from the thread to the event loop by `call_soon_threadsafe` into the request's own queue, so
the loop never blocks and each request receives exactly its own tokens.

Continuous batching proper (sequences joining a running batch between decode steps) belongs in
an engine with a preallocated KV cache (the PyTorch engine with `slots`:
`runtimes/torch_batching.py`); this scheduler then only sees a larger `slots`.
Knows the `Generator` contract; nothing of HTTP or text.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from mahir.errors import DeadlineExceeded, Overloaded, RuntimeFailure, first_line
from mahir.generation import Generator, Item, PromptCached, Pushing, Sampling


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_waiting: int = 1024
    """Requests waiting for a slot at most; one more is refused (503, retry later)."""
    timeout_s: float = 30.0
    """From arrival to the last token: a request waiting or generating past it gets 504."""

    def __post_init__(self) -> None:
        if self.max_waiting < 0 or self.timeout_s <= 0:
            raise ValueError("max_waiting must be >= 0 and timeout_s > 0")


@dataclass
class LlmObserver:
    """Hooks for metrics, called on the event loop with plain numbers."""

    counts: Callable[[int, int], None] = lambda running, waiting: None
    first_token: Callable[[float], None] = lambda seconds: None
    next_token: Callable[[float], None] = lambda seconds: None
    prompt_cached: Callable[[int], None] = lambda tokens: None


@dataclass
class TokenStream:
    """One request's tokens as they arrive, for `async for`; `cancel()` (on the event loop,
    idempotent) stops its generation at the next token."""

    deadline: float
    arrived: float
    observer: LlmObserver
    tokens: asyncio.Queue[Item] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Seen by a generation's thread after each token."""
    stopping: Callable[[], None] | None = None
    """Stops a pushing generator's generation and frees its slot (`Scheduler._push`)."""
    cached_tokens: int = 0
    """Prompt tokens the engine read from its prefix cache (`PromptCached`), known by the
    first token."""
    count: int = 0
    _last: float = 0.0

    def cancel(self) -> None:
        self.cancelled.set()
        if self.stopping is not None:
            self.stopping()

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> int:
        item = await self._next_item()
        while isinstance(item, PromptCached):  # once, before the first token
            self.cached_tokens = item.tokens
            self.observer.prompt_cached(item.tokens)
            item = await self._next_item()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise RuntimeFailure(f"generation failed: {first_line(item)}") from item
        now = time.monotonic()
        if self.count == 0:
            self.observer.first_token(now - self.arrived)
        else:
            self.observer.next_token(now - self._last)
        self.count, self._last = self.count + 1, now
        return item

    async def _next_item(self) -> Item:
        left = self.deadline - time.monotonic()
        try:
            return await asyncio.wait_for(self.tokens.get(), max(left, 0.0))
        except TimeoutError:
            self.cancel()
            raise DeadlineExceeded(
                f"generating past the request's deadline ({self.count} tokens)"
            ) from None


class Scheduler:
    """Runs a generator's streams, `slots` at once, the rest waiting in arrival order."""

    def __init__(
        self,
        generator: Generator,
        config: SchedulerConfig = SchedulerConfig(),
        observer: LlmObserver | None = None,
    ) -> None:
        self.generator, self.config = generator, config
        self.observer = observer or LlmObserver()
        self.slots = max(1, int(getattr(generator, "max_concurrency", 1)))
        self.running = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._executor = ThreadPoolExecutor(self.slots, thread_name_prefix="mahir-generate")
        self.closing = False

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def start(self, prompt: Sequence[int], sampling: Sampling) -> TokenStream:
        """Wait for a slot, then generate on a worker thread. The caller cancels the stream
        once done with it, whatever happened: the generation stops at its next token and the
        slot frees when its thread has stopped."""
        arrived = time.monotonic()
        stream = TokenStream(arrived + self.config.timeout_s, arrived, self.observer)
        await self._admit(stream.deadline)
        loop = asyncio.get_running_loop()
        if isinstance(self.generator, Pushing):
            self._push(self.generator, stream, prompt, sampling, loop)
            return stream

        def put(item: Item) -> None:
            loop.call_soon_threadsafe(stream.tokens.put_nowait, item)

        work = loop.run_in_executor(
            self._executor, _generate, self.generator, prompt, sampling, stream, put
        )
        work.add_done_callback(lambda _: self._release())
        return stream

    def _push(
        self,
        generator: Pushing,
        stream: TokenStream,
        prompt: Sequence[int],
        sampling: Sampling,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """A pushing generator's stream: its tokens go from the engine's thread straight into
        the stream's queue, and its slot frees at its end or at its cancel, whichever is first."""
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._release()

        def arrive(item: Item) -> None:
            stream.tokens.put_nowait(item)
            if item is None:
                release()

        def put(item: Item) -> None:
            loop.call_soon_threadsafe(arrive, item)

        try:
            stop = generator.start(prompt, sampling, put)
        except Exception as err:  # refused at the call: the stream raises it, as a thread's does
            arrive(err)
            arrive(None)
            return

        def stopping() -> None:
            stop()
            release()

        stream.stopping = stopping

    async def stop(self) -> None:
        """Refuse new requests and wait for running generations' threads (the server has
        drained its requests by then, so none is left waiting, and every pushed stream has
        ended or been cancelled)."""
        self.closing = True
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    async def _admit(self, deadline: float) -> None:
        if self.closing:
            raise Overloaded("the server is shutting down: retry on another replica")
        if self.running < self.slots and not self._waiting:
            self.running += 1
            self._counts()
            return
        if len(self._waiting) >= self.config.max_waiting:
            raise Overloaded(
                f"{self.running} generating and {len(self._waiting)} waiting, the most this "
                "server queues: retry shortly"
            )
        slot = asyncio.get_running_loop().create_future()
        self._waiting.append(slot)
        self._counts()
        try:
            await asyncio.wait({slot}, timeout=max(deadline - time.monotonic(), 0.0))
        except asyncio.CancelledError:  # the caller went away
            self._forfeit(slot)
            raise
        if not slot.done():
            self._forfeit(slot)
            raise DeadlineExceeded("waited past the request's deadline for a free slot")

    def _forfeit(self, slot: asyncio.Future[None]) -> None:
        """Give up a place in the queue, or the slot it was just handed."""
        if slot.done():
            self._release()
            return
        slot.cancel()
        self._waiting.remove(slot)
        self._counts()

    def _release(self) -> None:
        """A generation's thread stopped: its slot goes to the oldest waiting request."""
        if self._waiting:
            self._waiting.popleft().set_result(None)  # the slot changes hands: running stays
        else:
            self.running -= 1
        self._counts()

    def _counts(self) -> None:
        self.observer.counts(self.running, len(self._waiting))


def _generate(
    generator: Generator,
    prompt: Sequence[int],
    sampling: Sampling,
    stream: TokenStream,
    put: Callable[[Item], None],
) -> None:
    """On a worker thread: each token to the stream's queue until the end or a cancel."""
    tokens = None
    try:
        tokens = generator.stream(prompt, sampling)
        for token in tokens:
            put(token)
            if stream.cancelled.is_set():
                break
    except Exception as err:  # the engine's: the stream raises it, translated, on the loop
        put(err)
    finally:
        close = getattr(tokens, "close", None)
        if close is not None:
            close()
        put(None)
