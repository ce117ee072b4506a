"""The tensor family: any torch or ONNX model that reads neither text nor images.

Its inputs are random tensors from the model's spec, with the example inputs' sizes for every
dynamic axis but the batch (and the sequence, where verification varies it); its outputs are
judged by cosine and error (top-1 agreement for outputs that are class scores). A user's data is
an .npz holding every input by name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mahir.quality import compare
from mahir.types import BATCH, SEQUENCE, InputSpec, Outputs, Quality
from mahir.workload import Batch, Workload, check_batch_sizes, read_npz_batches


@dataclass(frozen=True)
class Tensor:
    """A model known only by its spec and the sizes of its example inputs."""

    spec: InputSpec
    dims: Mapping[str, int] = field(default_factory=dict)
    """Size of each named dynamic axis in the example inputs."""

    kind = "tensor"
    transformer = False
    pools = False
    fidelity_name = "output"

    @classmethod
    def from_example(cls, spec: InputSpec, example: Mapping[str, np.ndarray]) -> Tensor:
        dims: dict[str, int] = {}
        for t in spec.inputs:
            for axis, name in t.dynamic_axes.items():
                dims.setdefault(name, int(example[t.name].shape[axis]))
        return cls(spec, dims)

    def batch(self, size: int, rng: np.random.Generator, **dims: int) -> Batch:
        """Random inputs of one batch; other dynamic axes keep the example's sizes."""
        return random_inputs(self.spec, {**self.dims, BATCH: size, **dims}, rng)

    def workload(
        self,
        sizes: Sequence[int],
        *,
        batches_per_size: int = 8,
        seed: int = 0,
        texts: Sequence[str] | None = None,
        token_range: tuple[int, int] | None = None,
    ) -> Workload:
        check_batch_sizes(sizes)
        rng = np.random.default_rng(seed)
        return Workload(
            {size: [self.batch(size, rng) for _ in range(batches_per_size)] for size in sizes}
        )

    def verification_batches(self) -> list[Batch]:
        """Batch sizes 1, 3 and 7, with the sequence (if any) varied around the example's."""
        rng = np.random.default_rng(1234)
        sequence = self.dims.get(SEQUENCE, 8)
        variants = [(1, sequence), (3, sequence + 5), (7, max(1, sequence // 2))]
        return [self.batch(size, rng, **{SEQUENCE: seq}) for size, seq in variants]

    def held_out_batches(
        self, user_held: Sequence[str] = (), *, batch_size: int = 16, seed: int = 3
    ) -> list[Batch]:
        """Random inputs of their own seed."""
        rng = np.random.default_rng(seed)
        return [self.batch(batch_size, rng) for _ in range(4)]

    def compare(
        self,
        outputs: Sequence[Outputs],
        reference: Sequence[Outputs],
        batches: Sequence[Batch],
        logits: frozenset[str],
    ) -> Quality:
        return compare(outputs, reference, logits=logits)

    def scored(self, outputs: Outputs, batch: Batch) -> Outputs:
        return outputs

    def token_lengths(self, batch: Batch) -> np.ndarray | None:
        return None

    def read_user_data(self, path: Path, batch_size: int) -> tuple[Any, list[Batch]]:
        """An .npz holding every input by name; the metric receives the dict of its arrays."""
        return read_npz_batches(self.spec.input_names, path, batch_size)

    def summary(self) -> dict[str, Any]:
        return {}

    def save(self, folder: Path) -> dict[str, Any]:
        return {"dims": dict(self.dims)}

    @classmethod
    def open(cls, spec: InputSpec, folder: Path, manifest: dict[str, Any]) -> Tensor:
        return cls(spec, dict(manifest.get("dims") or {}))


def random_inputs(
    spec: InputSpec, dims: Mapping[str, int], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Random inputs for a spec; dynamic axes take their size from `dims` (default 16).
    Floats are standard normal; integers are small non-negative ids."""
    arrays: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        shape = tuple(d if isinstance(d, int) else dims.get(d, 16) for d in t.shape)
        if np.issubdtype(np.dtype(t.dtype), np.floating):
            arrays[t.name] = rng.standard_normal(shape).astype(t.dtype)
        elif t.dtype == "bool":
            arrays[t.name] = np.ones(shape, dtype=bool)
        else:
            arrays[t.name] = rng.integers(0, 2, size=shape).astype(t.dtype)
    return arrays
