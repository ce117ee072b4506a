"""Packed batches: a padded batch laid out as one row of its real tokens, at a few fixed sizes.

A module built by the `PackSequences` pass (`mahir/varlen.py`) takes its batch packed: the
tokens of every sentence end to end, with each token's position, the offsets where sentences
start (`cu_seqlens`) and each token's sentence (`segments`). `Packing` is the session callers
see: it takes the usual padded batch (input_ids, attention_mask, ...), packs it on the host,
runs the inner session, and returns one sentence embedding per row. So padding costs nothing
on the device, and a batch of short sentences computes only their tokens.

The packed shapes are bucketed, as `Buckets` does for padded batches, so that a CUDA graph per
shape covers all traffic: tokens are padded up a ladder of sizes (the padding tokens form one
extra segment that attends only to itself and is dropped), and the number of segments up
powers of four (empty segments in between). A batch past the largest bucket runs in chunks.
Positions are the token's column in the padded row, exactly what the padded model reads.
"""

from __future__ import annotations

import bisect
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np

from mahir.runtimes import Signature, input_error, inputs_fit
from mahir.runtimes.pending import Joined, queues, submitter
from mahir.types import Inputs, InputSpec, Outputs, Pending, Session, TensorSpec

TOKENS = "tokens"
"""The packed axis: real tokens of the whole batch (plus bucket padding)."""
SEGMENTS = "segments"
TOKEN_BUCKETS = (
    *(64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192),
    *(12288, 16384, 24576),
)
"""Packed lengths a batch is padded to: at most 1.5x its real tokens. Up to 24,576, so that 256
sentences of up to ~96 tokens run as one chunk: each chunk costs the host a launch and copies
(4,096 sentences in 16 chunks instead of 21: 34.4 against 36.0 ms end to end, H100 host)."""
SEGMENT_BUCKETS = (1, 4, 16, 64, 256)
"""Sentences per packed batch, padded up with empty ones; a bigger batch runs in chunks."""


def packed_spec(spec: InputSpec) -> InputSpec:
    """How the packed module is called, for a padded spec (input_ids, attention_mask, ...)."""
    tokens = tuple(
        TensorSpec(t.name, t.dtype, (1, TOKENS)) for t in spec.inputs if t.name != "attention_mask"
    )
    return replace(
        spec,
        inputs=(
            *tokens,
            TensorSpec("position_ids", "int64", (1, TOKENS)),
            TensorSpec("cu_seqlens", "int32", (SEGMENTS,)),
            TensorSpec("segments", "int64", (TOKENS,)),
        ),
        packed=False,
    )


def pack(
    inputs: Inputs, tokens: int | None = None, segments: int | None = None
) -> dict[str, np.ndarray]:
    """The padded batch packed, padded to `tokens` tokens and `segments` + 1 segments (the
    last holds the padding tokens); at its own size when not given."""
    mask = inputs["attention_mask"] != 0
    rows, columns = np.nonzero(mask)
    lengths = mask.sum(axis=1)
    real = len(rows)
    tokens = real if tokens is None else tokens
    segments = len(lengths) if segments is None else segments
    cu_seqlens = np.full(segments + 2, real, np.int32)
    cu_seqlens[0] = 0
    cu_seqlens[1 : len(lengths) + 1] = np.cumsum(lengths)
    cu_seqlens[-1] = tokens
    packed: dict[str, np.ndarray] = {}
    for name, array in inputs.items():
        if name != "attention_mask":
            packed[name] = _padded(array[mask], tokens)[None]
    packed["position_ids"] = _padded(columns.astype(np.int64), tokens)[None]
    packed["cu_seqlens"] = cu_seqlens
    packed["segments"] = np.concatenate([rows, np.full(tokens - real, segments, np.int64)])
    return packed


def _padded(values: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros(size, values.dtype)
    out[: len(values)] = values
    return out


class Packing:
    """The padded-batch session over a packed module's session `inner` (module docstring)."""

    packed = True
    """Batches cost their real tokens only: the batcher budgets those, not padded ones."""

    def __init__(self, inner: Session, spec: InputSpec) -> None:
        self.inner = inner
        self.runtime = inner.runtime
        self.device = inner.device
        self.queues = queues(inner)
        self._submit_inner = submitter(inner)
        self._output = spec.outputs[0]
        self._signature: Signature = {t.name: t.shape for t in spec.inputs}

    def run(self, inputs: Inputs) -> Outputs:
        return self.submit(inputs).result()

    def submit(self, inputs: Inputs) -> Pending:
        """Pack the batch on the host and queue each packed chunk on `inner`."""
        if not inputs_fit(self._signature, inputs):
            raise input_error(self._signature, inputs)
        mask = inputs["attention_mask"] != 0
        if len(mask) == 0:
            return self._submit_inner(pack(inputs))
        lengths = mask.sum(axis=1)
        chunks = _chunks(lengths)
        parts = [
            self._submit_chunk({k: v[start:end] for k, v in inputs.items()}, lengths[start:end])
            for start, end in chunks
        ]
        return Joined(parts, partial(self._joined, [end - start for start, end in chunks]))

    def describe(self) -> dict[str, Any]:
        return self.inner.describe() | {
            "packed": True,
            "token_buckets": list(TOKEN_BUCKETS),
            "segment_buckets": list(SEGMENT_BUCKETS),
        }

    def _submit_chunk(self, inputs: Inputs, lengths: np.ndarray) -> Pending:
        tokens = _bucket(TOKEN_BUCKETS, max(int(lengths.sum()), 1))
        segments = _bucket(SEGMENT_BUCKETS, len(lengths))
        return self._submit_inner(pack(inputs, tokens, segments))

    def _joined(self, rows: list[int], outputs: list[Outputs]) -> Outputs:
        """One embedding per row: each chunk's, without its empty bucket segments."""
        name = self._output
        parts = [out[name][:n] for out, n in zip(outputs, rows, strict=True)]
        return {name: parts[0] if len(parts) == 1 else np.concatenate(parts)}


def _bucket(ladder: tuple[int, ...], size: int) -> int:
    at = bisect.bisect_left(ladder, size)
    return ladder[at] if at < len(ladder) else size


def _chunks(lengths: np.ndarray) -> list[tuple[int, int]]:
    """Row ranges that fit the largest buckets: at most SEGMENT_BUCKETS[-1] rows and
    TOKEN_BUCKETS[-1] tokens each (a longer single row runs alone at its own size)."""
    if len(lengths) <= SEGMENT_BUCKETS[-1] and lengths.sum() <= TOKEN_BUCKETS[-1]:
        return [(0, len(lengths))]  # the common case, without a Python loop over the rows
    chunks, start, total = [], 0, 0
    for row, length in enumerate(lengths.tolist()):
        full = row - start == SEGMENT_BUCKETS[-1] or total + length > TOKEN_BUCKETS[-1]
        if full and row > start:
            chunks.append((start, row))
            start, total = row, 0
        total += length
    chunks.append((start, len(lengths)))
    return chunks
