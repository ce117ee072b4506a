"""aten ops costed from what torch.profiler records: checked by hand and against torch's own
FlopCounterMode where it counts the op (matmuls and convolutions, without their bias)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mahir.flops import count_flops
from mahir.model import Model
from mahir.profile.pytorch import profile_torch
from mahir.profile.torch_ops import aten_cost
from mahir.runtimes import open_session
from mahir.types import RuntimeOptions

F = "float"


def test_a_linear_is_a_gemm_with_its_bias() -> None:
    op = aten_cost("l", "aten::linear", [[8, 32], [64, 32], [64]], [F, F, F])
    assert op is not None
    assert (op.kind, op.flops) == ("matmul", 2 * 8 * 64 * 32 + 8 * 64)
    assert op.bytes == 4 * (8 * 32 + 64 * 32 + 64 + 8 * 64)


@pytest.mark.parametrize(
    ("stride", "padding", "out"), [([1, 1], [1, 1], 32), ([2, 2], [1, 1], 16), ([1], "valid", 30)]
)
def test_a_conv_s_output_follows_its_stride_and_padding(
    stride: list[int], padding: object, out: int
) -> None:
    scalars = [None, None, None, stride, padding, [1, 1], 1]
    shapes = [[8, 3, 32, 32], [16, 3, 3, 3], [16], [], [], [], []]
    op = aten_cost("c", "aten::conv2d", shapes, [F, F, F, "ScalarList", "", "", "Scalar"], scalars)
    assert op is not None
    assert op.flops == 2 * (8 * 16 * out * out) * (3 * 3 * 3)


def test_a_max_pool_reads_its_window_for_every_output() -> None:
    scalars = [None, [2, 2], [], [0, 0], [1, 1], False]
    shapes = [[8, 16, 32, 32], [], [], [], [], []]
    op = aten_cost("p", "aten::max_pool2d", shapes, [F, "", "", "", "", "Scalar"], scalars)
    assert op is not None
    assert (op.kind, op.flops) == ("reduce", 8 * 16 * 16 * 16 * 4)
    assert op.bytes == 4 * (8 * 16 * 32 * 32 + 8 * 16 * 16 * 16)


def test_attention_views_and_unknown_ops() -> None:
    q = [2, 4, 16, 8]
    sdpa = aten_cost("a", "aten::scaled_dot_product_attention", [q, q, q], [F, F, F])
    assert sdpa is not None
    assert sdpa.flops == 2 * 2 * (2 * 4 * 16 * 16 * 8) + 5 * (2 * 4 * 16 * 16)
    view = aten_cost("v", "aten::view", [[4, 8], []], [F, "ScalarList"])
    assert view is not None
    assert (view.flops, view.bytes) == (0, 0)
    assert aten_cost("u", "aten::nonzero_static", [[4, 8]], [F]) is None  # output unknown


def test_the_profiled_cnn_s_convolutions_cost_what_flop_counter_mode_counts(cnn: Model) -> None:
    session = open_session("torch", cnn.original(), RuntimeOptions(threads=1))
    image = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    found = profile_torch(session, {"image": image}, runs=2, seconds=0.05)
    convs = [op.cost.flops for op in found.ops if op.op_type == "aten::conv2d" and op.cost]
    features = cnn.module.model.features
    expected = [
        count_flops(features[0], {"input": torch.from_numpy(image)}),
        count_flops(features[4], {"input": torch.zeros(2, 16, 16, 16)}),
    ]
    assert convs == expected
    pools = [op for op in found.ops if op.op_type == "aten::max_pool2d"]
    assert [op.cost.kind for op in pools if op.cost] == ["reduce"]


def test_an_op_recorded_without_dtypes_is_costed_in_the_sessions_precision() -> None:
    """torch before 2.13 records shapes but no dtypes (the H200's torch 2.11 raised on it)."""
    from types import SimpleNamespace

    from mahir.profile.pytorch import _cost

    shapes = [[4, 8], [16, 8], [16]]
    event = SimpleNamespace(name="aten::linear", input_shapes=shapes, concrete_inputs=[""] * 3)
    cost = _cost("linear", event, "c10::BFloat16")
    assert cost is not None
    assert cost.precision == "bf16"
    assert cost.flops >= 2 * 4 * 8 * 16
