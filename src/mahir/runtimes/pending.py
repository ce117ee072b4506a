"""Batches queued on a device and waited for later (`mahir.types.Pending`).

A CUDA-graph session queues a batch's copy in, its replay and its copy out, and returns at once;
`result()` waits. Sessions that wrap another (packing, shape buckets) queue each of their inner
batches and finish the outputs when asked (`Joined`). `submit` queues on any session: one
that cannot queue runs the batch there and then (`Done`), so callers write one loop for both;
`overlapped` is that loop for a stream of batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from mahir.types import Inputs, Outputs, Pending, Queueing, Session


@dataclass(frozen=True, slots=True)
class Done:
    """A batch already run."""

    outputs: Outputs

    def result(self) -> Outputs:
        return self.outputs


@dataclass(frozen=True, slots=True)
class Joined:
    """Inner batches queued for one outer batch; `finish` makes the outer outputs of theirs."""

    parts: Sequence[Pending]
    finish: Callable[[list[Outputs]], Outputs]

    def result(self) -> Outputs:
        return self.finish([part.result() for part in self.parts])


def queues(session: Session) -> bool:
    """Whether `session` returns from `submit` before the batch is computed."""
    return isinstance(session, Queueing) and session.queues


def submitter(session: Session) -> Callable[[Inputs], Pending]:
    """`session.submit` where it has one (`mahir.types.Queueing`), else a call that runs the
    batch there and then. Found once for a caller that submits many batches: a check against
    a runtime protocol costs ~15 us, a sizeable share of a small batch on a CPU."""
    if isinstance(session, Queueing):
        return session.submit
    return lambda inputs: Done(session.run(inputs))


def submit(session: Session, inputs: Inputs) -> Pending:
    """Queue `inputs` on `session` where it can queue, else run them (`submitter`)."""
    return submitter(session)(inputs)


def overlapped(session: Session, batches: Iterable[Inputs]) -> Iterator[Outputs]:
    """Each batch's outputs in turn, the next batch made (tokenized, packed, copied in) and
    queued before this one is waited for: the device computes while the host prepares."""
    queue = submitter(session)
    waiting: Pending | None = None
    for batch in batches:
        queued = queue(batch)
        if waiting is not None:
            yield waiting.result()
        waiting = queued
    if waiting is not None:
        yield waiting.result()
