from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mahir.errors import Unsupported
from mahir.export.onnx import export_onnx
from mahir.model import Model
from mahir.passes import PassContext
from mahir.passes.prune import MagnitudePrune, StructuredPrune, magnitude_prune, structured_prune
from mahir.passes.prune_transformer import TransformerPrune, transformer_prune
from mahir.quality import fidelity
from mahir.runtimes import open_session
from mahir.types import Artifact

Eval = tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def run_torch(artifact: Artifact, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return open_session("torch", artifact).run(batch)


# --- StructuredPrune on the MLP and the CNN ---------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cut"),
    [
        ("mlp", {"net.0": [64, 44], "net.3": [64, 44]}),  # net.5, the classifier, keeps 10
        ("cnn", {"features.0": [16, 11], "features.4": [32, 22]}),  # head keeps 10
    ],
)
def test_structured_prune_shrinks_a_copy_and_keeps_the_contract(
    name: str, cut: dict[str, list[int]], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    model: Model = request.getfixturevalue(name)
    source = model.original()
    batch = model.family.workload([5], batches_per_size=1, seed=3).batches[5][0]
    before, answer = params(source.module), run_torch(source, batch)
    calibration = tuple(model.family.workload([8], batches_per_size=2).batches[8])
    ctx = PassContext(model=model, workdir=tmp_path, calibration=calibration)

    pruned = structured_prune(source, StructuredPrune(ratio=0.3, round_to=None), ctx)

    step = pruned.meta["steps"][-1]
    assert step["layers"] == cut
    json.dumps(pruned.meta)  # mahir apply writes it into mahir.json
    after = params(pruned.module)
    assert (step["params_before"], step["params_after"]) == (before, after)
    # Inner layers shrink on both sides: about (1 - 0.3)^2 of their weights stay.
    assert 0.4 * before < after < 0.75 * before
    assert params(source.module) == before  # the input is untouched
    np.testing.assert_array_equal(run_torch(source, batch)["output"], answer["output"])
    out = run_torch(pruned, batch)
    assert out["output"].shape == answer["output"].shape

    onnx = export_onnx(model, tmp_path / "model.onnx", source=pruned)
    got = open_session("onnxruntime", onnx).run(batch)
    np.testing.assert_allclose(got["output"], out["output"], rtol=1e-4, atol=1e-5)


def test_structured_prune_rounds_channels_and_ranks_by_magnitude_without_data(
    mlp: Model, tmp_path: Path
) -> None:
    ctx = PassContext(model=mlp, workdir=tmp_path)
    pruned = structured_prune(mlp.original(), StructuredPrune(importance="magnitude"), ctx)
    # 64 * 0.7 = 44.8 channels, rounded down to a multiple of 8.
    assert pruned.meta["steps"][-1]["layers"] == {"net.0": [64, 40], "net.3": [64, 40]}
    assert not pruned.module.training
    with pytest.raises(Unsupported, match="calibration"):
        structured_prune(mlp.original(), StructuredPrune(importance="taylor"), ctx)


# --- TransformerPrune on all-MiniLM-L6-v2 -----------------------------------------------------


@pytest.fixture(scope="module")
def pruned_minilm(
    minilm: Model, minilm_calibration: tuple[dict[str, np.ndarray], ...], minilm_eval: Eval
) -> dict[str, Any]:
    """The default model pruned at 30% and 10% (heads and FFN), and the original's answer on
    one batch before and after, to show pruning never touched it."""
    source, batch = minilm.original(), minilm_eval[0][0]
    before = run_torch(source, batch)["last_hidden_state"]
    ctx = PassContext(model=minilm, workdir=Path("unused"), calibration=minilm_calibration)
    return {
        "0.3": transformer_prune(source, TransformerPrune(0.3, 0.3), ctx),
        "0.1": transformer_prune(source, TransformerPrune(0.1, 0.1), ctx),
        "before": before,
        "after": run_torch(source, batch)["last_hidden_state"],
    }


def test_transformer_prune_removes_heads_and_neurons_from_a_copy(
    minilm: Model, pruned_minilm: dict[str, Any]
) -> None:
    pruned = pruned_minilm["0.3"]
    step = pruned.meta["steps"][-1]
    assert step["params_before"] == params(minilm.module) == 22_713_216
    assert step["params_after"] == params(pruned.module) < 0.88 * step["params_before"]
    assert len(step["layers"]) == 6
    json.dumps(pruned.meta)  # mahir apply writes it into mahir.json
    for cut in step["layers"].values():
        assert (cut["heads"], cut["ffn"], len(cut["heads_removed"])) == ([12, 8], [1536, 1072], 4)
    for layer in pruned.module.model.encoder.layer:
        attention = layer.attention.self
        assert attention.num_attention_heads == 8
        assert attention.query.out_features == attention.all_head_size == 8 * 32
        assert layer.attention.output.dense.in_features == 256
    assert pruned.module.model.config.num_attention_heads == 8
    for layer in minilm.module.model.encoder.layer:  # the original keeps everything
        assert layer.attention.self.num_attention_heads == 12
        assert layer.intermediate.dense.out_features == 1536
    assert minilm.module.model.config.num_attention_heads == 12
    np.testing.assert_array_equal(pruned_minilm["after"], pruned_minilm["before"])


def test_transformer_prune_fidelity_without_fine_tuning(
    minilm: Model,
    pruned_minilm: dict[str, Any],
    minilm_eval: Eval,
) -> None:
    """Floors measured with margin: 0.3 gave sentence-embedding cosine mean 0.86-0.88, worst
    0.75-0.81, over calibration sets of 2-8 batches and seeds; 0.1 gave mean 0.97, worst
    0.91-0.94 (the TransformerPrune docstring)."""
    batches, reference = minilm_eval
    quality = {
        ratio: fidelity(minilm, open_session("torch", pruned_minilm[ratio]), batches, reference)
        for ratio in ("0.1", "0.3")
    }
    for ratio, q in quality.items():  # the measurement, shown by pytest -rP
        assert q.embedding is not None
        print(
            f"ratio {ratio}: embedding cosine mean {q.embedding.cosine_mean:.4f}, "
            f"worst {q.embedding.cosine_min:.4f}"
        )
    light, heavy = quality["0.1"].headline, quality["0.3"].headline
    assert heavy.cosine_mean > 0.84
    assert heavy.cosine_min > 0.70
    assert light.cosine_mean > 0.95
    assert light.cosine_min > 0.88
    assert light.cosine_mean > heavy.cosine_mean + 0.05


def test_pruned_minilm_exports_and_runs_on_onnxruntime_and_openvino(
    minilm: Model, pruned_minilm: dict[str, Any], minilm_eval: Eval, tmp_path: Path
) -> None:
    pruned = pruned_minilm["0.3"]
    onnx = export_onnx(minilm, tmp_path / "model.onnx", source=pruned)  # verified on 3 shapes
    batch = minilm_eval[0][0]
    expected = run_torch(pruned, batch)["last_hidden_state"]
    for runtime in ("onnxruntime", "openvino"):
        got = open_session(runtime, onnx).run(batch)["last_hidden_state"]
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4, err_msg=runtime)


