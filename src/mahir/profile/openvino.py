"""OpenVINO's per-node performance counters, joined to the IR's ops.

A session compiled with `PERF_COUNT` reports, after each call, every node the CPU plugin ran:
its type, its real time and its primitive (`brgemm_avx512_f32`, `jit_avx512_I8`: the ISA and the
precision it ran in). Those nodes are the plugin's own graph (`runtime_model()`): a
FullyConnected that absorbed a MatMul, its bias and its activation; a Subgraph that runs a whole
attention block. Each names, in `originalLayersNames`, the IR ops it fused. So the IR is read
again, reshaped to the batch's shapes (static, so every op's shapes are known) and costed op by
op; an executed node's FLOPs are the sum of its IR ops', and its bytes what the node itself
reads and writes at the shapes it ran at. An IR op no executed node names (the plugin renamed
it while fusing) is counted with the node that holds its nearest consumer, so every op's FLOPs
land somewhere. OpenVINO gives no trace file.

Sits in profile/: imports openvino's runtime module, cost and breakdown.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import openvino as ov

from mahir.errors import RuntimeFailure
from mahir.profile.breakdown import (
    WARMUP_RUNS,
    Breakdown,
    OpTime,
    median_times,
    paired,
    time_latency,
    timed,
)
from mahir.profile.cost import OpCost, Tensor, kind_of, op_cost
from mahir.runtimes.openvino import open_session
from mahir.types import Artifact, Inputs, RuntimeOptions

DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "f64": "float64", "i8": "int8"}
DTYPES |= {"u8": "uint8", "i32": "int32", "i64": "int64", "boolean": "bool", "u1": "bool"}
PRECISIONS = {"f32": "fp32", "bf16": "bf16", "f16": "fp16", "i8": "int8", "u8": "int8"}
"""OpenVINO's runtime precision -> the peak an op runs against."""


def profile_openvino(
    artifact: Artifact, options: RuntimeOptions, batch: Inputs, *, runs: int, seconds: float
) -> Breakdown:
    """Counters of `runs` calls on `batch` (after `WARMUP_RUNS`), each call timed, and the same
    call timed after with the counters still on (they cost a few microseconds a node).

    The CPU plugin reports each node's mean over every call since compiling (`PerfCount::avg`
    in its source), in whole microseconds: a call's own time is the difference of the totals
    before and after it (off by the mean's rounding, a few microseconds a node, as often up as
    down), and each op's time its median over the calls, as for the other runtimes."""
    session = open_session(artifact, options, profiling=True)
    for _ in range(WARMUP_RUNS):
        session.run(batch)
    previous = _totals(session.profiling_info(), WARMUP_RUNS)
    per_call: list[dict[str, float]] = []
    calls: list[float] = []
    for count in range(WARMUP_RUNS + 1, WARMUP_RUNS + runs + 1):
        calls.append(timed(session, batch))
        infos = session.profiling_info()
        totals = _totals(infos, count)
        per_call.append({n: max(0.0, t - previous.get(n, 0.0)) for n, t in totals.items()})
        previous = totals
    if not previous:
        raise RuntimeFailure("OpenVINO reported no executed nodes: nothing to break down")
    latency = time_latency(session, batch, seconds)
    costs = executed_costs(session.runtime_model(), *ir_costs(Path(str(artifact.path)), batch))
    precisions = _precisions(session.runtime_model())
    ran = {p.node_name: p for p in infos}
    ops = tuple(
        OpTime(
            name,
            ran[name].node_type,
            seconds_,
            costs.get(name),
            ran[name].exec_type,
            precisions.get(name),
        )
        for name, seconds_ in median_times(per_call).items()
    )
    return Breakdown(ops, latency, paired(per_call, calls), session.describe())


def _totals(infos: list[ov.ProfilingInfo], calls: int) -> dict[str, float]:
    """Seconds each executed node took over all `calls` since compiling."""
    return {
        p.node_name: p.real_time.total_seconds() * calls
        for p in infos
        if p.status == p.Status.EXECUTED
    }


