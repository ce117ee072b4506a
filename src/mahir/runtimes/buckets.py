"""Shape buckets: run every batch at one of a few fixed shapes.

A CUDA graph replays one recorded shape, so each new shape is a new capture: under real traffic
(any batch size, any sentence length) that is a capture per request and memory without end.
`Buckets` pads each batch up to the next bucket, rows to a power of two and sequences to the
next of a short ladder of lengths, runs it, and cuts the outputs back: a handful of graphs cover
all traffic, at the price of computing some padding.

Padding follows the batcher's convention: sequence inputs (axis 1) are zero-padded, which the
attention mask hides, and rows are padded by repeating the last real row, which every model
answers with finite numbers (an all-masked row can give NaN). Outputs whose axis 1 follows the
sequence are found by running two lengths (`token_outputs`) and cut back to the batch's own length.
A sequence is never padded past `InputSpec.max_sequence`, the longest the model's position table
reads. Sits beside the runtimes: wraps any `Session`, imports only numpy and mahir's types;
where the inner session queues batches (`submit`), so does this one.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np

from mahir.runtimes.pending import Joined, queues, submitter
from mahir.types import Inputs, InputSpec, Outputs, Pending, Session

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Rows a batch is padded to; a bigger batch runs in chunks of the largest."""
LENGTH_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
"""Sequence lengths a batch is padded to: at most 1.5x the real length past 32 tokens; longer
sequences go to the next multiple of the largest bucket."""


class Buckets:
    """A session that runs `inner` only at bucket shapes (see the module docstring)."""

    def __init__(
        self,
        inner: Session,
        spec: InputSpec,
        *,
        batch_buckets: Sequence[int] = BATCH_BUCKETS,
        length_buckets: Sequence[int] = LENGTH_BUCKETS,
    ) -> None:
        self.inner = inner
        self.runtime = inner.runtime
        self.device = inner.device
        self.queues = queues(inner)
        self._submit_inner = submitter(inner)
        self._spec = spec
        self._rows = tuple(sorted(batch_buckets))
        self._lengths = tuple(sorted(length_buckets))
        self._sequence = spec.sequence_inputs
        self._token_outputs: frozenset[str] | None = None

    def run(self, inputs: Inputs) -> Outputs:
        return self.submit(inputs).result()

    def submit(self, inputs: Inputs) -> Pending:
        """Queue each bucket-shaped chunk on `inner` (`mahir.runtimes.pending`)."""
        if self._sequence and self._token_outputs is None:
            self._token_outputs = token_outputs(self.inner, self._spec, self._lengths[:2])
        rows = len(next(iter(inputs.values())))
        if rows == 0:
            return self._submit_inner(inputs)
        largest = self._rows[-1]
        chunks = [
            {k: v[start : start + largest] for k, v in inputs.items()}
            for start in range(0, rows, largest)
        ]
        counts = [min(largest, rows - start) for start in range(0, rows, largest)]
        parts = [self._submit_inner(self._padded(chunk)) for chunk in chunks]
        return Joined(parts, partial(self._cut, counts, _length(inputs, self._sequence)))

    def describe(self) -> dict[str, Any]:
        return self.inner.describe() | {
            "batch_buckets": list(self._rows),
            "length_buckets": list(self._lengths) if self._sequence else None,
        }

    def bucket_shape(self, rows: int, length: int | None) -> tuple[int, int | None]:
        """The (rows, length) a batch of this shape runs at."""
        padded_rows = self._rows[min(bisect.bisect_left(self._rows, rows), len(self._rows) - 1)]
        if length is None:
            return max(padded_rows, rows), None
        at = bisect.bisect_left(self._lengths, length)
        top = self._lengths[-1]
        padded = self._lengths[at] if at < len(self._lengths) else -(-length // top) * top
        limit = self._spec.max_sequence
        return max(padded_rows, rows), max(length, min(padded, limit or padded))

    def _padded(self, inputs: Inputs) -> Inputs:
        rows = len(next(iter(inputs.values())))
        to_rows, to_length = self.bucket_shape(rows, _length(inputs, self._sequence))
        return {
            name: _pad(array, to_rows, to_length if name in self._sequence else None)
            for name, array in inputs.items()
        }

    def _cut(self, rows: list[int], length: int | None, outputs: list[Outputs]) -> Outputs:
        """The chunks' outputs cut back to their real rows and length, end to end."""
        cut = self._token_outputs or frozenset()
        pieces = {
            name: [
                out[name][:count, :length] if name in cut else out[name][:count]
                for out, count in zip(outputs, rows, strict=True)
            ]
            for name in outputs[0]
        }
        return {name: p[0] if len(p) == 1 else np.concatenate(p) for name, p in pieces.items()}


def token_outputs(
    session: Session, spec: InputSpec, lengths: Sequence[int] = (3, 7)
) -> frozenset[str]:
    """Outputs whose axis 1 follows the sequence length, found by running one row at two
    lengths (which also warms the runtime up)."""
    if not spec.sequence_inputs:
        return frozenset()
    runs = []
    for length in lengths[:2]:
        batch = {
            t.name: np.ones(
                (1, length, *tuple(d for d in t.shape[2:] if isinstance(d, int))), t.dtype
            )
            for t in spec.inputs
        }
        runs.append(session.run(batch))
    first, second = lengths[:2]
    return frozenset(
        name
        for name, out in runs[0].items()
        if out.ndim >= 2 and out.shape[1] == first and runs[1][name].shape[1] == second
    )


def _length(inputs: Inputs, sequence: frozenset[str]) -> int | None:
    lengths = {inputs[name].shape[1] for name in sequence if name in inputs}
    return max(lengths) if lengths else None


def _pad(array: np.ndarray, rows: int, length: int | None) -> np.ndarray:
    """Rows padded by repeating the last one; axis 1 zero-padded to `length` when given."""
    if rows == len(array) and (length is None or length == array.shape[1]):
        return array
    shape = list(array.shape)
    shape[0] = rows
    if length is not None:
        shape[1] = length
    out = np.zeros(shape, array.dtype)
    out[tuple(slice(0, n) for n in array.shape)] = array
    out[len(array) :] = out[len(array) - 1]
    return out
