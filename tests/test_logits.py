"""Which outputs are judged as class scores: only those the model declares (transformers' heads
name them `*logits`) or the user names; a pooled vector or a 2-column regressor is judged by
cosine and error like any other output."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mahir.errors import BadInput
from mahir.model import default_model_folder, load_model, with_logits
from mahir.recipe import Recipe
from mahir.search.apply import apply_recipe
from mahir.search.budget import FidelityBudget, quality_kind
from tests.helpers import TESTS

TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def tiny_bert(folder: Path, architecture: str, **config: object) -> Path:
    """A 2-layer BERT with random weights and the default model's tokenizer, saved as a folder."""
    import transformers

    settings = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    bert = transformers.BertConfig(intermediate_size=64, **settings, **config)
    getattr(transformers, architecture)(bert).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(default_model_folder() / name, folder / name)
    return folder


def test_a_plain_encoder_is_judged_on_every_output_by_cosine(tmp_path: Path) -> None:
    # What happened to RoBERTa: its pooler_output was taken for logits, its hidden states never
    # judged, and a faithful candidate was rejected for "top-1 agreement 95%".
    model = load_model(tiny_bert(tmp_path / "bert", "BertModel"))
    assert model.spec.outputs == ("last_hidden_state", "pooler_output")
    assert model.logits == frozenset()
    applied = apply_recipe(
        model, Recipe((), "onnxruntime"), tmp_path / "w", calibration=(), evaluation=()
    )
    quality = applied.quality
    assert all(f.top1_agreement is None for f in quality.outputs.values())
    assert quality_kind(quality) == "outputs"
    assert FidelityBudget().judge(quality) is None
    assert min(f.cosine_min for f in quality.outputs.values()) > 0.9999


@pytest.mark.parametrize(
    ("config", "logits"),
    [
        ({"num_labels": 3}, {"logits"}),
        ({"num_labels": 1}, set()),  # one score: a regression head
        ({"num_labels": 2, "problem_type": "regression"}, set()),
    ],
)
def test_a_classification_head_declares_its_logits(
    tmp_path: Path, config: dict[str, object], logits: set[str]
) -> None:
    folder = tiny_bert(tmp_path / "head", "BertForSequenceClassification", **config)
    assert load_model(folder).logits == logits


def test_factories_declare_logits_by_name_or_by_the_users_word() -> None:
    regressor = load_model(f"{TESTS / 'models.py'}:regressor")
    assert regressor.spec.outputs == ("output",)
    assert regressor.logits == frozenset()  # two columns, two targets: not classes
    mlp = load_model(f"{TESTS / 'models.py'}:mlp")
    assert mlp.logits == frozenset()  # ten classes, but named "output": only the user knows
    assert with_logits(mlp, ["output"]).logits == {"output"}
    with pytest.raises(BadInput, match="no such output; its outputs are output"):
        with_logits(mlp, ["scores"])