# --- MagnitudePrune ---------------------------------------------------------------------------


def test_magnitude_prune_zeroes_weights_and_says_it_is_not_faster(
    cnn: Model, tmp_path: Path
) -> None:
    source = cnn.original()
    weights = {name: p.clone() for name, p in source.module.named_parameters()}
    pruned = magnitude_prune(source, MagnitudePrune(sparsity=0.5), PassContext(cnn, tmp_path))
    layers = [
        m for m in pruned.module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    ]
    for layer in layers:
        assert float((layer.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    step = pruned.meta["steps"][-1]
    assert step["params_before"] == step["params_after"] == params(source.module)
    assert step["zeroed_weights"] == sum(int((m.weight == 0).sum()) for m in layers)
    assert "no faster" in step["note"]
    for name, p in source.module.named_parameters():  # the input is untouched
        assert torch.equal(p, weights[name]), name


# --- where pruning does not apply -------------------------------------------------------------


def test_transformer_prune_refuses_a_model_without_bert_layers(mlp: Model, tmp_path: Path) -> None:
    ctx = PassContext(model=mlp, workdir=tmp_path, calibration=(mlp.example_inputs,))
    with pytest.raises(Unsupported, match=r"BERT-style encoders.*MLP has none"):
        transformer_prune(mlp.original(), TransformerPrune(), ctx)


def test_structured_prune_sends_transformers_to_transformer_prune(
    minilm: Model, tmp_path: Path
) -> None:
    ctx = PassContext(model=minilm, workdir=tmp_path)
    with pytest.raises(Unsupported, match="use TransformerPrune"):
        structured_prune(minilm.original(), StructuredPrune(importance="magnitude"), ctx)


@pytest.mark.parametrize(
    ("prune", "config"),
    [
        (structured_prune, StructuredPrune()),
        (transformer_prune, TransformerPrune()),
        (magnitude_prune, MagnitudePrune()),
    ],
)
def test_every_pruning_pass_refuses_a_file_artifact(
    prune: Any, config: Any, mlp: Model, tmp_path: Path
) -> None:
    onnx = Artifact("onnx", mlp.spec, path=tmp_path / "model.onnx")
    with pytest.raises(Unsupported, match="changes a live torch module; this artifact is onnx"):
        prune(onnx, config, PassContext(model=mlp, workdir=tmp_path))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: StructuredPrune(ratio=0.0), r"ratio must be in \(0, 0.9\], got 0.0"),
        (lambda: StructuredPrune(ratio=0.95), r"ratio must be in \(0, 0.9\], got 0.95"),
        (lambda: StructuredPrune(importance="hessian"), "importance must be one of"),
        (lambda: StructuredPrune(round_to=0), "round_to must be >= 1 or None, got 0"),
        (lambda: TransformerPrune(head_ratio=1.0), r"head_ratio must be in \[0, 0.9\], got 1.0"),
        (lambda: TransformerPrune(0.0, 0.0), "nothing would be pruned"),
        (lambda: MagnitudePrune(sparsity=1.0), r"sparsity must be in \(0, 1\), got 1.0"),
    ],
)
def test_configs_refuse_values_out_of_range(make: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()
