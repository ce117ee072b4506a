"""One batch's inputs from many requests, and the batch's outputs back to each request: the
batcher's (`batcher.py`) array work, pure numpy, run on a thread (never on the event loop).

Sequence inputs are zero-padded on axis 1 to the batch's longest (the attention mask hides the
padding, so it changes nothing); token outputs are cut back to each request's own length.
Knows numpy arrays only: nothing of asyncio, sessions or HTTP.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from mahir.types import Inputs, Outputs


class Part(Protocol):
    """One request's share of a batch."""

    @property
    def inputs(self) -> Inputs: ...

    @property
    def items(self) -> int:
        """Rows."""
        ...

    @property
    def length(self) -> int:
        """Sequence length (1 for models without one)."""
        ...


def shape_key(inputs: Inputs, sequence_inputs: frozenset[str]) -> tuple[object, ...]:
    """Requests batch together only when their non-batch, non-sequence shapes match."""
    return tuple(
        (name, a.dtype.str, a.shape[2:] if name in sequence_inputs else a.shape[1:])
        for name, a in sorted(inputs.items())
    )


def merge(batch: Sequence[Part], sequence_inputs: frozenset[str]) -> dict[str, np.ndarray]:
    """One input dict for the whole batch, sequence inputs zero-padded to the longest."""
    longest = max(r.length for r in batch)
    merged = {}
    for name in batch[0].inputs:
        parts = [r.inputs[name] for r in batch]
        if name in sequence_inputs:
            merged[name] = stack_padded(parts, longest)
        else:
            merged[name] = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return merged


def stack_padded(parts: Sequence[np.ndarray], length: int) -> np.ndarray:
    """The parts one after another along axis 0, each zero-padded on axis 1 to `length`: one
    allocation and a copy per part (np.pad per part then concatenate was 8% of the event
    loop's time at concurrency 32, when merging still ran there)."""
    if len(parts) == 1 and parts[0].shape[1] == length:
        return parts[0]
    first = parts[0]
    out = np.zeros((sum(len(p) for p in parts), length, *first.shape[2:]), first.dtype)
    row = 0
    for part in parts:
        out[row : row + len(part), : part.shape[1]] = part
        row += len(part)
    return out


def split(outputs: Outputs, batch: Sequence[Part], token_outputs: frozenset[str]) -> list[Outputs]:
    """Each request's own rows of the batch's outputs, token outputs cut to its own length;
    a session that answers a different number of rows than it was given raises."""
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
