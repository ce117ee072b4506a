"""Graph passes change the graph the way they say and leave the answers as they were."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest

from mahir.errors import Unsupported
from mahir.model import Model
from mahir.passes import PassContext, run_pass
from mahir.passes.graph import OrtOptimize, Simplify, TransformerFusion
from mahir.quality import fidelity
from mahir.runtimes import open_session
from mahir.types import Artifact


def _ops(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("config", "runtimes"),
    [
        (OrtOptimize("basic"), ("onnxruntime", "openvino")),
        (OrtOptimize("extended"), ("onnxruntime",)),
        (TransformerFusion(), ("onnxruntime",)),
        (Simplify(), ("onnxruntime", "openvino")),
    ],
)
def test_graph_pass_keeps_the_answers(
    config: object,
    runtimes: tuple[str, ...],
    minilm: Model,
    minilm_onnx: Path,
    minilm_eval: tuple[list, list],
    tmp_path: Path,
) -> None:
    before = _digest(minilm_onnx)
    source = Artifact("onnx", minilm.spec, path=minilm_onnx)
    artifact = run_pass(source, config, PassContext(model=minilm, workdir=tmp_path))
    assert artifact.path is not None
    assert artifact.path.parent == tmp_path
    assert _digest(minilm_onnx) == before  # the input is never modified
    batches, reference = minilm_eval
    for runtime in runtimes:
        quality = fidelity(minilm, open_session(runtime, artifact), batches, reference)
        assert quality.embedding is not None
        assert quality.embedding.cosine_min > 0.9999, runtime
        assert quality.outputs["last_hidden_state"].max_abs_err < 1e-3


def test_transformer_fusion_fuses_layer_norm_and_gelu(
    minilm: Model, minilm_onnx: Path, tmp_path: Path
) -> None:
    source = Artifact("onnx", minilm.spec, path=minilm_onnx)
    artifact = run_pass(source, TransformerFusion(), PassContext(model=minilm, workdir=tmp_path))
    ops = _ops(artifact.path)  # type: ignore[arg-type]
    assert ops.get("SkipLayerNormalization", 0) >= 6  # two per layer in a 6-layer encoder
    assert ops.get("BiasGelu", 0) + ops.get("FastGelu", 0) + ops.get("Gelu", 0) >= 6
    assert artifact.meta["steps"][-1]["fused"]["SkipLayerNormalization"] >= 6


def test_extended_optimization_and_simplify_shrink_the_graph(
    minilm: Model, minilm_onnx: Path, tmp_path: Path
) -> None:
    source = Artifact("onnx", minilm.spec, path=minilm_onnx)
    nodes = sum(_ops(minilm_onnx).values())
    for config in (OrtOptimize("extended"), Simplify()):
        ctx = PassContext(model=minilm, workdir=tmp_path / type(config).__name__)
        out = run_pass(source, config, ctx)
        assert sum(_ops(out.path).values()) < nodes  # type: ignore[arg-type]


def test_fusion_needs_a_known_architecture(mlp: Model, tmp_path: Path) -> None:
    from mahir.export.onnx import export_onnx

    onnx_artifact = export_onnx(mlp, tmp_path / "mlp.onnx")
    ctx = PassContext(model=mlp, workdir=tmp_path / "fused")
    with pytest.raises(Unsupported, match="known architecture"):
        run_pass(onnx_artifact, TransformerFusion(), ctx)


def test_cnn_graph_passes_keep_answers(cnn: Model, tmp_path: Path) -> None:
    from mahir.runtimes import reference_outputs

    batches = cnn.family.verification_batches()
    reference = reference_outputs(cnn, batches)
    for config in (OrtOptimize("all"), Simplify()):
        ctx = PassContext(model=cnn, workdir=tmp_path / type(config).__name__)
        artifact = run_pass(cnn.original(), config, ctx)  # converts torch -> onnx first
        got = [open_session("onnxruntime", artifact).run(b)["output"] for b in batches]
        for g, r in zip(got, reference, strict=True):
            np.testing.assert_allclose(g, r["output"], rtol=1e-4, atol=1e-4)
