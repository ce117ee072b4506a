"""FLOPs and bytes of the aten ops a torch model calls, from what torch.profiler records of each:
its inputs' shapes and dtypes and its scalar arguments (strides, paddings, kernel sizes).

Each op is costed as the graph op it amounts to (`cost.py`): `aten::linear` as a Gemm (its
weight transposed, its bias added), `aten::conv2d` as a Conv whose output size follows from the
stride, padding and dilation it was called with, `aten::scaled_dot_product_attention` as
attention, `aten::layer_norm` as LayerNormalization. Elementwise ops and copies produce their
inputs' broadcast shape; views move nothing. An op not known here is not costed (its output
shape is not recorded), never guessed.

Sits in profile/: imports numpy and cost; torch is not needed to cost.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from mahir.profile.cost import OpCost, Tensor, op_cost

DTYPES = {
    "float": ("float32", 4), "double": ("float64", 8), "c10::BFloat16": ("bfloat16", 2),
    "c10::Half": ("float16", 2), "long int": ("int64", 8), "int": ("int32", 4),
    "signed char": ("int8", 1), "unsigned char": ("uint8", 1), "bool": ("bool", 1),
    "c10::Float8_e4m3fn": ("float8e4m3fn", 1),
}  # fmt: skip
"""The profiler's dtype names -> numpy's, and bytes per element."""
MATMULS = {"aten::linear", "aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::baddbmm"}
NORMS = {
    "aten::layer_norm": "LayerNormalization", "aten::group_norm": "GroupNormalization",
    "aten::batch_norm": "BatchNormalization", "aten::rms_norm": "RMSNormalization",
    "aten::softmax": "Softmax", "aten::_softmax": "Softmax", "aten::log_softmax": "Softmax",
}  # fmt: skip
"""Ops whose output has their first input's shape, and the graph op they cost as."""
CONVS = {"aten::conv1d", "aten::conv2d", "aten::conv3d", "aten::convolution", "aten::_convolution"}
POOLS = {"aten::max_pool1d", "aten::max_pool2d", "aten::max_pool3d", "aten::avg_pool1d"}
POOLS |= {"aten::avg_pool2d", "aten::avg_pool3d"}
ADAPTIVE_POOLS = {"aten::adaptive_avg_pool1d", "aten::adaptive_avg_pool2d"}
ADAPTIVE_POOLS |= {"aten::adaptive_avg_pool3d", "aten::adaptive_max_pool2d"}
VIEWS = """view reshape permute transpose unsqueeze squeeze expand select slice t detach detach_
    lift_fresh alias resolve_conj resolve_neg flatten unflatten as_strided""".split()
COPIES = "to _to_copy copy_ clone contiguous dropout".split()
"""Ops that write their input again (a dtype or a layout): data movement, no FLOPs."""
POINTWISE = """add sub mul div gelu relu silu tanh sigmoid erf pow where neg exp log sqrt rsqrt
    abs clamp maximum minimum masked_fill eq ne lt gt le ge logical_and logical_not""".split()
"""aten's elementwise ops (in place too: `add_`): one FLOP per output element."""


def aten_cost(
    name: str,
    op: str,
    shapes: Sequence[Any],
    dtypes: Sequence[str],
    scalars: Sequence[Any] = (),
) -> OpCost | None:
    """The cost of one aten op from its recorded input shapes, dtypes and scalar arguments."""
    short = op.removeprefix("aten::")
    if short in VIEWS:
        return op_cost(name, "Reshape", [], [])
    inputs = _inputs(shapes, dtypes)
    tensors = [t for t in inputs if t is not None]
    if not tensors:
        return None
    first, args = tensors[0], list(scalars)
    if op in MATMULS:
        return _matmul(name, op, inputs)
    if op in NORMS:
        return op_cost(name, NORMS[op], tensors, [first])
    if op in CONVS:
        return _conv(name, inputs, args)
    if op in POOLS:
        return _pool(name, first, args, dilation="max" in op)
    if op in ADAPTIVE_POOLS and len(args) > 1 and isinstance(args[1], list):
        size = tuple(int(d) for d in args[1])
        return op_cost(
            name, "ReduceMean", [first], [_like(first, (*first.shape[: -len(size)], *size))]
        )
    if op == "aten::scaled_dot_product_attention" and len(tensors) >= 3:
        q, v = tensors[0], tensors[2]
        return op_cost(
            name, "ScaledDotProductAttention", tensors[:3], [_like(q, (*q.shape[:-1], v.shape[-1]))]
        )
    if op == "aten::embedding" and len(tensors) == 2:
        table, ids = tensors
        return op_cost(name, "Gather", [table, ids], [_like(table, (*ids.shape, table.shape[-1]))])
    pointwise, copy = short.rstrip("_") in POINTWISE, short in COPIES
    if not (pointwise or copy):
        return None
    try:
        shape = tuple(np.broadcast_shapes(*(t.shape for t in tensors)))
    except ValueError:  # inputs that do not broadcast: not the op this count takes it for
        return None
    return op_cost(
        name,
        "Add" if pointwise else "Cast",
        tensors if pointwise else [first],
        [_like(first, shape)],
    )


