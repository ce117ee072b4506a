"""The tensor family: any torch or ONNX model that is neither text nor images.

Its inputs are random tensors from the model's spec; its outputs are judged by cosine and error
(top-1 agreement for outputs that are class scores).
"""

from __future__ import annotations

import numpy as np

from mahir.types import InputSpec


def random_inputs(
    spec: InputSpec, dims: dict[str, int], rng: np.random.Generator
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
