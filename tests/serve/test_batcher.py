"""The batcher against a recording fake session: one seam, the session, and real asyncio."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from mahir.errors import DeadlineExceeded, Overloaded, TooLarge, Unavailable
from mahir.serve.batcher import Batcher, BatcherConfig
from mahir.types import Inputs, Outputs


class FakeEncoder:
    """Token outputs = input ids * 2 at real positions (0 where masked), one row per item; each
    call is recorded with its input shape. `gate` holds calls until the test opens it."""

    runtime = "fake"

    def __init__(self, gate: Any = None, fail_on: int | None = None) -> None:
        self.calls: list[tuple[int, int]] = []
        self.started: list[tuple[int, int]] = []
        self.gate = gate
        self.fail_on = fail_on
        self.broken = False
        """Every call raises, as a runtime left in a bad state would."""

    def run(self, inputs: Inputs) -> Outputs:
        self.started.append(inputs["input_ids"].shape)
        if self.gate is not None:
            self.gate.wait(timeout=10)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        self.calls.append(ids.shape)
        if self.broken or (self.fail_on is not None and (ids == self.fail_on).any()):
            raise RuntimeError("poisoned input")
        tokens = (ids * 2 * mask)[..., None].astype(np.float32)
        return {"tokens": tokens, "pooled": tokens.sum(axis=1)}

    def describe(self) -> dict[str, Any]:
        return {}


def request(value: int, length: int, items: int = 1) -> Inputs:
    ids = np.full((items, length), value, np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def batcher(session: Any, probe: Inputs | None = None, **config: Any) -> Batcher:
    return Batcher(
        session,
        BatcherConfig(**config),
        sequence_inputs=frozenset({"input_ids", "attention_mask"}),
        token_outputs=frozenset({"tokens"}),
        probe=probe,
    )


async def until(condition: Any) -> None:
    """Yield to the loop (and the worker thread) until `condition()` holds; fail after 10 s."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never held")


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_every_request_gets_its_own_rows_cut_to_its_own_length() -> None:
    async def main() -> list[Outputs]:
        b = batcher(FakeEncoder(), max_batch_size=64, max_delay_ms=20)
        b.start()
        results = await asyncio.gather(
            *(b.submit(request(i, 3 + i % 7, 1 + i % 3)) for i in range(50))
        )
        await b.stop()
        return results

    for i, out in enumerate(run(main())):
        length, items = 3 + i % 7, 1 + i % 3
        assert out["tokens"].shape == (items, length, 1)
        assert (out["tokens"] == 2 * i).all()
        assert (out["pooled"] == 2 * i * length).all()  # padding contributed nothing


def test_requests_are_batched_up_to_the_item_and_token_caps() -> None:
    session = FakeEncoder()

    async def main() -> None:
        b = batcher(session, max_batch_size=8, max_batch_tokens=64, max_delay_ms=50)
        b.start()
        await asyncio.gather(*(b.submit(request(1, 10)) for _ in range(20)))
        await b.stop()

    run(main())
    assert sum(items for items, _ in session.calls) == 20
    assert all(items <= 6 and items * length <= 64 for items, length in session.calls)
    assert len(session.calls) < 20  # they were batched


def test_a_lone_client_stops_waiting_for_company_until_company_comes() -> None:
    session = FakeEncoder()
    waits: list[float] = []

    async def main() -> None:
        b = batcher(session, max_batch_size=8, max_delay_ms=300)
        b.observer.waited = waits.append
        b.start()
        for i in range(4):  # one client in a closed loop: nobody ever joins
            await b.submit(request(i, 5))
        together = [asyncio.ensure_future(b.submit(request(9, 5))) for _ in range(2)]
        await until(lambda: b.depth == 2)
        late = asyncio.ensure_future(b.submit(request(9, 5)))  # within the 300 ms wait
        await asyncio.gather(*together, late)
        await b.stop()

    run(main())
    assert waits[0] >= 0.29  # the first waited out the delay and stayed alone
    assert max(waits[1:4]) < 0.15  # the next lone ones started at once
    assert session.calls[4:] == [(3, 5)]  # with company the delay applies again


def test_similar_lengths_are_grouped_together() -> None:
    session = FakeEncoder()
    lengths = [5, 100, 6, 98, 7, 97, 5, 99]

    async def main() -> None:
        b = batcher(session, max_batch_size=4, max_delay_ms=50)
        b.start()
        await asyncio.gather(*(b.submit(request(1, n)) for n in lengths))
        await b.stop()

    run(main())
    assert sorted(session.calls) == [(4, 7), (4, 100)]  # not 4 x 100 twice


