"""Each runtime's own profiler on a wide MLP (matmuls of ~0.13 GFLOP): every op it ran, timed,
summing to within 20% of the same calls timed apart from the profiler, and costed as the graph
counts them. One thread: the checks are about what the profilers see, and a single thread keeps
them steady on a shared machine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mahir.profile.breakdown import Breakdown
from mahir.profile.onnx_graph import load_graph, onnx_costs
from mahir.runtimes import open_session
from mahir.types import Artifact, RuntimeOptions
from tests.profile.graphs import WIDE, wide_mlp_onnx, wide_mlp_torch

ROWS = 64
ONE_THREAD = RuntimeOptions(threads=1)
RUNS, SECONDS = 8, 0.2


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    return wide_mlp_onnx(tmp_path_factory.mktemp("wide") / "wide.onnx")


def batch(name: str = "x") -> dict[str, np.ndarray]:
    return {name: np.random.default_rng(0).standard_normal((ROWS, WIDE[0])).astype(np.float32)}


def graph_flops(artifact: Artifact) -> float:
    return onnx_costs(load_graph(Path(str(artifact.path))), {"x": (ROWS, WIDE[0])}).flops


def check(found: Breakdown) -> None:
    """Ops found, each timed; their sum within 20% of the calls; the matmuls costed."""
    assert found.ops
    assert all(op.seconds >= 0 for op in found.ops)
    assert 0.8 <= found.coverage <= 1.2, (found.op_seconds, found.call_s)
    assert found.latency.p50_ms > 0
    matmuls = [op for op in found.ops if op.cost is not None and op.cost.kind == "matmul"]
    assert len(matmuls) == 2
    width, hidden = WIDE
    assert {round(op.cost.flops, -6) for op in matmuls if op.cost} == {
        round(2 * ROWS * width * hidden, -6)
    }


def test_onnxruntime_breaks_a_call_down_by_the_nodes_it_ran(wide: Artifact, tmp_path: Path) -> None:
    from mahir.profile.onnxruntime import profile_onnxruntime

    found = profile_onnxruntime(
        wide, ONE_THREAD, batch(), runs=RUNS, seconds=SECONDS, folder=tmp_path
    )
    check(found)
    assert {op.exec_type for op in found.ops} == {"CPU"}
    costed = sum(op.cost.flops for op in found.ops if op.cost)
    assert costed == pytest.approx(graph_flops(wide), rel=0.01)  # fused ops keep the math
    assert found.trace
    assert {"name", "ts", "dur"} <= set(found.trace[-1])


def test_openvino_breaks_a_call_down_by_its_executed_nodes(wide: Artifact) -> None:
    from mahir.profile.openvino import profile_openvino

    found = profile_openvino(wide, ONE_THREAD, batch(), runs=RUNS, seconds=SECONDS)
    check(found)
    costed = sum(op.cost.flops for op in found.ops if op.cost)
    assert costed == pytest.approx(graph_flops(wide), rel=0.01)  # every IR op lands
    assert {op.computes_in for op in found.ops if op.op_type == "FullyConnected"} == {"fp32"}
    assert all("f32" in op.exec_type.lower() for op in found.ops if op.op_type == "FullyConnected")
    assert found.trace is None


def test_torch_breaks_a_call_down_by_the_ops_the_model_called() -> None:
    from mahir.profile.pytorch import profile_torch

    session = open_session("torch", wide_mlp_torch(), ONE_THREAD)
    found = profile_torch(session, batch("input"), runs=RUNS, seconds=SECONDS)
    check(found)
    kinds = {op.op_type: op.cost.kind for op in found.ops if op.cost}
    assert kinds["aten::linear"] == "matmul"
    assert kinds["aten::layer_norm"] == "norm"
    assert found.trace
    assert any(event.get("name") == "aten::linear" for event in found.trace)
    assert found.gpu is None


@pytest.mark.gpu
def test_torch_on_a_gpu_times_kernels_and_counts_launches() -> None:
    from mahir.profile.pytorch import profile_torch
    from mahir.types import Device

    gpu = RuntimeOptions(device=Device("cuda"))
    session = open_session("torch", wide_mlp_torch(), gpu)
    found = profile_torch(session, batch("input"), runs=RUNS, seconds=SECONDS)
    assert found.gpu is not None
    assert found.gpu.kernels >= 4  # two matmuls, the activation, the norm
    assert 0 < found.gpu.kernel_s <= found.call_s
    assert found.gpu.launch_s > 0
    assert found.op_seconds == pytest.approx(found.gpu.kernel_s, rel=0.2)  # ops: their kernels
    linears = [op for op in found.ops if op.op_type == "aten::linear"]
    assert len(linears) == 2
    assert all(op.seconds > 0 and op.exec_type == "cuda:0" for op in linears)
