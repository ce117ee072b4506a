"""What a request's inputs must hold before they may join a batch.

A bad input that reaches a batch costs more than its own answer: a runtime may fail the whole
batch and every request in it, answer a wrong vector without raising (OpenVINO takes an id past
the embedding table without complaint), or stay broken for the requests after it. So
everything that can be checked on the arrays alone is checked here, on the event loop, before
the batcher sees the request: no dimension of size 0, finite floats, token inputs of one length
and no longer than the model's positions, token ids and token type ids inside their tables.
A few microseconds a request. Knows the model's input spec and token limits; nothing of HTTP
or batching.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mahir.errors import Mismatch
from mahir.types import Inputs, InputSpec, TokenLimits


@dataclass(frozen=True, slots=True)
class InputRules:
    """The checks for one model, worked out once."""

    sequence: tuple[str, ...]
    """Inputs whose axis 1 is the sequence: they must agree on its length."""
    positions: int | None
    """Sequence length at most; None: not known."""
    tables: tuple[tuple[str, int | None], ...]
    """Token inputs that index a table: name and the table's size (None: not known, so only
    negative ids are refused)."""
    floats: tuple[str, ...]

    @classmethod
    def for_model(cls, spec: InputSpec, limits: TokenLimits | None) -> InputRules:
        names = {t.name for t in spec.inputs}
        sizes = {
            "input_ids": limits.vocab_size if limits else None,
            "token_type_ids": limits.type_vocab_size if limits else None,
        }
        return cls(
            sequence=tuple(n for n in spec.input_names if n in spec.sequence_inputs),
            positions=limits.positions if limits else None,
            tables=tuple((name, size) for name, size in sizes.items() if name in names),
            floats=tuple(t.name for t in spec.inputs if np.dtype(t.dtype).kind == "f"),
        )

    def check(self, inputs: Inputs) -> None:
        """Raise Mismatch (one line: what is wrong, what the model takes) on the first fault."""
        for name, array in inputs.items():
            if array.size == 0:
                raise Mismatch(
                    f"input {name!r} has shape {list(array.shape)}: every dimension must be >= 1"
                )
        for name in self.floats:
            if not np.isfinite(inputs[name]).all():
                raise Mismatch(f"input {name!r} holds NaN or infinity: send finite values")
        self._check_tokens(inputs)

    def _check_tokens(self, inputs: Inputs) -> None:
        lengths = {name: inputs[name].shape[1] for name in self.sequence}
        if len(set(lengths.values())) > 1:
            given = ", ".join(f"{name} {length}" for name, length in lengths.items())
            raise Mismatch(f"token inputs must be one length per row, got {given}")
        length = next(iter(lengths.values()), 0)
        if self.positions is not None and length > self.positions:
            raise Mismatch(
                f"{length} tokens per row; the model reads at most {self.positions}: "
                "shorten the input"
            )
        for name, size in self.tables:
            ids = inputs[name]
            low, high = int(ids.min()), int(ids.max())
            if low < 0:
                raise Mismatch(f"input {name!r} holds {low}: ids are never negative")
            if size is not None and high >= size:
                raise Mismatch(
                    f"input {name!r} holds {high}; the model's table has {size} rows: "
                    f"ids must be in [0, {size})"
                )
