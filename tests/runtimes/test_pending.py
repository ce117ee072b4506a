"""Queued batches (runtimes/pending.py): `overlapped` makes and queues the next batch before it
waits for the current one, keeps the order, and runs batches at once on a session that cannot
queue. Queueing on a real GPU (CUDA graphs) is checked in tests/runtimes/test_cuda.py."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from mahir.runtimes.pending import Done, overlapped, queues, submit
from mahir.types import CPU, Inputs, Outputs


@dataclass
class _Waiting:
    log: list[str]
    index: int
    outputs: Outputs

    def result(self) -> Outputs:
        self.log.append(f"wait {self.index}")
        return self.outputs


class Queueing:
    """A session that logs when each batch is queued and when it is waited for."""

    runtime = "fake"
    device = CPU
    queues = True

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def submit(self, inputs: Inputs) -> _Waiting:
        index = int(inputs["x"][0])
        self.log.append(f"submit {index}")
        return _Waiting(self.log, index, {"y": inputs["x"] + 1})

    def run(self, inputs: Inputs) -> Outputs:
        return self.submit(inputs).result()

    def describe(self) -> dict[str, str]:
        return {}


class Immediate:
    """A session that cannot queue: it runs each batch when asked."""

    runtime = "fake"
    device = CPU

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def run(self, inputs: Inputs) -> Outputs:
        self.log.append(f"run {int(inputs['x'][0])}")
        return {"y": inputs["x"] + 1}

    def describe(self) -> dict[str, str]:
        return {}


def _batches(log: list[str], count: int) -> Iterator[Inputs]:
    for index in range(count):
        log.append(f"make {index}")
        yield {"x": np.array([index])}


def test_the_next_batch_is_made_and_queued_before_the_current_one_is_waited_for() -> None:
    log: list[str] = []
    answers = [out["y"][0] for out in overlapped(Queueing(log), _batches(log, 3))]
    assert answers == [1, 2, 3]
    assert log == [
        "make 0", "submit 0",
        "make 1", "submit 1", "wait 0",
        "make 2", "submit 2", "wait 1",
        "wait 2",
    ]  # fmt: skip


def test_a_session_that_cannot_queue_runs_each_batch_when_it_is_submitted() -> None:
    log: list[str] = []
    session = Immediate(log)
    pending = submit(session, {"x": np.array([4])})
    assert isinstance(pending, Done)
    assert log == ["run 4"]
    assert not queues(session)
    assert queues(Queueing(log))
    assert pending.result()["y"][0] == 5
    assert [out["y"][0] for out in overlapped(session, _batches(log, 2))] == [1, 2]
    assert list(overlapped(session, iter([]))) == []
