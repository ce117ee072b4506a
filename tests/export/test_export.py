from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import onnx
import pytest
import torch

from mahir.errors import ExportMismatch
from mahir.export.onnx import export_onnx, export_openvino, verify
from mahir.model import Model, load_model
from mahir.modules import PositionalInputs
from mahir.types import Artifact
from tests.helpers import TESTS


def _input_dims(path: Path) -> dict[str, list[int | str]]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in graph.input
    }


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_factory_models_export_with_a_dynamic_batch(name: str, tmp_path: Path) -> None:
    model = load_model(f"{TESTS / 'models.py'}:{name}")
    artifact = export_onnx(model, tmp_path / "model.onnx")
    assert artifact.path == tmp_path / "model.onnx"
    assert artifact.path.is_file()
    dims = _input_dims(artifact.path)
    assert all(shape[0] == "batch" for shape in dims.values())
    # export restores training flags it touched; the original must still answer in eval mode
    assert not any(m.training for m in model.module.modules())
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no staging left behind


def test_default_model_exports_with_batch_and_sequence_axes(minilm_onnx: Path) -> None:
    dims = _input_dims(minilm_onnx)
    assert dims["input_ids"] == ["batch", "sequence"]
    assert dims["attention_mask"] == ["batch", "sequence"]


def test_transformers_models_export_with_eager_attention_and_keep_their_own(
    minilm: Model, minilm_onnx: Path
) -> None:
    ops = [n.op_type for n in onnx.load(str(minilm_onnx), load_external_data=False).graph.node]
    # SDPA traces into an IsNaN guard per layer (a fully masked row); eager attention has none.
    assert "IsNaN" not in ops
    assert ops.count("Softmax") == 6
    # The module PyTorch runs (the baseline, torch.compile) keeps its own attention.
    assert minilm.module.model.config._attn_implementation == "sdpa"


def test_verification_uses_shapes_other_than_the_traced_one(minilm: Model, mlp: Model) -> None:
    for model in (minilm, mlp):
        traced = {k: v.shape for k, v in model.example_inputs.items()}
        shapes = [{k: v.shape for k, v in b.items()} for b in model.family.verification_batches()]
        assert len(shapes) >= 3
        assert len({tuple(s.values()) for s in shapes}) == len(shapes)
        assert traced not in shapes
        assert {s[model.spec.input_names[0]][0] for s in shapes} >= {1, 3}


class _BatchMean(torch.nn.Module):
    """Centres each sample on the batch mean, dividing by a batch size read with int(): a
    tracing exporter freezes that number, so the graph is right only at the traced batch size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.sum(0) / int(x.shape[0])


def batch_mean() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    return _BatchMean(), {"x": torch.randn(4, 8)}


def test_a_shape_baked_export_is_caught(tmp_path: Path) -> None:
    model = load_model(f"{Path(__file__)}:batch_mean")
    path = tmp_path / "baked.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the TracerWarning about int() is the bug, unheeded
        torch.onnx.export(
            PositionalInputs(model.module, ("x",)).eval(),
            (torch.from_numpy(model.example_inputs["x"]),),
            str(path),
            input_names=["x"],
            output_names=["output"],
            dynamic_axes={"x": {0: "batch"}, "output": {0: "batch"}},
            dynamo=False,
        )
    baked = Artifact("onnx", model.spec, path=path)
    verify(model, baked, "onnxruntime", what="ONNX export", batches=[model.example_inputs])
    with pytest.raises(
        ExportMismatch, match=r"input shape 1x8: output 'output' differs from the original by up to"
    ):
        verify(model, baked, "onnxruntime", what="ONNX export")


def test_our_exporter_names_the_axis_it_could_not_keep_dynamic(tmp_path: Path) -> None:
    model = load_model(f"{Path(__file__)}:batch_mean")
    with pytest.raises(ExportMismatch, match=r"fixed axis 0 \(batch\) of input 'x' at 4"):
        export_onnx(model, tmp_path / "model.onnx")
    assert not list(tmp_path.iterdir())


def test_a_mismatching_export_leaves_nothing_behind(tmp_path: Path) -> None:
    model = load_model(f"{TESTS / 'models.py'}:noisy")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("written before")
    with pytest.raises(ExportMismatch, match="output 'output' differs"):
        export_onnx(model, out / "model.onnx")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_openvino_ir_is_verified_and_kept_fp32(mlp: Model, tmp_path: Path) -> None:
    onnx_artifact = export_onnx(mlp, tmp_path / "model.onnx")
    ir = export_openvino(mlp, onnx_artifact, tmp_path / "ov" / "model.xml")
    assert ir.format == "openvino"
    assert ir.path is not None
    weights = sum(p.numel() for p in mlp.module.parameters())
    assert ir.path.with_suffix(".bin").stat().st_size >= 4 * weights  # not compressed to fp16
