"""The one staging buffer a CUDA graph's inputs travel in (runtimes/cuda_graphs.py): each input
gets an aligned place of its own, and what numpy writes there is what the graph's views read.
Laid out on the CPU here (the same code lays out the pinned and the GPU buffer); replaying
graphs runs in tests/runtimes/test_cuda.py on a GPU."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from mahir.runtimes.cuda_graphs import ALIGN, byte_layout, place


def test_every_input_has_an_aligned_place_of_its_own_and_reads_back_as_written() -> None:
    inputs = {
        "input_ids": np.arange(7 * 5, dtype=np.int64).reshape(1, 35),
        "cu_seqlens": np.array([0, 3, 35], np.int32),
        "segments": np.zeros(35, np.int64),
        "mask": np.ones((2, 3), np.bool_),
        "empty": np.zeros((0, 4), np.float32),
    }
    offsets, size = byte_layout(inputs)
    assert all(offset % ALIGN == 0 for offset in offsets.values())
    spans = sorted((offsets[n], offsets[n] + a.nbytes) for n, a in inputs.items())
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))
    assert size >= spans[-1][1]
    buffer = torch.zeros(size, dtype=torch.uint8)
    views = place(buffer, offsets, inputs)
    writable = {name: view.numpy() for name, view in views.items()}
    rng = np.random.default_rng(0)
    for name, array in inputs.items():
        fresh = rng.integers(0, 100, array.shape).astype(array.dtype)
        np.copyto(writable[name], fresh, casting="no")
        assert views[name].shape == array.shape
        np.testing.assert_array_equal(views[name].numpy(), fresh)
    assert offsets == byte_layout(inputs)[0]  # the same shapes: the same places
