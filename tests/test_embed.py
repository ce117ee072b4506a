"""mahir.embed: every text's embedding in the caller's order, the next batches tokenized while
the current one runs, and a session that answers no embedding refused in one line."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np
import pytest

from mahir.embed import embed
from mahir.errors import BadInput
from mahir.pooling import EMBEDDING
from mahir.runtimes.pending import Done
from mahir.types import CPU, Inputs, Outputs


def encode(texts: Sequence[str]) -> Inputs:
    """Each text's length and first letter as its 'tokens'."""
    return {"x": np.array([[len(t), ord(t[0])] for t in texts], np.float32)}


class Doubling:
    """A session whose embedding is its input doubled; records the batch sizes it ran."""

    runtime = "fake"
    device = CPU

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def run(self, inputs: Inputs) -> Outputs:
        self.sizes.append(len(inputs["x"]))
        return {EMBEDDING: inputs["x"] * 2}

    def describe(self) -> dict[str, str]:
        return {}


def test_every_text_gets_its_own_embedding_in_order() -> None:
    texts = [w * (i % 7 + 1) for i, w in enumerate("abcdefghijklmnopqrstuvwxyz")]
    session = Doubling()
    got = embed(texts, session, encode, batch_size=4)
    np.testing.assert_array_equal(got, encode(texts)["x"] * 2)
    assert session.sizes == [4, 4, 4, 4, 4, 4, 2]
    assert embed([], session, encode).shape[0] == 0


def test_the_next_batch_is_tokenized_while_the_current_one_runs() -> None:
    second_started = threading.Event()
    calls: list[int] = []

    def watched(texts: Sequence[str]) -> Inputs:
        calls.append(len(texts))
        if len(calls) == 2:
            second_started.set()
        return encode(texts)

    class Waiting(Doubling):
        def run(self, inputs: Inputs) -> Outputs:
            if not self.sizes:  # the first batch holds on until the second is being tokenized
                assert second_started.wait(timeout=30)
            return super().run(inputs)

    texts = [f"text {i}" for i in range(10)]
    np.testing.assert_array_equal(embed(texts, Waiting(), watched, batch_size=3)[:, 0], 12)


def test_several_workers_tokenize_batches_at_once_and_keep_the_order() -> None:
    both_tokenizing = threading.Barrier(2, timeout=30)  # broken if one worker waits alone

    def meeting(texts: Sequence[str]) -> Inputs:
        if len(texts) == 3:  # the two full batches meet; the last, short one goes alone
            both_tokenizing.wait()
        return encode(texts)

    texts = [f"{'x' * i} {i}" for i in range(8)]
    got = embed(texts, Doubling(), meeting, batch_size=3, workers=2)
    np.testing.assert_array_equal(got, encode(texts)["x"] * 2)
    with pytest.raises(ValueError, match="workers must be >= 0"):
        embed(texts, Doubling(), encode, workers=-1)


def on_the_caller(events: list[str]) -> Callable[[Sequence[str]], Inputs]:
    """`encode` that logs "tokenize" and fails on any thread but the one that made it."""
    caller = threading.get_ident()

    def inline(texts: Sequence[str]) -> Inputs:
        assert threading.get_ident() == caller
        events.append("tokenize")
        return encode(texts)

    return inline


def test_no_worker_tokenizes_each_batch_on_the_calling_thread_just_before_it_runs() -> None:
    events: list[str] = []
    inline = on_the_caller(events)

    class Recording(Doubling):
        def run(self, inputs: Inputs) -> Outputs:
            events.append("run")
            return super().run(inputs)

    texts = [f"{'y' * i} {i}" for i in range(7)]
    got = embed(texts, Recording(), inline, batch_size=3, workers=0)
    np.testing.assert_array_equal(got, encode(texts)["x"] * 2)
    assert events == ["tokenize", "run"] * 3


def test_a_session_that_queues_gets_each_next_batch_tokenized_inline_before_it_waits() -> None:
    """The default for a queueing session (a CUDA-graph one): no tokenizing thread contends with
    the caller for the GIL, and the device computes one batch while the next is tokenized."""
    events: list[str] = []
    inline = on_the_caller(events)

    class Queued(Doubling):
        queues = True

        def submit(self, inputs: Inputs) -> Done:
            events.append("queue")
            return Waited(super().run(inputs))

    class Waited(Done):
        def result(self) -> Outputs:
            events.append("wait")
            return self.outputs

    texts = [f"{'z' * i} {i}" for i in range(7)]
    got = embed(texts, Queued(), inline, batch_size=3)
    np.testing.assert_array_equal(got, encode(texts)["x"] * 2)
    assert events == [
        "tokenize", "queue",
        "tokenize", "queue", "wait",
        "tokenize", "queue", "wait",
        "wait",
    ]  # fmt: skip


def test_a_session_without_an_embedding_is_refused_in_one_line() -> None:
    class Tokens(Doubling):
        def run(self, inputs: Inputs) -> Outputs:
            return {"last_hidden_state": inputs["x"]}

    with pytest.raises(BadInput, match="not sentence_embedding: embed a directory"):
        embed(["a", "b"], Tokens(), encode)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        embed(["a"], Doubling(), encode, batch_size=0)
