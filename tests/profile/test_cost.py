"""FLOPs and bytes of ONNX graphs, counted by hand: 2 FLOPs per multiply-add, every operand read
and every result written once at its dtype's size (fp32: 4 bytes)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from mahir.profile.cost import OpCost, Tensor, op_cost
from mahir.profile.onnx_graph import onnx_costs
from tests.profile.graphs import graph, weights


def costs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> dict[str, OpCost]:
    """Each node's cost by name; every node costed."""
    found = onnx_costs(model, shapes)
    assert found.uncosted == ()
    return {op.name: op for op in found.ops}


def test_a_matmul_costs_2mnk_and_moves_both_operands_and_its_result() -> None:
    m, k, n = 8, 32, 64
    model = graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        {"x": ("batch", k)},
        "y",
        {"w": weights(k, n)},
    )
    (op,) = costs(model, {"x": (m, k)}).values()
    assert (op.kind, op.precision) == ("matmul", "fp32")
    assert op.flops == 2 * m * n * k
    assert op.bytes == 4 * (m * k + k * n + m * n)


def test_a_gemm_with_transposed_weights_and_a_bias_adds_one_flop_per_output() -> None:
    m, k, n = 8, 32, 64
    model = graph(
        [helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="gemm", transB=1)],
        {"x": (m, k)},
        "y",
        {"w": weights(n, k), "c": weights(n)},
    )
    (op,) = costs(model, {"x": (m, k)}).values()
    assert op.flops == 2 * m * n * k + m * n
    assert op.bytes == 4 * (m * k + n * k + n + m * n)


@pytest.mark.parametrize(
    ("image", "kernel", "attributes", "out"),
    [
        ((2, 3, 16, 16), (8, 3, 3, 3), {"pads": [1, 1, 1, 1]}, (2, 8, 16, 16)),
        ((1, 3, 16, 16), (8, 3, 3, 3), {"pads": [1, 1, 1, 1], "strides": [2, 2]}, (1, 8, 8, 8)),
        ((1, 4, 8, 8), (4, 1, 3, 3), {"pads": [1, 1, 1, 1], "group": 4}, (1, 4, 8, 8)),
    ],
    ids=["3x3", "strided", "depthwise"],
)
def test_a_conv_costs_2_flops_per_output_per_weight_of_its_channel(
    image: tuple[int, ...],
    kernel: tuple[int, ...],
    attributes: dict[str, object],
    out: tuple[int, ...],
) -> None:
    model = graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **attributes)],
        {"x": image},
        "y",
        {"w": weights(*kernel), "b": weights(kernel[0])},
    )
    (op,) = costs(model, {"x": image}).values()
    per_output = kernel[1] * kernel[2] * kernel[3]  # input channels of its group x kH x kW
    assert op.flops == 2 * np.prod(out) * per_output
    assert op.bytes == 4 * (np.prod(image) + np.prod(kernel) + kernel[0] + np.prod(out))


B, H, S, D = 2, 4, 16, 8
"""An attention block: batch, heads, sequence, head size."""


def test_an_attention_block_costs_qk_softmax_and_av() -> None:
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"], name="scale"),
        helper.make_node("Softmax", ["scaled"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["y"], name="av"),
    ]
    shape = (B, H, S, D)
    model = graph(
        nodes,
        {"q": shape, "k": shape, "v": shape},
        "y",
        {"scale": np.array(D**-0.5, np.float32)},
    )
    ops = costs(model, {"q": shape, "k": shape, "v": shape})
    qkv, scores = B * H * S * D * 4, B * H * S * S * 4  # bytes of one of q, k, v; of the scores
    pairs = B * H * S * S
    assert ops["kt"].flops == 0
    assert ops["kt"].bytes == 2 * qkv
    assert (ops["qk"].flops, ops["qk"].bytes) == (2 * pairs * D, 2 * qkv + scores)
    assert (ops["scale"].flops, ops["scale"].bytes) == (pairs, 2 * scores + 4)
    assert (ops["softmax"].flops, ops["softmax"].bytes) == (5 * pairs, 2 * scores)
    assert (ops["av"].flops, ops["av"].bytes) == (2 * pairs * D, scores + 2 * qkv)


