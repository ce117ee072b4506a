"""Shape buckets: any batch runs at a few fixed shapes, and its answers are the unpadded ones."""

from __future__ import annotations

import numpy as np
import pytest

from mahir.errors import Unsupported
from mahir.model import Model
from mahir.runtimes import RUNTIMES, Runtime, open_session
from mahir.runtimes.buckets import Buckets
from mahir.types import Inputs, Outputs


class Recorder:
    """A session that records the shapes it is asked to run."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.runtime, self.device = inner.runtime, inner.device  # type: ignore[attr-defined]
        self.shapes: list[tuple[int, ...]] = []

    def run(self, inputs: Inputs) -> Outputs:
        self.shapes.append(next(iter(inputs.values())).shape)
        return self.inner.run(inputs)  # type: ignore[attr-defined, no-any-return]

    def describe(self) -> dict[str, object]:
        return {}


def test_text_batches_of_any_shape_run_at_bucket_shapes_with_unchanged_answers(
    minilm: Model,
) -> None:
    eager = open_session("torch", minilm.original())
    recorder = Recorder(eager)
    bucketed = Buckets(recorder, minilm.spec, batch_buckets=(1, 2, 4))
    texts = ["a", "a short sentence", "a somewhat longer sentence about buckets and shapes"] * 3
    for rows, length in ((1, None), (3, None), (7, 40)):  # 7 rows: two chunks of the largest 4
        batch = dict(minilm.family.tokenize(texts[:rows]))  # type: ignore[attr-defined]
        if length is not None:
            batch = {k: np.pad(v, ((0, 0), (0, length - v.shape[1]))) for k, v in batch.items()}
        want = eager.run(batch)
        got = bucketed.run(batch)
        for name in want:
            assert got[name].shape == want[name].shape
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4)
    runs = [s for s in recorder.shapes if s[1] not in (16, 32) or s[0] != 1]  # probes excluded
    assert {s[0] for s in recorder.shapes} <= {1, 2, 4}
    assert {s[1] for s in runs} <= {16, 32, 48}
    assert bucketed.describe()["length_buckets"][:3] == [16, 32, 48]


def test_bucket_shapes_stop_at_the_models_longest_sequence(minilm: Model) -> None:
    bucketed = Buckets(open_session("torch", minilm.original()), minilm.spec)
    assert minilm.spec.max_sequence == 512
    assert bucketed.bucket_shape(3, 17) == (4, 32)
    assert bucketed.bucket_shape(200, 500) == (256, 512)  # 512, not the next bucket past it
    assert bucketed.bucket_shape(1, 129) == (1, 192)


def test_tensor_models_pad_rows_only(mlp: Model) -> None:
    eager = open_session("torch", mlp.original())
    bucketed = Buckets(eager, mlp.spec)
    batch = {"x": np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32)}
    np.testing.assert_allclose(bucketed.run(batch)["output"], eager.run(batch)["output"], atol=1e-6)
    assert bucketed.bucket_shape(5, None) == (8, None)
    assert bucketed.describe()["length_buckets"] is None


def test_a_runtime_whose_package_is_missing_is_refused_with_what_to_install(
    mlp: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    absent = Runtime("absent", ("torch",), RUNTIMES["torch"].open, "", package="mahir_absent_pkg")
    monkeypatch.setitem(RUNTIMES, "absent", absent)
    assert absent.missing() == "mahir_absent_pkg"
    assert RUNTIMES["torch"].missing() is None
    with pytest.raises(Unsupported, match="pip install mahir_absent_pkg"):
        open_session("absent", mlp.original())
