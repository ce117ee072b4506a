from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mahir.errors import ExportMismatch
from mahir.export.openvino_direct import export_openvino_direct, tidy_views
from mahir.model import Model, load_model


def _ops(path: Path) -> list[object]:
    import openvino as ov

    return list(ov.Core().read_model(str(path)).get_ordered_ops())


def test_minilm_converts_with_one_attention_op_a_broadcast_mask_and_constant_reshapes(
    minilm: Model, tmp_path: Path
) -> None:
    ir = export_openvino_direct(minilm, minilm.original(), tmp_path / "ov" / "model.xml")
    assert ir.path is not None
    ops = _ops(ir.path)
    attention = [op for op in ops if op.get_type_name() == "ScaledDotProductAttention"]
    assert len(attention) == 6  # one per layer, not MatMul-Softmax-MatMul
    mask = attention[0].get_input_partial_shape(3)
    assert mask.rank.get_length() == 4
    assert mask[1].get_length() == mask[2].get_length() == 1  # [batch, 1, 1, keys]
    reshapes = [op for op in ops if op.get_type_name() == "Reshape"]
    assert reshapes
    assert all(op.input_value(1).get_node().get_type_name() == "Constant" for op in reshapes)
    heads = [
        op.get_output_partial_shape(0)
        for op in reshapes
        if op.get_output_partial_shape(0).rank.get_length() == 4
    ]
    assert all(shape[2].get_length() == 12 for shape in heads)
    # The module PyTorch runs keeps its own attention.
    assert minilm.module.model.config._attn_implementation == "sdpa"


class _Heads(torch.nn.Module):
    """Splits features into heads the way transformers 5 does (sizes from the input, a -1),
    with a view to the shape it already has in between."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = x.view(*x.shape[:-1], -1, 4).transpose(1, 2)
        same = heads.view(heads.shape)
        return same.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1) * 2


def test_views_are_tidied_without_changing_the_answer() -> None:
    x = torch.randn(2, 5, 8)
    batch, length = torch.export.Dim.DYNAMIC, torch.export.Dim.DYNAMIC
    program = torch.export.export(_Heads(), (x,), dynamic_shapes=({0: batch, 1: length},))
    module = program.module()
    views = (torch.ops.aten.view.default, torch.ops.aten.reshape.default)
    before = [n for n in module.graph.nodes if n.target in views]
    assert tidy_views(module) >= 2
    after = [n for n in module.graph.nodes if n.target in views]
    assert len(after) < len(before)  # the view to the same shape is gone
    for node in after:
        assert -1 not in node.args[1]
    for shape in [(1, 3, 8), (4, 9, 8)]:
        y = torch.randn(*shape)
        torch.testing.assert_close(module(y), _Heads()(y))


def test_a_conversion_that_mismatches_leaves_nothing_behind(tmp_path: Path) -> None:
    model = load_model(f"{Path(__file__).parents[1] / 'models.py'}:noisy")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("written before")
    with pytest.raises(ExportMismatch, match=r"through torch\.export of noisy"):
        export_openvino_direct(model, model.original(), out / "model.xml")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