def ir_costs(path: Path, batch: Inputs) -> tuple[dict[str, OpCost], dict[str, list[str]]]:
    """Every op of the IR (or ONNX file) at the batch's shapes, by name, and each op's
    consumers."""
    model = ov.Core().read_model(str(path))
    model.reshape({name: ov.PartialShape(list(array.shape)) for name, array in batch.items()})
    costs, consumers = {}, {}
    for op in model.get_ordered_ops():
        name = op.get_friendly_name()
        inputs = [_tensor(port) for port in op.inputs()]
        outputs = [_tensor(port) for port in op.outputs()]
        cost = op_cost(name, op.get_type_name(), inputs, outputs, _attributes(op))
        if cost is not None:
            costs[name] = cost
        consumers[name] = [
            target.get_node().get_friendly_name()
            for port in op.outputs()
            for target in port.get_target_inputs()
        ]
    return costs, consumers


def executed_costs(
    runtime: ov.Model, costs: Mapping[str, OpCost], consumers: Mapping[str, list[str]]
) -> dict[str, OpCost]:
    """Each executed node's cost: its IR ops' FLOPs (see the module's note on renamed ops),
    the bytes it moves itself."""
    nodes = {op.get_friendly_name(): op for op in runtime.get_ordered_ops()}
    owner = {
        original: name
        for name, node in nodes.items()
        for original in _info(node, "originalLayersNames").split(",")
        if original
    }
    for name in costs:
        if name not in owner and (holder := _nearest_owner(name, owner, consumers)):
            owner[name] = holder
    members: dict[str, list[OpCost]] = {}
    for original, name in owner.items():
        if original in costs:
            members.setdefault(name, []).append(costs[original])
    return {name: _group(name, nodes[name], members.get(name, [])) for name in nodes}


def _nearest_owner(
    name: str, owner: Mapping[str, str], consumers: Mapping[str, list[str]]
) -> str | None:
    """The executed node holding the first owned op downstream of `name`, breadth first."""
    queue, seen = deque(consumers.get(name, ())), {name}
    while queue:
        current = queue.popleft()
        if current in owner:
            return owner[current]
        if current not in seen:
            seen.add(current)
            queue.extend(consumers.get(current, ()))
    return None


def _group(name: str, node: Any, members: list[OpCost]) -> OpCost:
    """One executed node: its members' FLOPs; the bytes of its own operands, where their
    shapes are static, else its members'."""
    layer = _info(node, "layerType")
    own = op_cost(
        name, layer, [_tensor(p) for p in node.inputs()], [_tensor(p) for p in node.outputs()]
    )
    flops = sum(m.flops for m in members)
    moved = own.bytes if own is not None else sum(m.bytes for m in members)
    kinds = {m.kind for m in members if m.flops}
    if {"matmul", "softmax"} <= kinds:
        kind = "attention"  # a fused attention block: QK^T, softmax, AV in one node
    elif members and flops:
        kind = max(members, key=lambda m: m.flops).kind
    else:
        kind = kind_of(layer)
    precision = PRECISIONS.get(_info(node, "runtimePrecision"), "fp32")
    return OpCost(name, layer, kind, flops, moved, precision)


def _precisions(runtime: ov.Model) -> dict[str, str]:
    return {
        op.get_friendly_name(): PRECISIONS.get(_info(op, "runtimePrecision"), "fp32")
        for op in runtime.get_ordered_ops()
    }


def _info(node: Any, key: str) -> str:
    info = node.get_rt_info()
    return str(info[key].astype(str)) if key in info else ""


def _tensor(port: Any) -> Tensor | None:
    shape = port.get_partial_shape()
    if shape.rank.is_dynamic or not shape.is_static:
        return None
    kind = port.get_element_type()
    name = kind.get_type_name()
    return Tensor(
        tuple(int(d) for d in shape.to_shape()), DTYPES.get(name, name), max(1, kind.bitwidth // 8)
    )


def _attributes(op: Any) -> dict[str, Any]:
    try:
        return dict(op.get_attributes())
    except Exception:  # an op whose attributes Python cannot read (a custom op): cost without
        return {}