def _matmul(name: str, op: str, inputs: list[Tensor | None]) -> OpCost | None:
    """A linear, addmm, (b)mm or matmul as a Gemm (with its bias) or a MatMul."""
    if op == "aten::linear":
        x, weight = inputs[0], inputs[1]
        if x is None or weight is None:
            return None
        transposed = _like(weight, weight.shape[::-1])
        out = _like(x, (*x.shape[:-1], weight.shape[0]))
        return op_cost(name, "Gemm", [x, transposed, *inputs[2:3]], [out])
    with_bias = op in ("aten::addmm", "aten::baddbmm")
    bias, (a, b) = (inputs[0], inputs[1:3]) if with_bias else (None, inputs[:2])
    if a is None or b is None or len(a.shape) < 2 or len(b.shape) < 2:
        return None
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    out = _like(a, (*batch, a.shape[-2], b.shape[-1]))
    operands = [a, b, *([bias] if bias else [])]
    return op_cost(name, "Gemm" if bias is not None else "MatMul", operands, [out])


def _conv(name: str, inputs: list[Tensor | None], args: list[Any]) -> OpCost | None:
    """conv(input, weight, bias, stride, padding, dilation, ...): the output's spatial size
    from those; a transposed convolution is not costed here."""
    x, weight = inputs[0], inputs[1] if len(inputs) > 1 else None
    if x is None or weight is None or len(args) < 6 or (len(args) > 6 and args[6] is True):
        return None
    spatial = _spatial(x.shape[2:], weight.shape[2:], args[3], args[4], args[5])
    if spatial is None:
        return None
    out = _like(x, (x.shape[0], weight.shape[0], *spatial))
    return op_cost(name, "Conv", [x, weight, *inputs[2:3]], [out])


def _pool(name: str, x: Tensor, args: list[Any], *, dilation: bool) -> OpCost | None:
    """max_pool(input, kernel, stride, padding, dilation, ceil_mode) and avg_pool(input, kernel,
    stride, padding, ceil_mode, ...): kernel-size reads per output."""
    if len(args) < 4 or not isinstance(args[1], list):
        return None
    kernel = [int(k) for k in args[1]]
    ceil = bool(args[5] if dilation else args[4]) if len(args) > 5 else False
    spatial = _spatial(
        x.shape[-len(kernel) :],
        kernel,
        args[2] or kernel,
        args[3],
        args[4] if dilation else 1,
        ceil=ceil,
    )
    if spatial is None:
        return None
    out = _like(x, (*x.shape[: -len(kernel)], *spatial))
    return op_cost(name, "MaxPool", [x], [out], {"kernel_shape": kernel})


def _spatial(
    size: Sequence[int],
    kernel: Sequence[int],
    stride: Any,
    padding: Any,
    dilation: Any,
    *,
    ceil: bool = False,
) -> tuple[int, ...] | None:
    """Output sizes of a sliding window (PyTorch's formula); "same" and "valid" paddings too."""
    n = len(size)
    if padding == "same":
        return tuple(size)
    pads = [0] * n if padding == "valid" else _per_dim(padding, n)
    strides, dilations = _per_dim(stride, n), _per_dim(dilation, n)
    if pads is None or strides is None or dilations is None or len(kernel) != n:
        return None
    round_ = math.ceil if ceil else math.floor
    return tuple(
        int(round_((s + 2 * p - d * (k - 1) - 1) / st)) + 1
        for s, k, st, p, d in zip(size, kernel, strides, pads, dilations, strict=True)
    )


def _per_dim(value: Any, n: int) -> list[int] | None:
    """An int, or a list of one or `n`, as one int per spatial dim."""
    if isinstance(value, int):
        return [value] * n
    if isinstance(value, list) and len(value) in (1, n):
        return [int(v) for v in value] * (n if len(value) == 1 else 1)
    return None


def _inputs(shapes: Sequence[Any], dtypes: Sequence[str]) -> list[Tensor | None]:
    """The inputs as tensors (None for a scalar, a list or an absent optional input)."""
    found: list[Tensor | None] = []
    for shape, dtype in zip(shapes, dtypes, strict=False):
        known = DTYPES.get(dtype)
        tensor = isinstance(shape, list) and all(isinstance(d, int) for d in shape)
        found.append(Tensor(tuple(shape), *known) if known and tensor else None)
    return found


def _like(tensor: Tensor, shape: Sequence[int]) -> Tensor:
    return Tensor(tuple(int(d) for d in shape), tensor.dtype, tensor.itemsize)
