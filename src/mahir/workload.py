"""Inputs shaped like the user's traffic, ready to feed any `Session`, and the files they come from.

A `Workload` holds batches per batch size (made by the model's family: `mahir.families`) and the
texts they were made from; it is saved as .npz next to the results, so every number can be
reproduced from exactly these inputs. The user's sentences are split here into what passes may
tune on and what judges them. Imports only the bottom layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mahir.errors import BadInput
from mahir.files import staged

Batch = dict[str, np.ndarray]

HELD_OUT_TEXT = Path(__file__).parent / "data" / "held_out.txt"
"""Sentences written for judging fidelity and never tuned on: one word to paragraphs past any
model's length, questions, reviews, code, numbers, a dozen scripts and emoji."""
HELD_OUT_EVERY = 5
"""Every fifth of the user's sentences is held out from calibration (when there are 10+)."""


@dataclass
class Workload:
    """Batches per batch size, and for text models the sentences they were made from."""

    batches: dict[int, list[Batch]]
    texts: tuple[str, ...] = field(default=())

    def save(self, path: Path) -> None:
        """Write as .npz (keys `b{size}/{index}/{input}`), atomically."""
        arrays: dict[str, np.ndarray] = {
            f"b{size}/{i}/{name}": array
            for size, batches in self.batches.items()
            for i, batch in enumerate(batches)
            for name, array in batch.items()
        }
        arrays["texts"] = np.array(self.texts, dtype=np.str_)
        with staged(path) as draft, draft.open("wb") as f:
            np.savez_compressed(f, **arrays)  # type: ignore[arg-type]  # stubs fear 'allow_pickle'

    @classmethod
    def load(cls, path: Path) -> Workload:
        if not path.is_file():
            raise BadInput(f"workload {path} does not exist")
        batches: dict[int, dict[int, Batch]] = {}
        try:
            with np.load(path) as data:
                texts = tuple(str(t) for t in data["texts"])
                for key in data.files:
                    if key == "texts":
                        continue
                    size, index, name = key.split("/")
                    batches.setdefault(int(size[1:]), {}).setdefault(int(index), {})[name] = data[
                        key
                    ]
        except (OSError, ValueError, KeyError) as err:
            raise BadInput(f"{path} is not a mahir workload (.npz): {err}") from err
        ordered = {s: [b[i] for i in sorted(b)] for s, b in sorted(batches.items())}
        return cls(ordered, texts)

    def describe(
        self, token_lengths: Callable[[Batch], np.ndarray | None] = lambda batch: None
    ) -> dict[str, Any]:
        """What a report says about the inputs: sizes, and token lengths where the family
        counts them (`Family.token_lengths`)."""
        info: dict[str, Any] = {
            "batch_sizes": sorted(self.batches),
            "batches_per_size": {s: len(b) for s, b in self.batches.items()},
        }
        counted = [token_lengths(b) for batches in self.batches.values() for b in batches]
        lengths = [int(n) for per_row in counted if per_row is not None for n in per_row]
        if lengths:
            info["tokens"] = {
                "min": min(lengths),
                "median": float(np.median(lengths)),
                "max": max(lengths),
            }
        return info


def check_batch_sizes(sizes: Sequence[int]) -> None:
    if not sizes or any(size < 1 for size in sizes):
        raise BadInput(f"batch sizes must be >= 1, got {list(sizes)}")


def read_sentences(path: Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise BadInput(
            f"cannot read sentences from {path} ({err}): give a UTF-8 text file"
        ) from err
    sentences = [line.strip() for line in lines if line.strip()]
    if not sentences:
        raise BadInput(f"{path} has no sentences: give a text file with one sentence per line")
    return sentences


def split_held_out(sentences: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The user's sentences apart: those passes may calibrate and tune on, and every fifth held
    out to judge them by (both spread over the file). Fewer than ten: all may be tuned on."""
    if len(sentences) < 2 * HELD_OUT_EVERY:
        return tuple(sentences), ()
    held = tuple(s for i, s in enumerate(sentences) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1)
    tuning = tuple(s for i, s in enumerate(sentences) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1)
    return tuning, held


def read_npz_batches(
    spec_names: Sequence[str], path: Path, batch_size: int
) -> tuple[dict[str, np.ndarray], list[Batch]]:
    """An .npz holding every input by name: the arrays as read (what a metric receives) and
    the inputs in order, `batch_size` samples per batch."""
    try:
        with np.load(path) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError) as err:
        raise BadInput(
            f"{path} is not an .npz file ({err}): save the inputs with np.savez"
        ) from err
    missing = [name for name in spec_names if name not in arrays]
    if missing:
        raise BadInput(f"{path} lacks the model's inputs {missing}; it has {sorted(arrays)}")
    count = len(arrays[spec_names[0]])
    batches = [
        {name: arrays[name][i : i + batch_size] for name in spec_names}
        for i in range(0, count, batch_size)
    ]
    return arrays, batches