def test_a_full_queue_refuses_at_once() -> None:
    import threading

    gate = threading.Event()

    session = FakeEncoder(gate)

    async def main() -> tuple[list[Any], Batcher]:
        b = batcher(session, max_batch_size=1, max_queue=3, max_delay_ms=0)
        b.start()
        first = asyncio.create_task(b.submit(request(1, 4)))
        await until(lambda: len(session.started) == 1)  # the worker holds it in the session
        waiting = [asyncio.create_task(b.submit(request(1, 4))) for _ in range(3)]
        await until(lambda: b.depth == 3)
        with pytest.raises(Overloaded):
            await b.submit(request(1, 4))
        gate.set()
        done = await asyncio.gather(first, *waiting)
        await b.stop()
        return done, b

    done, _ = run(main())
    assert len(done) == 4


@pytest.mark.parametrize(
    ("max_batch_size", "calls"),
    [
        (1, [(1, 4), (1, 4), (1, 4)]),  # each alone: the failure is its own
        (8, [(3, 4), (1, 4), (1, 4), (1, 4)]),  # together, then each alone: only the culprit
    ],
)
def test_an_inference_error_fails_only_the_request_that_caused_it(
    max_batch_size: int, calls: list[tuple[int, int]]
) -> None:
    session = FakeEncoder(fail_on=13)

    async def main() -> list[Any]:
        b = batcher(session, max_batch_size=max_batch_size, max_delay_ms=50)
        b.start()
        results = await asyncio.gather(
            b.submit(request(1, 4)),
            b.submit(request(13, 4)),
            b.submit(request(2, 4)),
            return_exceptions=True,
        )
        await b.stop()
        return results

    ok1, failed, ok2 = run(main())
    assert isinstance(failed, RuntimeError)
    assert (ok1["tokens"] == 2).all()
    assert (ok2["tokens"] == 4).all()
    assert session.calls == calls


def test_a_request_past_its_deadline_is_not_run() -> None:
    import threading

    gate = threading.Event()
    session = FakeEncoder(gate)

    now = [0.0]

    async def main() -> Any:
        b = batcher(session, max_batch_size=1, max_delay_ms=0, timeout_ms=20)
        b.clock = lambda: now[0]
        b.start()
        first = asyncio.create_task(b.submit(request(1, 4)))
        await until(lambda: len(session.started) == 1)
        late = asyncio.create_task(b.submit(request(2, 4)))
        await until(lambda: b.depth == 1)
        now[0] += 0.021  # the second request's deadline passes while the first runs
        gate.set()
        results = await asyncio.gather(first, late, return_exceptions=True)
        await b.stop()
        return results

    _, late = run(main())
    assert isinstance(late, DeadlineExceeded)
    assert session.calls == [(1, 4)]


def test_stop_drains_what_was_admitted() -> None:
    async def main() -> list[Outputs]:
        b = batcher(FakeEncoder(), max_batch_size=4, max_delay_ms=10_000)
        b.start()
        pending = [asyncio.create_task(b.submit(request(i, 4))) for i in range(3)]
        await asyncio.sleep(0)
        await b.stop()  # does not wait out the 10 s delay
        with pytest.raises(Overloaded):
            await b.submit(request(9, 4))
        return await asyncio.gather(*pending)

    results = run(main())
    assert [int(r["tokens"][0, 0, 0]) for r in results] == [0, 2, 4]


def test_arrival_order_when_grouping_is_off() -> None:
    session = FakeEncoder()
    lengths = [5, 100, 6, 98, 7, 97, 5, 99]

    async def main() -> None:
        b = batcher(
            session,
            max_batch_size=4,
            max_delay_ms=50,
            group_by_length=False,
            max_padding=float("inf"),
        )
        b.start()
        await asyncio.gather(*(b.submit(request(1, n)) for n in lengths))
        await b.stop()

    run(main())
    assert session.calls == [(4, 100), (4, 99)]


