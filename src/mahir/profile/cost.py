"""What one op costs at concrete shapes: FLOPs and bytes moved, the two axes of a roofline.

FLOPs count 2 per multiply-add (int8 ops: 2 integer operations per multiply-add):
    matmul     2 * out * K, K the contracted size (read from the shapes, so transposed and
               fused forms need no attributes); Gemm adds 1 per output for its C
    conv       2 * out * (weights / output channels), i.e. 2 * out * Cin/groups * kH * kW
    attention  2*B*h*S*L*d (QK^T) + 2*B*h*S*L*dv (AV) + 5*B*h*S*L (softmax), plus the input
               projection of ONNX Runtime's Attention
    norm       per element of the input: layer norm 7 (mean, subtract, square, variance,
               scale by 1/std, gamma, beta), RMS norm 4, batch norm 2 (a scale and a shift)
    softmax    5 per element (max, subtract, exp, sum, divide)
    elementwise, reduce, pool   1 per output element (an activation too: erf-GELU is one)
    data, gather, view          0: they move bytes, or nothing
Bytes are every input read and every output written once at its dtype's size, weights included:
an upper bound on what one op moves, exact for an op whose operands are not in cache. A gather
reads only the rows it gathers (its output's size), not its table; a view (Reshape, Squeeze,
Shape) moves nothing.

Op types are ONNX's (`MatMul`, `LayerNormalization`), ONNX Runtime's contrib ops with their
domain (`com.microsoft.FusedMatMul`) and OpenVINO's (`Convolution`, `MVN`): the graph readers
(`onnx_graph.py`, `openvino.py`) and the torch profiler (`pytorch.py`) hand their ops here.

Sits in profile/: imports nothing of mahir.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MS = "com.microsoft."

_OPS = {
    "matmul": """MatMul Gemm MatMulInteger QLinearMatMul FullyConnected ms.FusedMatMul ms.FusedGemm
        ms.MatMulIntegerToFloat ms.DynamicQuantizeMatMul ms.QGemm ms.MatMulNBits
        ms.QLinearMatMul""",
    "conv": """Conv ConvInteger QLinearConv Convolution GroupConvolution ConvTranspose
        ConvolutionBackpropData GroupConvolutionBackpropData ms.FusedConv ms.QLinearConv
        ms.nchwc.Conv""",
    "attention": """Attention ScaledDotProductAttention ms.Attention ms.MultiHeadAttention
        ms.QAttention""",
    "norm": """LayerNormalization RMSNormalization SimplifiedLayerNormalization BatchNormalization
        InstanceNormalization GroupNormalization LpNormalization MVN NormalizeL2
        BatchNormInference ms.SkipLayerNormalization ms.SimplifiedLayerNormalization
        ms.SkipSimplifiedLayerNormalization ms.EmbedLayerNormalization""",
    "softmax": "Softmax LogSoftmax ms.BiasSoftmax",
    "reduce": """ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2
        ReduceSumSquare ReduceLogSumExp ArgMax ArgMin TopK CumSum MaxPool AveragePool AvgPool
        GlobalAveragePool GlobalMaxPool""",
    "gather": "Gather GatherND GatherElements ms.GatherBlockQuantized",
    "data": """Transpose Concat Concatenation Split VariadicSplit Slice StridedSlice Pad Tile
        Expand Broadcast Cast CastLike Convert Resize Interpolate Upsample DepthToSpace
        SpaceToDepth ScatterND ScatterElements ScatterNDUpdate Range ConstantOfShape OneHot
        NonZero Reorder Trilu ms.nchwc.ReorderInput ms.nchwc.ReorderOutput""",
    "view": """Reshape Squeeze Unsqueeze Flatten Identity Shape ShapeOf Size Constant Parameter
        Result Dropout""",
    "elementwise": """Add Sub Subtract Mul Multiply Div Divide Pow Power Max Maximum Min Minimum
        Mean Sum SquaredDifference Relu LeakyRelu PRelu Sigmoid HardSigmoid HSigmoid Tanh Exp
        Log Sqrt Reciprocal Neg Negative Abs Erf Gelu Clip Clamp Where Select Equal NotEqual
        Less Greater LessOrEqual GreaterOrEqual LessEqual GreaterEqual And Or Not Xor
        LogicalAnd LogicalOr LogicalNot HardSwish HSwish Swish Softplus SoftPlus Softsign Elu
        Selu Celu Mish Sin Cos Floor Ceil Ceiling Round Sign IsNaN IsInf Mod FloorMod
        QuantizeLinear DequantizeLinear DynamicQuantizeLinear FakeQuantize Eltwise MulAdd
        ms.BiasGelu ms.FastGelu ms.Gelu ms.QuickGelu ms.BiasAdd ms.BiasSplitGelu
        ms.QuantizeLinear ms.DequantizeLinear ms.DynamicQuantizeLinear""",
}
"""Each kind's op types; `ms.` stands for ONNX Runtime's contrib domain, `com.microsoft.`."""
KINDS = {op.replace("ms.", MS, 1): kind for kind, ops in _OPS.items() for op in ops.split()}
"""Op type -> its kind: how it is costed; a type not here is "other" (0 FLOPs, its bytes)."""
NORM_FLOPS = {
    "LayerNormalization": 7,
    "InstanceNormalization": 7,
    "GroupNormalization": 7,
    "MVN": 5,
    MS + "SkipLayerNormalization": 8,
    MS + "EmbedLayerNormalization": 8,
    "RMSNormalization": 4,
    "SimplifiedLayerNormalization": 4,
    MS + "SimplifiedLayerNormalization": 4,
    MS + "SkipSimplifiedLayerNormalization": 5,
    "NormalizeL2": 3,
    "LpNormalization": 3,
}
"""FLOPs per input element of each normalisation (see the module's table); others 2."""
SOFTMAX_FLOPS = 5
WEIGHT_INPUT = {"QLinearConv": 3, MS + "QLinearConv": 3}
"""Where a conv's weights are among its inputs when not second."""
TABLE_INPUTS = {MS + "EmbedLayerNormalization": (2, 3, 4)}
"""Inputs that are tables an op gathers rows from (besides a gather's first)."""
INT8 = frozenset({"int8", "uint8", "i8", "u8"})
LOW_FLOATS = {"float16": "fp16", "f16": "fp16", "bfloat16": "bf16", "bf16": "bf16"}
FP8 = frozenset({"float8e4m3fn", "float8e5m2", "f8e4m3", "f8e5m2"})


@dataclass(frozen=True, slots=True)
class Tensor:
    """A tensor at a concrete shape: its dims, its dtype's name and its element's bytes."""

    shape: tuple[int, ...]
    dtype: str
    itemsize: int

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.elements * self.itemsize


@dataclass(frozen=True, slots=True)
class OpCost:
    """One op: its name and type, how it was costed, and its FLOPs and bytes moved."""

    name: str
    op_type: str
    kind: str
    flops: float
    bytes: float
    precision: str
    """What its multiplies run in: fp32, bf16, fp16, fp8 or int8."""


def kind_of(op_type: str) -> str:
    return KINDS.get(op_type, "other")


def op_cost(
    name: str,
    op_type: str,
    inputs: Sequence[Tensor | None],
    outputs: Sequence[Tensor | None],
    attrs: Mapping[str, Any] | None = None,
) -> OpCost | None:
    """The cost of one op from its inputs' and outputs' shapes (None for an absent optional
    input) and its attributes; None when a shape the count needs is unknown."""
    kind = kind_of(op_type)
    if kind == "view":
        return OpCost(name, op_type, kind, 0.0, 0.0, "fp32")
    present = [t for t in inputs if t is not None]
    if not outputs or any(t is None for t in outputs) or not present:
        return None
    out = [t for t in outputs if t is not None]
    flops = _flops(kind, op_type, list(inputs), out[0], dict(attrs or {}))
    moved = _bytes(kind, op_type, list(inputs), out)
    return OpCost(name, op_type, kind, float(flops), float(moved), precision_of(kind, present))


def precision_of(kind: str, inputs: Sequence[Tensor]) -> str:
    """int8 for a matmul, conv or attention with an 8-bit integer operand, else the lowest
    float precision among its inputs."""
    dtypes = {t.dtype for t in inputs}
    if kind in ("matmul", "conv", "attention") and dtypes & INT8:
        return "int8"
    if dtypes & FP8:
        return "fp8"
    low = [LOW_FLOATS[d] for d in dtypes if d in LOW_FLOATS]
    return low[0] if low else "fp32"


def _flops(
    kind: str, op_type: str, inputs: list[Tensor | None], out: Tensor, attrs: dict[str, Any]
) -> int:
    first = inputs[0]
    if kind == "matmul":
        extra = out.elements if op_type.endswith("Gemm") and len(inputs) > 2 and inputs[2] else 0
        return 2 * out.elements * _contracted(op_type, inputs, out, attrs) + extra
    if kind == "conv":
        return _conv(op_type, inputs, out)
    if kind == "attention":
        return _attention(op_type, inputs, out, attrs)
    if kind == "norm" and first is not None:
        return NORM_FLOPS.get(op_type, 2) * first.elements
    if kind == "softmax":
        return SOFTMAX_FLOPS * out.elements
    if kind == "reduce" and first is not None:
        window = attrs.get("kernel_shape") or attrs.get("kernel")
        return out.elements * math.prod(window) if window else first.elements
    return out.elements if kind == "elementwise" else 0


def _contracted(
    op_type: str, inputs: list[Tensor | None], out: Tensor, attrs: dict[str, Any]
) -> int:
    """K of a matmul: its first operand's matrix over the output's rows, which holds however
    the operands are transposed; MatMulNBits says K, its weights being packed."""
    if "K" in attrs:
        return int(attrs["K"])
    a = inputs[0]
    if a is None or not a.shape:
        return 0
    if len(a.shape) == 1 or len(out.shape) < 2:
        return a.shape[-1]
    return a.shape[-1] * a.shape[-2] // max(1, out.shape[-2])


def _conv(op_type: str, inputs: list[Tensor | None], out: Tensor) -> int:
    """2 * out * (weights per output channel); a transposed conv: per input element instead."""
    weights = inputs[WEIGHT_INPUT.get(op_type, 1)]
    first = inputs[0]
    if weights is None or first is None or len(out.shape) < 2:
        return 0
    if "Transpose" in op_type or "Backprop" in op_type:
        return 2 * first.elements * weights.elements // max(1, first.shape[1])
    return 2 * out.elements * weights.elements // max(1, out.shape[1])


def _attention(
    op_type: str, inputs: list[Tensor | None], out: Tensor, attrs: dict[str, Any]
) -> int:
    """Scores and weighted sum (and softmax) over every query-key pair; ONNX Runtime's
    Attention also projects its input to Q, K and V."""
    q, k = inputs[0], inputs[1] if len(inputs) > 1 else None
    if q is None or k is None:
        return 0
    if op_type in (MS + "Attention", MS + "QAttention"):  # input [B,S,Hin], weights [Hin, 3H]
        b, s = q.shape[0], q.shape[1]
        heads = int(attrs.get("num_heads", 1))
        return 2 * b * s * k.elements + _sdpa(
            b, heads, s, s, out.shape[-1] // heads, out.shape[-1] // heads
        )
    v = inputs[2] if len(inputs) > 2 and inputs[2] is not None else k
    if len(q.shape) == 4:  # [B, heads, S, d], keys [B, kv_heads, L, d]
        b, heads, s, d = q.shape
        return _sdpa(b, heads, s, k.shape[-2], d, v.shape[-1])
    heads = int(attrs.get("num_heads") or attrs.get("q_num_heads") or 1)
    length = k.shape[1] if len(k.shape) == 3 else k.shape[-2]
    b, s, width = q.shape[0], q.shape[1], q.shape[-1]
    return _sdpa(b, heads, s, length, width // heads, out.shape[-1] // heads)


def _sdpa(b: int, heads: int, s: int, length: int, d: int, dv: int) -> int:
    pairs = b * heads * s * length
    return 2 * pairs * d + 2 * pairs * dv + SOFTMAX_FLOPS * pairs


def _bytes(kind: str, op_type: str, inputs: list[Tensor | None], outputs: list[Tensor]) -> int:
    written = sum(t.nbytes for t in outputs)
    tables = (0,) if kind == "gather" else TABLE_INPUTS.get(op_type, ())
    read = sum(
        (outputs[0].nbytes if i in tables else t.nbytes)
        for i, t in enumerate(inputs)
        if t is not None
    )
    return read + written
