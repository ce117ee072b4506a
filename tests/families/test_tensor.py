"""The tensor family: random inputs shaped by the spec and the example."""

from __future__ import annotations

import numpy as np

from mahir.model import Model


def test_tensor_workload_follows_the_spec(cnn: Model) -> None:
    workload = cnn.family.workload([1, 5], batches_per_size=2)
    assert workload.batches[5][0]["image"].shape == (5, 3, 32, 32)
    assert workload.batches[1][1]["image"].dtype == np.float32
    assert workload.texts == ()
