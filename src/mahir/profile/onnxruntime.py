"""ONNX Runtime's own profiler, joined to the graph it ran.

A session opened with profiling (`runtimes.onnxruntime.open_session(profile=...)`) records one
event per node per run, with the shapes and dtypes the node's activations had, and writes the
graph it runs after its fusions. Each node of that graph is costed (`onnx_graph.node_costs`)
with the batch's shapes for the graph's inputs, the initializers' own shapes (the profile leaves
out weights a kernel has pre-packed) and, for everything else, the output shapes the profile
recorded: the graph ONNX Runtime ran, op by op, at the shapes it ran at, fused ops (FusedMatMul,
SkipLayerNormalization, BiasGelu) included. The profile file is itself a Chrome trace.

Sits in profile/: imports onnxruntime's runtime module, onnx_graph and breakdown.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

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
from mahir.profile.cost import Tensor
from mahir.profile.onnx_graph import (
    ITEMSIZES,
    initializer_values,
    load_graph,
    node_costs,
    qualified,
)
from mahir.runtimes.onnxruntime import OPTIMIZED, open_session
from mahir.types import Artifact, Inputs, RuntimeOptions

KERNEL = "_kernel_time"


def profile_onnxruntime(
    artifact: Artifact,
    options: RuntimeOptions,
    batch: Inputs,
    *,
    runs: int,
    seconds: float,
    folder: Path,
) -> Breakdown:
    """Profile `runs` calls on `batch` (after `WARMUP_RUNS`), each timed, then time the same
    call with the profiler off for about `seconds`."""
    session = open_session(artifact, options, profile=folder)
    calls = [timed(session, batch) for _ in range(WARMUP_RUNS + runs)][WARMUP_RUNS:]
    events = json.loads(session.end_profiling().read_text())
    latency = time_latency(session, batch, seconds)
    per_run = _runs(events)[WARMUP_RUNS:]
    if not any(per_run) or len(per_run) != len(calls):
        raise RuntimeFailure(
            f"ONNX Runtime's profile holds {len(per_run)} runs of node events for {len(calls)} "
            "calls: nothing to break down"
        )
    seconds_per_run = [{name: e["dur"] / 1e6 for name, e in run.items()} for run in per_run]
    times = median_times(seconds_per_run)
    last = per_run[-1]
    graph = load_graph(folder / OPTIMIZED).graph
    values = _values(graph, batch, last)
    costs = {op.name: op for op in node_costs(graph, values).ops}
    domains = {node.name: node.domain for node in graph.node}
    ops = tuple(
        OpTime(
            name,
            qualified(last[name]["args"]["op_name"], domains.get(name, "")),
            seconds_,
            costs.get(name),
            last[name]["args"].get("provider", "").removesuffix("ExecutionProvider"),
        )
        for name, seconds_ in times.items()
        if name in last
    )
    pairs = paired(seconds_per_run, calls)
    return Breakdown(ops, latency, pairs, session.describe(), trace=events)


def _runs(events: list[dict[str, Any]]) -> list[dict[str, dict[str, Any]]]:
    """The node events of each run (between a run's start and end), by node name."""
    starts = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    runs: list[dict[str, dict[str, Any]]] = [{} for _ in starts]
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith(KERNEL):
            continue
        index = next((i for i, (a, b) in enumerate(starts) if a <= event["ts"] <= b), None)
        if index is not None:
            args = event.get("args", {})
            name = (
                event["name"].removesuffix(KERNEL)
                or f"{args.get('op_name')}#{args.get('node_index')}"
            )
            runs[index][name] = event
    return runs


def _values(graph: Any, batch: Inputs, run: Mapping[str, dict[str, Any]]) -> dict[str, Tensor]:
    """Shapes of the graph's values: its inputs' from the batch, its initializers' own, and
    every node's outputs as the profile recorded them."""
    values = {name: _array(array) for name, array in batch.items()} | initializer_values(graph)
    for node in graph.node:
        event = run.get(node.name)
        if event is None:
            continue
        recorded = event["args"].get("output_type_shape", [])
        for output, typed in zip([o for o in node.output if o], recorded, strict=False):
            ((dtype, dims),) = typed.items()
            name = "float32" if dtype == "float" else dtype
            values[output] = Tensor(tuple(dims), name, ITEMSIZES.get(name, 4))
    return values


def _array(array: np.ndarray) -> Tensor:
    return Tensor(tuple(array.shape), array.dtype.name, array.dtype.itemsize)
