"""Every kind of model source through `bench` and a short `optimize`: each ends with a winner
and a report whose baseline is right for its source (PyTorch eager for a module, ONNX Runtime for
an ONNX file), and the family that judges it is the right one. (What a family does beyond this:
tests/families/.)"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from mahir.export.conversions import Conversion
from mahir.measure import MeasureConfig
from mahir.model import Model, default_model_folder, load_model
from mahir.report.html import render_html
from mahir.search.bench import BenchConfig, benchmark
from mahir.search.optimize import optimize
from mahir.search.optimize_config import OptimizeConfig
from mahir.types import Artifact
from tests import models
from tests.helpers import TESTS

pytestmark = pytest.mark.usefixtures("short_rungs")  # what is timed matters, not how long
QUICK = MeasureConfig(warmup_runs=1, min_time_s=0.05, min_runs=3, round_time_s=0.02)
TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
)


def _hf_folder(folder: Path, architecture: str, config: object) -> str:
    """A tiny random-weight transformers model with the default model's tokenizer, cut to 64
    tokens (what the tiny position tables hold; longer texts only cost test time)."""
    import transformers

    getattr(transformers, architecture)(config).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(default_model_folder() / name, folder / name)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings["model_max_length"] = 64
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return str(folder)


def bert(folder: Path) -> str:
    import transformers

    return _hf_folder(folder, "BertModel", transformers.BertConfig(**TINY))


def roberta(folder: Path) -> str:
    import transformers

    # RoBERTa's positions start after its padding index: 66 rows hold 64 tokens (514 for 512).
    config = transformers.RobertaConfig(**{**TINY, "max_position_embeddings": 66})
    return _hf_folder(folder, "RobertaModel", config)


def distilbert(folder: Path) -> str:
    import transformers

    config = transformers.DistilBertConfig(
        dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64
    )
    return _hf_folder(folder, "DistilBertModel", config)


def t5_encoder(folder: Path) -> str:
    import transformers

    config = transformers.T5Config(
        d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, vocab_size=30522
    )
    return _hf_folder(folder, "T5EncoderModel", config)


def classifier(folder: Path) -> str:
    import transformers

    config = transformers.BertConfig(**TINY, num_labels=3)
    return _hf_folder(folder, "BertForSequenceClassification", config)


def hand_built_onnx(folder: Path) -> str:
    """A graph written node by node, with no tokenizer and no torch behind it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Add", ["h", "b"], ["z"]),
            helper.make_node("Relu", ["z"], ["y"]),
        ],
        "hand_built",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "hand_built.onnx"
    onnx.save(model, str(path))
    return str(path)


def cnn(folder: Path) -> str:
    return f"{TESTS / 'models.py'}:cnn"


def two_inputs(folder: Path) -> str:
    return f"{TESTS / 'models.py'}:regressor"


def resnet(folder: Path) -> str:
    return str(models.resnet_folder(folder))


# An ONNX file exported from a torch model: tests/export/test_onnx_source.py (bench, optimize,
# and optimize through the command, on the same session's export). A ViT image classifier:
# tests/families/test_vision.py (bench on every runtime, optimize through the command).
SOURCES: dict[str, tuple[Callable[[Path], str], str, str]] = {
    # name: (how to make it, its family, its baseline runtime)
    "hand-built onnx": (hand_built_onnx, "tensor", "onnxruntime"),
    "t5 encoder": (t5_encoder, "text", "torch"),
    "bert": (bert, "text", "torch"),
    "roberta": (roberta, "text", "torch"),
    "distilbert": (distilbert, "text", "torch"),
    "sequence classifier": (classifier, "text", "torch"),
    "factory cnn": (cnn, "tensor", "torch"),
    "two-input module": (two_inputs, "tensor", "torch"),
    "resnet": (resnet, "vision", "torch"),
}


@pytest.fixture(params=sorted(SOURCES))
def source(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Model, str, str]:
    make, family, baseline = SOURCES[request.param]
    folder = tmp_path / "source"
    folder.mkdir()
    return load_model(make(folder)), family, baseline


@pytest.fixture
def convert_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each conversion of one source (torch -> ONNX, ONNX -> OpenVINO IR) runs once per test:
    the optimize after the bench opens the files the bench's conversions made and verified,
    as one builder shares them between recipes. The export is most of a tiny model's time and
    was done twice for the same module; bench still exports for real, and optimize still
    builds, checks and times on what was exported."""
    made: dict[tuple[object, ...], Artifact] = {}
    real = Conversion.run

    def run(self: Conversion, model: Model, source: Artifact, folder: Path) -> Artifact:
        origin = id(source.module) if source.module is not None else source.path
        key = (self.source, self.target, self.direct, origin)
        if key not in made:
            made[key] = real(self, model, source, folder)
        return made[key]

    monkeypatch.setattr(Conversion, "run", run)


@pytest.mark.usefixtures("convert_once")
def test_bench_and_optimize_end_with_a_winner_on_the_right_baseline(
    source: tuple[Model, str, str], tmp_path: Path
) -> None:
    model, family, baseline = source
    assert model.family.kind == family
    bench = benchmark(
        model, BenchConfig(batch_sizes=(2,), measure=QUICK, batches_per_size=2), tmp_path / "b"
    )
    assert bench.baseline == baseline
    assert {row.runtime for row in bench.rows} >= {baseline, "openvino"}
    for row in bench.rows:  # every runtime checked against the original, and faithful
        assert row.quality.headline.cosine_min > 0.999, row.runtime

    candidate = "openvino-f32" if baseline == "onnxruntime" else "onnxruntime"
    config = OptimizeConfig(only=(candidate,), batch_sizes=(1,), batches_per_size=2, roofline=False)
    result = optimize(model, config, tmp_path / "o")
    report = result.report()
    assert report.baseline == baseline
    assert report.model["family"] == family
    assert result.best is not None
    statuses = {c.id: c.status for c in report.candidates}
    assert (statuses[baseline], statuses[candidate]) == ("ok", "ok"), statuses
    name = {"torch": "PyTorch eager fp32", "onnxruntime": "ONNX Runtime fp32"}[baseline]
    assert f"over {name}" in render_html(report)
