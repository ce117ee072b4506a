"""Continuous batching for the llama.cpp engine: concurrent streams decoded as one llama.cpp
batch, each prompt fed in chunks beside the others' decode tokens.

The invariant: one llama.cpp context holds `slots` sequences, each with a KV cache of its own
(`n_seq_max` = slots, not unified, so a sequence attends only to its own cells); row r is
sequence id r, and its cells hold positions 0..n-1 exactly where the one-sequence engine puts
them. A step is one `llama_decode` of one batch: first each decoding row's last token, then the
prompt tokens of rows still prefilling, in the order they joined, until the step holds
`step_tokens` tokens. A row's last token in the batch asks for logits only when it is the last
of its prompt or a decode token, so each sequence's next token comes from exactly the logits it
would get alone (up to the rounding a batched matmul may change). A row that leaves has its
cells removed (`llama_memory_seq_rm`), so a joiner starts from an empty sequence.

Why chunks: a prompt prefilled alone between steps stalls every other stream for its whole
prefill; fed in chunks, a long prompt adds at most `step_tokens` to any step, and its matmuls
share the weight reads of the decode tokens beside it (what vLLM calls chunked prefill).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np

from mahir.errors import RuntimeFailure
from mahir.generation import choose
from mahir.runtimes.continuous import BatchLoop, Request


@dataclass(eq=False)
class _Row:
    request: Request
    fed: int = 0
    """Tokens of this sequence in the KV cache: the prompt's fed so far, then the generated."""
    last: int = -1
    """The token chosen last, fed at position `fed` by the next step (-1: still prefilling)."""


class LlamaCppBatch(BatchLoop[_Row]):
    """An engine thread decoding up to `slots` sequences in `context` (a llama.cpp context made
    with `n_seq_max` = slots and a batch of `step_tokens`; see the module's note) through
    `batch` (a `llama_batch` of that many tokens). Both stay the caller's to free, after
    `stop_and_wait`."""

    def __init__(
        self, context: Any, batch: Any, *, slots: int, step_tokens: int, vocab: int
    ) -> None:
        super().__init__(slots, "mahir-llama-batch")
        self.context, self.batch = context, batch
        self._vocab, self._step_tokens = vocab, step_tokens
        self._tokens = np.ctypeslib.as_array(batch.token, shape=(step_tokens,))
        self._positions = np.ctypeslib.as_array(batch.pos, shape=(step_tokens,))
        self._wants = np.ctypeslib.as_array(batch.logits, shape=(step_tokens,))
        np.ctypeslib.as_array(batch.n_seq_id, shape=(step_tokens,))[:] = 1
        self._memory = llama_cpp.llama_get_memory(context)
        self._start()

    def request_of(self, row: _Row) -> Request:
        return row.request

    def join(self, request: Request, index: int) -> _Row:
        return _Row(request)

    def release(self, index: int) -> None:
        llama_cpp.llama_memory_seq_rm(self._memory, index, -1, -1)

    def step(self) -> None:
        """One `llama_decode`: decode tokens first, then prompt chunks; each row whose logits
        came back gets its token, and the ended rows leave."""
        fed, answering = self._fill()
        status = llama_cpp.llama_decode(self.context, self.batch)
        if status != 0:
            count = int(self.batch.n_tokens)
            why = f"llama.cpp failed to decode a batch of {count} tokens (status {status})"
            self.fail(fed, RuntimeFailure(f"{why}: open the engine again"))
            return
        at = dict(answering)  # row -> the batch index of its logits
        self.settle(fed, lambda index, row: index in at and self._next(row, at[index]))

    def _next(self, row: _Row, at: int) -> bool:
        """The row's token from the logits at batch index `at`, delivered; whether it ended."""
        pointer = llama_cpp.llama_get_logits_ith(self.context, at)
        logits = np.ctypeslib.as_array(pointer, shape=(self._vocab,))
        row.last = choose(logits, row.request.sampling, row.request.rng)
        return row.request.deliver(row.last)

    def stop_and_wait(self) -> None:
        """Stop the thread and wait until it has left llama.cpp: then the context may go."""
        self.stop()
        self._thread.join()

    def _fill(self) -> tuple[list[int], list[tuple[int, int]]]:
        """Write this step's tokens into the batch: the rows fed, and the (row, batch index)
        pairs whose logits choose a token."""
        fed: list[int] = []
        answering: list[tuple[int, int]] = []
        count = 0
        rows = [(index, row) for index, row in enumerate(self.rows) if row is not None]
        for index, row in rows:
            if row.last >= 0:  # decoding: its last token at the next position
                self._put(count, [row.last], row.fed, index, wants=True)
                fed.append(index)
                answering.append((index, count))
                row.fed += 1
                count += 1
        for index, row in sorted(rows, key=lambda pair: pair[1].request.order):
            if row.last >= 0 or count == self._step_tokens:
                continue
            prompt = row.request.prompt
            chunk = prompt[row.fed : row.fed + self._step_tokens - count]
            done = row.fed + len(chunk) == len(prompt)
            self._put(count, chunk, row.fed, index, wants=done)
            fed.append(index)
            row.fed += len(chunk)
            count += len(chunk)
            if done:
                answering.append((index, count - 1))
        self.batch.n_tokens = count
        return fed, answering

    def _put(self, at: int, tokens: list[int], start: int, sequence: int, *, wants: bool) -> None:
        """`tokens` at batch indices from `at`, positions from `start`, in `sequence`; logits
        asked for the last one when `wants`."""
        end = at + len(tokens)
        self._tokens[at:end] = tokens
        self._positions[at:end] = np.arange(start, start + len(tokens))
        self._wants[at:end] = False
        self._wants[end - 1] = wants
        for i in range(at, end):
            self.batch.seq_id[i][0] = sequence
