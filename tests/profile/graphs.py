"""Small ONNX graphs the profile tests count by hand, and a wide MLP the runtimes profile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from mahir.modules import TupleOutputs
from mahir.types import BATCH, Artifact, InputSpec, TensorSpec

FLOAT = TensorProto.FLOAT


def graph(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, tuple[int | str, ...]],
    output: str,
    weights: dict[str, np.ndarray] | None = None,
    *,
    opset: int = 17,
    output_shape: tuple[int | str, ...] | None = None,
) -> onnx.ModelProto:
    """A one-output float graph; `weights` become initializers. Without `output_shape` the
    output's shape is left to inference (enough to count; the ONNX checker wants it)."""
    made = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, FLOAT, list(s)) for n, s in inputs.items()],
        [helper.make_tensor_value_info(output, FLOAT, output_shape)],
        [numpy_helper.from_array(a, n) for n, a in (weights or {}).items()],
    )
    return helper.make_model(made, opset_imports=[helper.make_opsetid("", opset)])


def weights(*shape: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * 0.05).astype(np.float32)


WIDE = (512, 2048)
"""The wide MLP's width and hidden size: matmuls of ~0.1 GFLOP at 64 rows, long next to what
a profiler adds per op."""


def wide_mlp_onnx(path: Path) -> Artifact:
    """x [batch, 512] -> MatMul 2048 -> Add -> Relu -> MatMul 512 -> Add -> LayerNormalization,
    as an ONNX file."""
    width, hidden = WIDE
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="up_bias"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["d"], name="down"),
        helper.make_node("Add", ["d", "b2"], ["db"], name="down_bias"),
        helper.make_node("LayerNormalization", ["db", "gamma", "beta"], ["y"], name="norm"),
    ]
    tensors = {
        "w1": weights(width, hidden),
        "b1": weights(hidden, seed=1),
        "w2": weights(hidden, width, seed=2),
        "b2": weights(width, seed=3),
        "gamma": np.ones(width, np.float32),
        "beta": np.zeros(width, np.float32),
    }
    made = graph(nodes, {"x": ("batch", width)}, "y", tensors, output_shape=("batch", width))
    onnx.save(made, str(path))
    return Artifact("onnx", _spec(), path=path)


def wide_mlp_torch() -> Artifact:
    """The same MLP as a torch module (its own random weights)."""
    width, hidden = WIDE
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Linear(width, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, width),
        torch.nn.LayerNorm(width),
    )
    spec = InputSpec((TensorSpec("input", "float32", (BATCH, width)),), ("y",))
    return Artifact("torch", spec, module=TupleOutputs(module, ("y",)).eval())


def _spec() -> InputSpec:
    return InputSpec((TensorSpec("x", "float32", (BATCH, WIDE[0])),), ("y",))