def test_a_fused_attention_op_costs_the_same_math_without_the_scores_round_trip() -> None:
    shape = (B, H, S, D)
    model = graph(
        [helper.make_node("Attention", ["q", "k", "v"], ["y"], name="attention")],
        {"q": shape, "k": shape, "v": shape},
        "y",
        opset=23,
    )
    (op,) = costs(model, {"q": shape, "k": shape, "v": shape}).values()
    pairs = B * H * S * S
    assert op.kind == "attention"
    assert op.flops == 2 * pairs * D + 2 * pairs * D + 5 * pairs
    assert op.bytes == 4 * B * H * S * D * 4  # q, k, v read, the result written


def test_a_small_mlp_costs_the_sum_of_its_ops() -> None:
    rows, features, hidden, classes = 4, 32, 64, 10
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["o"], name="mm2"),
        helper.make_node("Add", ["o", "b2"], ["y"], name="add2"),
    ]
    tensors = {
        "w1": weights(features, hidden),
        "b1": weights(hidden),
        "w2": weights(hidden, classes),
        "b2": weights(classes),
    }
    model = graph(nodes, {"x": ("batch", features)}, "y", tensors)
    found = onnx_costs(model, {"x": (rows, features)})
    activations = rows * hidden
    expected_flops = {
        "mm1": 2 * rows * hidden * features,
        "add1": activations,
        "relu": activations,
        "mm2": 2 * rows * classes * hidden,
        "add2": rows * classes,
    }
    expected_bytes = {
        "mm1": 4 * (rows * features + features * hidden + activations),
        "add1": 4 * (2 * activations + hidden),
        "relu": 4 * 2 * activations,
        "mm2": 4 * (activations + hidden * classes + rows * classes),
        "add2": 4 * (2 * rows * classes + classes),
    }
    assert {op.name: op.flops for op in found.ops} == expected_flops
    assert {op.name: op.bytes for op in found.ops} == expected_bytes
    assert found.flops == 22056
    assert found.bytes == sum(expected_bytes.values())


def test_an_int8_matmul_runs_against_the_int8_peak() -> None:
    u8, i8, i32 = (
        Tensor((8, 32), "uint8", 1),
        Tensor((32, 64), "int8", 1),
        Tensor((8, 64), "int32", 4),
    )
    op = op_cost("q", "MatMulInteger", [u8, i8], [i32])
    assert op is not None
    assert (op.kind, op.precision, op.flops) == ("matmul", "int8", 2 * 8 * 64 * 32)
    assert op.bytes == 8 * 32 + 32 * 64 + 8 * 64 * 4


def test_a_gather_reads_the_rows_it_gathers_not_its_table() -> None:
    table, ids = Tensor((30522, 384), "float32", 4), Tensor((2, 5), "int64", 8)
    op = op_cost("embed", "Gather", [table, ids], [Tensor((2, 5, 384), "float32", 4)])
    assert op is not None
    assert (op.flops, op.bytes) == (0, 10 * 8 + 2 * (10 * 384 * 4))


def test_a_view_moves_nothing_and_an_unknown_shape_is_not_guessed() -> None:
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["flat"], name="reshape"),
        helper.make_node("FusedMatMul", ["flat", "w"], ["h"], name="fused", domain="com.microsoft"),
        helper.make_node("Relu", ["h"], ["y"], name="relu"),
    ]
    model = graph(nodes, {"x": (4, 2, 16)}, "y", {"shape": np.array([4, 32]), "w": weights(32, 8)})
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    found = onnx_costs(model, {"x": (4, 2, 16)})
    assert [(op.name, op.flops, op.bytes) for op in found.ops] == [("reshape", 0, 0)]
    assert found.uncosted == ("fused", "relu")  # ONNX does not infer a contrib op's shape


def test_shapes_that_contradict_the_graph_cost_nothing_rather_than_a_guess() -> None:
    model = graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        {"x": ("batch", 32)},
        "y",
        {"w": weights(32, 8)},
    )
    found = onnx_costs(model, {"x": (4, 31)})
    assert (found.ops, found.uncosted) == ((), ("mm",))


def test_dtypes_are_read_at_their_own_size() -> None:
    nodes = [
        helper.make_node("Cast", ["x"], ["half"], name="to_half", to=TensorProto.FLOAT16),
        helper.make_node("Cast", ["half"], ["y"], name="to_float", to=TensorProto.FLOAT),
    ]
    ops = costs(graph(nodes, {"x": (4, 8)}, "y"), {"x": (4, 8)})
    assert (ops["to_half"].kind, ops["to_half"].bytes) == ("data", 4 * 32 + 2 * 32)
    assert ops["to_float"].bytes == 2 * 32 + 4 * 32
