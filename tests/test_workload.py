from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mahir.errors import BadInput
from mahir.model import Model
from mahir.workload import Workload, read_sentences


def test_save_and_load_round_trip(minilm: Model, tmp_path: Path) -> None:
    workload = minilm.family.workload([1, 3], batches_per_size=2)
    path = tmp_path / "w.npz"
    workload.save(path)
    loaded = Workload.load(path)
    assert loaded.texts == workload.texts
    assert sorted(loaded.batches) == [1, 3]
    for size in (1, 3):
        for a, b in zip(loaded.batches[size], workload.batches[size], strict=True):
            assert a.keys() == b.keys()
            for name in a:
                np.testing.assert_array_equal(a[name], b[name])
    tokens = loaded.describe(minilm.family.token_lengths)["tokens"]
    assert tokens["max"] >= tokens["min"]


def test_bad_data_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(BadInput, match="has no sentences"):
        read_sentences(empty)
    with pytest.raises(BadInput, match="cannot read sentences"):
        read_sentences(tmp_path / "missing.txt")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(BadInput, match="not a mahir workload"):
        Workload.load(junk)
