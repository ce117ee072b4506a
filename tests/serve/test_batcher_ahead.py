"""The batch taken ahead (merged on a thread while every worker is busy) keeps the batcher's
invariants, and a packed session's batches are budgeted in real tokens: the same seam as
test_batcher.py, a recording fake session held on an Event, and real asyncio."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from mahir.errors import DeadlineExceeded
from mahir.serve.batcher import Batcher
from mahir.types import Outputs
from tests.serve.test_batcher import FakeEncoder, batcher, request, run, until


class PackedEncoder(FakeEncoder):
    """Declares that it runs batches without their padding."""

    packed = True


def tokens_of(out: Outputs) -> list[float]:
    return [float(x) for x in out["tokens"][0, :, 0]]


async def held(
    b: Batcher, session: FakeEncoder, workers: int, depths: list[int] | None = None
) -> list[asyncio.Future[Outputs]]:
    """`workers` lone batches started and held in the session (lengths 3, 4, ...); each client
    notes in `depths` what the batcher holds waiting the moment its answer reaches it."""

    async def client(length: int) -> Outputs:
        out = await b.submit(request(1, length))
        if depths is not None:
            depths.append(b.depth)
        return out

    running = []
    for i in range(workers):
        running.append(asyncio.ensure_future(client(3 + i)))
        await until(lambda count=i + 1: len(session.started) == count)
    return running


@pytest.mark.parametrize("workers", [1, 2])
def test_the_next_batch_is_merged_while_every_worker_is_busy(workers: int) -> None:
    gate = threading.Event()
    session = FakeEncoder(gate)
    depths: list[int] = []

    async def main() -> list[Outputs]:
        b = batcher(session, max_batch_size=2, workers=workers)
        b.start()
        running = await held(b, session, workers, depths)
        second = asyncio.ensure_future(b.submit(request(2, 4)))
        for _ in range(20):  # turns of the loop: a batch that could still grow is not taken
            await asyncio.sleep(0)
        assert b.prepared == 0
        third = asyncio.ensure_future(b.submit(request(3, 6)))
        await until(lambda: b.prepared == 2)  # full: taken and merged, its worker still busy
        assert len(session.started) == workers
        assert b.depth == 2  # still waiting: it counts against the queue
        assert any(t.name.startswith("mahir-prepare") for t in threading.enumerate())
        gate.set()
        results = await asyncio.gather(*running, second, third)
        await b.stop()
        return results

    *first, second, third = run(main())
    assert depths[0] == 0  # it started on the freed worker before the answer reached its client
    assert [tokens_of(out) for out in first] == [[2.0] * (3 + i) for i in range(workers)]
    assert tokens_of(second) == [4.0] * 4  # each its own rows, cut to its own length
    assert tokens_of(third) == [6.0] * 6
    held_calls = [(1, 3 + i) for i in range(workers)]
    assert sorted(session.calls) == sorted([*held_calls, (2, 6)])  # the two together, as merged


def test_a_batch_that_could_still_grow_is_not_taken_ahead() -> None:
    """Two waiting fill a batch's rows, but 4 beside 40 tokens is mostly padding: the batch
    found is one short, so it waits for a worker, or for a third that fills it."""
    gate = threading.Event()
    session = FakeEncoder(gate)

    async def main() -> list[Outputs]:
        b = batcher(session, max_batch_size=2, max_padding=0.5)
        b.start()
        (first,) = await held(b, session, 1)
        waiting = [asyncio.ensure_future(b.submit(request(v, n))) for v, n in ((2, 4), (3, 40))]
        await until(lambda: b.depth == 2)
        for _ in range(20):  # turns of the loop: nothing is taken
            await asyncio.sleep(0)
        assert b.prepared == 0
        waiting.append(asyncio.ensure_future(b.submit(request(4, 4))))
        await until(lambda: b.prepared == 2)  # 4 beside 4: full
        gate.set()
        results = await asyncio.gather(first, *waiting)
        await b.stop()
        return results

    _, *results = run(main())
    assert [tokens_of(r) for r in results] == [[4.0] * 4, [6.0] * 40, [8.0] * 4]
    assert session.calls == [(1, 3), (2, 4), (1, 40)]


@pytest.mark.parametrize("leaves", ["client goes away", "deadline passes"])
def test_a_request_that_leaves_a_batch_taken_ahead_is_dropped_unrun(leaves: str) -> None:
    gate = threading.Event()
    session = FakeEncoder(gate)
    now = [0.0]

    async def main() -> list[Any]:
        b = batcher(session, max_batch_size=2, timeout_ms=1_000)
        b.clock = lambda: now[0]
        b.start()
        (first,) = await held(b, session, 1)
        gone = asyncio.ensure_future(b.submit(request(2, 4)))
        await until(lambda: b.depth == 1)  # queued at 0 s: its deadline is 1 s
        now[0] = 0.5
        stays = asyncio.ensure_future(b.submit(request(3, 6)))  # its deadline: 1.5 s
        await until(lambda: b.prepared == 2)  # both taken ahead in time
        if leaves == "client goes away":
            gone.cancel()
            await until(gone.done)
        else:
            now[0] = 1.2  # past the first's deadline, within the second's
        gate.set()
        results = await asyncio.gather(first, gone, stays, return_exceptions=True)
        await b.stop()
        return results

    _, gone, stays = run(main())
    wanted = asyncio.CancelledError if leaves == "client goes away" else DeadlineExceeded
    assert isinstance(gone, wanted)
    assert tokens_of(stays) == [6.0] * 6
    assert session.calls == [(1, 3), (1, 6)]  # merged again without it; it never ran


@pytest.mark.parametrize(
    ("values", "calls"),
    [
        # the running batch fails: probe, each alone, probe again; then the batch taken ahead
        ((1, 13, 4, 5), [(2, 3), (1, 2), (1, 3), (1, 3), (1, 2), (2, 4)]),
        # the batch taken ahead fails: its merged inputs ran, then probe, each alone (the
        # culprit first, another probe after it)
        ((1, 2, 13, 5), [(2, 3), (2, 4), (1, 2), (1, 4), (1, 2), (1, 4)]),
    ],
)
def test_a_failure_fails_only_its_request_around_a_batch_taken_ahead(
    values: tuple[int, ...], calls: list[tuple[int, int]]
) -> None:
    """Four requests: two run (length 3) while two are taken ahead (length 4); 13 poisons."""
    gate = threading.Event()
    session = FakeEncoder(gate, fail_on=13)

    async def main() -> tuple[list[Any], bool]:
        b = batcher(session, probe=request(7, 2), max_batch_size=2)
        b.start()
        running = [asyncio.ensure_future(b.submit(request(v, 3))) for v in values[:2]]
        await until(lambda: len(session.started) == 1)
        ahead = [asyncio.ensure_future(b.submit(request(v, 4))) for v in values[2:]]
        await until(lambda: b.prepared == 2)
        gate.set()
        results = await asyncio.gather(*running, *ahead, return_exceptions=True)
        await b.stop()
        return results, b.healthy

    results, healthy = run(main())
    for result, value, length in zip(results, values, (3, 3, 4, 4), strict=True):
        if value == 13:
            assert isinstance(result, RuntimeError)
        else:
            assert tokens_of(result) == [2.0 * value] * length
    assert session.calls == calls
    assert healthy  # the probe passed after each failure


@pytest.mark.parametrize(
    ("kind", "calls", "tokens"),
    [
        # padded: 2 x 60 = 120 > 100 tokens, and 4 next to 60 is mostly padding
        (FakeEncoder, [(1, 60), (3, 4), (1, 60)], [60, 12, 60]),
        # packed: 60 + 3 x 4 = 72 real tokens fit, padding costs nothing; 60 more would not fit
        (PackedEncoder, [(4, 60), (1, 60)], [72, 60]),
    ],
)
def test_a_packed_sessions_batches_count_real_tokens_and_ignore_padding(
    kind: type[FakeEncoder], calls: list[tuple[int, int]], tokens: list[int]
) -> None:
    session = kind()
    lengths = [60, 4, 4, 4, 60]
    counted: list[int] = []

    async def main() -> list[Outputs]:
        b = batcher(session, max_batch_size=8, max_batch_tokens=100, max_padding=0.5)
        b.observer.batch = lambda items, tokens, seconds: counted.append(tokens)
        b.start()
        results = await asyncio.gather(*(b.submit(request(i, n)) for i, n in enumerate(lengths)))
        await b.stop()
        return results

    results = run(main())
    assert session.calls == calls
    assert counted == tokens
    for i, (out, n) in enumerate(zip(results, lengths, strict=True)):
        assert tokens_of(out) == [2.0 * i] * n
