from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mahir.errors import BadInput
from mahir.model import Model, default_model_folder, load_model
from mahir.types import BATCH, SEQUENCE, TokenLimits


def test_default_model_is_a_sentence_encoder_with_pooling(minilm: Model) -> None:
    assert minilm.name == "all-MiniLM-L6-v2"
    assert minilm.family.kind == "text"
    assert minilm.spec.input_names == ("input_ids", "token_type_ids", "attention_mask")
    assert all(t.shape == (BATCH, SEQUENCE) and t.dtype == "int64" for t in minilm.spec.inputs)
    # sentence-transformers ignores the pooler head; the pooling config is the model's answer
    assert minilm.spec.outputs == ("last_hidden_state",)
    assert minilm.family.pooling is not None
    assert (minilm.family.pooling.mode, minilm.family.pooling.normalize) == ("mean", True)
    assert minilm.family.max_length == 256
    # the position table holds 512 even though sentence-transformers truncates at 256
    assert minilm.family.limits == TokenLimits(positions=512, vocab_size=30522, type_vocab_size=2)
    assert not minilm.module.training


def test_factory_models_get_a_dynamic_batch_axis(mlp: Model, cnn: Model) -> None:
    assert [(t.name, t.shape, t.dtype) for t in mlp.spec.inputs] == [("x", (BATCH, 32), "float32")]
    assert cnn.spec.inputs[0].shape == (BATCH, 3, 32, 32)
    assert mlp.spec.outputs == ("output",)
    assert mlp.family.kind == "tensor"
    # the factory left dropout/batchnorm in training mode; loading put them in eval mode
    assert not any(m.training for m in mlp.module.modules())
    inputs = {k: torch.from_numpy(v) for k, v in mlp.example_inputs.items()}
    with torch.inference_mode():
        first, second = mlp.module(**inputs), mlp.module(**inputs)
    torch.testing.assert_close(first, second)


def test_onnx_file_with_tokenizer_beside_it_is_a_text_model(minilm_onnx: Path) -> None:
    folder = minilm_onnx.parent
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "modules.json"):
        shutil.copy(default_model_folder() / name, folder / name)
    shutil.copytree(default_model_folder() / "1_Pooling", folder / "1_Pooling", dirs_exist_ok=True)
    model = load_model(minilm_onnx)
    assert model.module is None
    assert model.onnx_path == minilm_onnx
    assert model.family.kind == "text"
    assert model.family.pooling is not None
    assert {t.name: t.shape for t in model.spec.inputs}["input_ids"] == (BATCH, SEQUENCE)
    assert model.original().format == "onnx"
    assert model.family.limits == TokenLimits(positions=512, vocab_size=30522)
    assert model.family.max_length == 512


@pytest.mark.parametrize(
    ("make_source", "message"),
    [
        (lambda tmp: tmp / "nowhere", "does not exist"),
        (lambda tmp: tmp / "missing.onnx", "does not exist"),
        (lambda tmp: tmp, "has no config.json"),
        (lambda tmp: _write(tmp / "junk.onnx", b"\x00not a protobuf\xff" * 50), "not a valid ONNX"),
        (lambda tmp: _write(tmp / "notes.txt", b"hello"), "neither a folder nor an .onnx file"),
        (lambda tmp: f"{_factories(tmp)}:raises", "raised RuntimeError: broken weights"),
        (lambda tmp: f"{_factories(tmp)}:wrong_type", "must return (nn.Module, dict[str, Tensor])"),
        (lambda tmp: f"{_factories(tmp)}:fails_on_inputs", "raised RuntimeError on its example"),
        (lambda tmp: f"{_factories(tmp)}:absent", "has no function absent"),
        (lambda tmp: "no_such_package_xyz:fn", "cannot import no_such_package_xyz"),
    ],
)
def test_bad_sources_get_one_clear_line(tmp_path: Path, make_source, message: str) -> None:
    with pytest.raises(BadInput) as caught:
        load_model(make_source(tmp_path))
    text = str(caught.value)
    assert message in text
    assert "\n" not in text


def test_folder_with_config_but_no_weights(tmp_path: Path) -> None:
    shutil.copy(default_model_folder() / "config.json", tmp_path / "config.json")
    with pytest.raises(BadInput, match="has no weights"):
        load_model(tmp_path)


def test_example_inputs_are_numpy(minilm: Model) -> None:
    ids = minilm.example_inputs["input_ids"]
    assert isinstance(ids, np.ndarray)
    assert ids.dtype == np.int64
    assert ids.shape[0] == 2
    # the two example sentences differ in length: the example batch carries padding
    assert minilm.example_inputs["attention_mask"].min() == 0


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _factories(tmp: Path) -> Path:
    path = tmp / "factories.py"
    path.write_text(
        "import torch\n"
        "def raises():\n"
        "    raise RuntimeError('broken weights')\n"
        "def wrong_type():\n"
        "    return torch.nn.Linear(2, 2)\n"
        "def fails_on_inputs():\n"
        "    return torch.nn.Linear(2, 2), {'input': torch.zeros(1, 3)}\n"
    )
    return path
