"""FLOPs of one forward: hand-counted 2*M*N*K, fake tensors and the one-row fallback."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mahir.flops import FAKE, ONE_ROW, count_flops, forward_flops, model_cost
from mahir.model import Model


def test_a_linear_costs_two_flops_per_multiply_add() -> None:
    m, k, n = 8, 32, 64
    flops = count_flops(nn.Linear(k, n), {"input": torch.randn(m, k)})
    assert flops == 2 * m * n * k


def test_a_small_mlp_costs_the_sum_of_its_matmuls(mlp: Model) -> None:
    """tests/models.py's MLP: 32 -> 64 -> 64 -> 10; activations and dropout count nothing."""
    rows = 4
    batch = {"x": np.zeros((rows, 32), np.float32)}
    flops, how = forward_flops(mlp.module, batch)
    assert flops == 2 * rows * (32 * 64 + 64 * 64 + 64 * 10)
    assert how == FAKE


class ReadsItsData(nn.Module):
    """A forward whose control flow depends on the values: fake tensors cannot follow it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        if x.sum() > 0:
            return (self.linear(x),)
        return (self.linear(-x),)


def test_a_forward_that_reads_its_data_is_counted_on_one_row() -> None:
    batch = {"x": np.ones((5, 16), np.float32)}
    flops, how = forward_flops(ReadsItsData(), batch)
    assert (flops, how) == (5 * 2 * 16 * 8, ONE_ROW)


def test_the_cost_per_batch_size_is_the_mean_over_its_batches(mlp: Model) -> None:
    per_row = 2 * (32 * 64 + 64 * 64 + 64 * 10)
    batches = {
        1: [{"x": np.zeros((1, 32), np.float32)}] * 3,
        4: [{"x": np.zeros((4, 32), np.float32)}, {"x": np.zeros((2, 32), np.float32)}],
    }
    cost = model_cost(mlp, batches)
    assert cost.flops_per_batch == {1: per_row, 4: 3 * per_row}
    assert cost.method == FAKE
    assert cost.note is None


def test_an_onnx_source_is_not_counted(mlp: Model) -> None:
    onnx = Model(mlp.name, "model.onnx", mlp.spec, mlp.example_inputs, mlp.family)
    cost = model_cost(onnx, {1: [{"x": np.zeros((1, 32), np.float32)}]})
    assert cost.flops_per_batch == {}
    assert cost.note is not None
    assert cost.note.startswith("not counted: an ONNX source")
