"""The cost of every node of an ONNX graph at the shapes of one batch.

ONNX's shape inference (with data propagation, so that shapes computed by Shape -> Gather ->
Concat chains resolve) runs on a copy of the graph whose inputs are pinned to the batch's
shapes; each node is then costed (`cost.py`) from its operands' shapes and dtypes, initializers
at their own dtype's size. A node whose shapes stay unknown (a contrib op ONNX does not know, a
shape only data decides) is listed as not costed, never guessed: ONNX Runtime's profiler fills
those from the shapes it ran at (`onnxruntime.py`, through `node_costs`). The file is read
without its external data: shapes and dtypes are all a cost needs.

Sits in profile/: imports onnx (at the top: this room is imported only to profile) and cost.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx import helper, shape_inference

from mahir.errors import BadInput, first_line
from mahir.profile.cost import OpCost, Tensor, op_cost


@dataclass(frozen=True, slots=True)
class GraphCost:
    """Every node's cost, in graph order, and the nodes whose shapes were not known."""

    ops: tuple[OpCost, ...]
    uncosted: tuple[str, ...]

    @property
    def flops(self) -> float:
        return sum(op.flops for op in self.ops)

    @property
    def bytes(self) -> float:
        return sum(op.bytes for op in self.ops)


def dtype_name(elem_type: int) -> str:
    """ONNX's element type as numpy names it ("float32", "int8", "bfloat16")."""
    name = str(onnx.TensorProto.DataType.Name(elem_type)).lower()
    return {"float": "float32", "double": "float64"}.get(name, name)


ITEMSIZES: dict[str, int] = {
    dtype_name(value): helper.tensor_dtype_to_np_dtype(value).itemsize
    for value in onnx.TensorProto.DataType.values()
    if value not in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING)
}
"""Bytes per element of each ONNX element type, by its numpy name."""


def load_graph(path: Path) -> onnx.ModelProto:
    """The ONNX file without its external data, or one line saying it is not one."""
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as err:  # DecodeError, OSError, ...
        raise BadInput(f"{path} is not a readable ONNX model ({first_line(err)})") from err


def onnx_costs(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> GraphCost:
    """Every node's cost when the graph's inputs have `shapes` (name -> dims)."""
    return node_costs(model.graph, infer_values(model, shapes))


def infer_values(
    model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, Tensor]:
    """Every value of the graph whose shape inference resolves, with its inputs at `shapes`."""
    pinned = onnx.ModelProto()
    pinned.CopyFrom(model)
    for value in pinned.graph.input:
        if value.name in shapes:
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for size in shapes[value.name]:
                dims.add().dim_value = int(size)
    try:
        inferred = shape_inference.infer_shapes(pinned, strict_mode=False, data_prop=True)
    except Exception as err:  # InferenceError, ValidationError: shapes that contradict the graph
        raise BadInput(
            f"the graph does not take inputs of {dict(shapes)}: {first_line(err)}"
        ) from err
    graph = inferred.graph
    values = {
        info.name: tensor
        for info in [*graph.input, *graph.value_info, *graph.output]
        if (tensor := _tensor(info)) is not None
    }
    return values | initializer_values(graph)


def node_costs(graph: onnx.GraphProto, values: Mapping[str, Tensor]) -> GraphCost:
    """Each node of `graph` costed from the shapes `values` gives its operands (an optional
    operand left out is None); nodes with an operand not in `values` are not costed."""
    ops, uncosted = [], []
    for node in graph.node:
        op_type = qualified(node.op_type, node.domain)
        inputs = [values.get(name) if name else None for name in node.input]
        missing = any(name and name not in values for name in node.input)
        outputs = [values.get(name) for name in node.output if name]
        cost = None if missing else op_cost(node.name, op_type, inputs, outputs, attributes(node))
        if cost is None:
            uncosted.append(node.name or node.op_type)
        else:
            ops.append(cost)
    return GraphCost(tuple(ops), tuple(uncosted))


def qualified(op_type: str, domain: str) -> str:
    """The op type as `cost.KINDS` knows it: ONNX's own plain, others with their domain."""
    return f"{domain}.{op_type}" if domain not in ("", "ai.onnx") else op_type


def initializer_values(graph: onnx.GraphProto) -> dict[str, Tensor]:
    """The graph's initializers: their own shapes and dtypes."""
    return {init.name: _typed(tuple(init.dims), init.data_type) for init in graph.initializer}


def attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _tensor(info: onnx.ValueInfoProto) -> Tensor | None:
    """A value's concrete shape and dtype, or None while a dim is unknown."""
    kind = info.type.tensor_type
    if not kind.HasField("shape") or not kind.elem_type:
        return None
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in kind.shape.dim]
    if any(d < 0 for d in dims):
        return None
    return _typed(tuple(dims), kind.elem_type)


def _typed(dims: tuple[int, ...], elem_type: int) -> Tensor:
    name = dtype_name(elem_type)
    return Tensor(dims, name, ITEMSIZES.get(name, 4))


if __name__ == "__main__":
    import sys

    found = onnx_costs(load_graph(Path(sys.argv[1])), {})
    print(f"{found.flops / 1e9:.3f} GFLOP, {found.bytes / 1e6:.1f} MB moved")
    print(f"not costed: {', '.join(found.uncosted) or 'none'}")