@pytest.mark.parametrize(("max_padding", "calls"), [(0.5, [(1, 10), (1, 40)]), (2.0, [(2, 40)])])
def test_a_request_that_would_mostly_add_padding_waits_for_the_next_batch(
    max_padding: float, calls: list[tuple[int, int]]
) -> None:
    session = FakeEncoder()

    async def main() -> None:
        b = batcher(session, max_batch_size=4, max_delay_ms=50, max_padding=max_padding)
        b.start()
        await asyncio.gather(b.submit(request(1, 10)), b.submit(request(2, 40)))
        await b.stop()

    run(main())
    assert session.calls == calls  # 2 x 40 = 80 padded for 50 real tokens: 60% waste


def test_a_session_that_fails_its_probe_serves_nothing_until_it_passes() -> None:
    session = FakeEncoder()

    async def main() -> list[Any]:
        b = batcher(session, probe=request(7, 2), max_batch_size=8)
        b.start()
        assert b.healthy
        session.broken = True
        outcomes = await asyncio.gather(b.submit(request(1, 4)), return_exceptions=True)
        await until(lambda: not b.healthy)  # its probe failed (after its answer went out)
        outcomes += await asyncio.gather(b.submit(request(1, 4)), return_exceptions=True)
        assert not b.healthy
        session.broken = False
        outcomes.append(await b.submit(request(1, 4)))
        assert b.healthy
        await b.stop()
        return outcomes

    first, second, third = run(main())
    assert isinstance(first, RuntimeError)  # the request that met the failure
    assert isinstance(second, Unavailable)  # refused unrun: the probe still failed
    assert (third["tokens"] == 2).all()
    # run, probe | probe | probe passes, run
    assert session.calls == [(1, 4), (1, 2), (1, 2), (1, 2), (1, 4)]


def test_admission_counts_items_and_refuses_what_can_never_fit() -> None:
    import threading

    gate = threading.Event()
    session = FakeEncoder(gate)

    async def main() -> None:
        b = batcher(session, max_batch_size=4, max_queue=6, max_delay_ms=0)
        b.start()
        first = asyncio.create_task(b.submit(request(1, 4)))
        await until(lambda: len(session.started) == 1)  # the worker holds it in the session
        waiting = asyncio.create_task(b.submit(request(1, 4, items=4)))
        await until(lambda: b.depth == 4)
        with pytest.raises(Overloaded, match="4 items waiting, 3 more"):
            await b.submit_many([request(2, 4), request(2, 5, items=2)])
        assert b.depth == 4  # refused whole: none of its parts queued
        with pytest.raises(TooLarge, match="a batch holds 4"):
            await b.submit(request(3, 4, items=5))
        with pytest.raises(TooLarge, match="at most 6"):
            await b.submit_many([request(3, 4, items=4), request(3, 4, items=3)])
        last = asyncio.create_task(b.submit_many([request(5, 4), request(6, 4)]))  # fits: 6
        await until(lambda: b.depth == 6)
        gate.set()
        await asyncio.gather(first, waiting, last)
        await b.stop()

    run(main())
    assert session.calls == [(1, 4), (4, 4), (2, 4)]


def test_the_parts_of_a_request_left_waiting_are_dropped_once_one_fails() -> None:
    session = FakeEncoder(fail_on=13)

    async def main() -> None:
        b = batcher(session, max_batch_size=1, max_delay_ms=0)
        b.start()
        with pytest.raises(RuntimeError, match="poisoned"):
            await b.submit_many([request(1, 4), request(13, 4), *(request(2, 4) for _ in range(8))])
        await b.stop()

    run(main())
    assert len(session.calls) <= 3  # not the 10 parts


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_run_that_many_batches_at_once_and_each_answer_stays_its_own(
    workers: int,
) -> None:
    """Two held batches: with one worker the second waits for the first; with two both start.
    Every answer is still its own request's rows."""
    import threading

    async def main() -> tuple[int, list[Outputs]]:
        gate = threading.Event()
        session = FakeEncoder(gate)
        b = batcher(session, max_batch_size=1, workers=workers)
        b.start()
        first = asyncio.ensure_future(b.submit(request(1, 3)))
        await until(lambda: len(session.started) == 1)
        second = asyncio.ensure_future(b.submit(request(2, 5)))
        if workers == 2:
            await until(lambda: len(session.started) == 2)
        else:  # the second is queued behind the held first
            await until(lambda: b.depth == 1)
        started = len(session.started)
        gate.set()
        results = [await first, await second]
        await b.stop()
        return started, results

    started, results = run(main())
    assert started == workers
    assert results[0]["tokens"][0, :, 0].tolist() == [2, 2, 2]
    assert results[1]["tokens"][0, :, 0].tolist() == [4] * 5
