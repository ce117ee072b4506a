"""Sentence-transformers pooling, which is part of the model.

A sentence encoder's answer is not its token embeddings but what its `modules.json` makes of
them: pooled (mean, CLS, max or last token) and often L2-normalized. Serve or compare without
that step and the vectors are silently wrong (CLS instead of mean gives cosine ~0.5 to the real
ones). This room reads the config and reproduces the pooling in numpy, exactly as
sentence-transformers computes it, so every runtime's outputs are pooled the same way. It
imports only numpy, the standard library and mahir's types and errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args

import numpy as np

from mahir.errors import BadInput, Unsupported

PoolingMode = Literal["mean", "cls", "max", "lasttoken"]

EMBEDDING = "sentence_embedding"
"""The name of a sentence encoder's pooled answer, where mahir or a user's metric sees it."""

# sentence-transformers' legacy boolean keys (`pooling_mode_*`), mapped to its mode names.
_LEGACY_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}

# Modules whose effect we reproduce or that do nothing at inference. Any other module (Dense,
# LayerNorm, ...) changes the sentence embedding, and pooling alone would give wrong vectors.
_KNOWN_MODULES = frozenset({"Transformer", "Pooling", "Normalize", "Dropout"})

# torch.nn.functional.normalize's default eps, which sentence-transformers' Normalize uses.
_NORMALIZE_EPS = 1e-12


@dataclass(frozen=True, slots=True)
class Pooling:
    """How token embeddings become one sentence embedding."""

    mode: PoolingMode
    normalize: bool

    def __post_init__(self) -> None:
        if self.mode not in get_args(PoolingMode):
            raise ValueError(
                f"pooling mode must be one of {get_args(PoolingMode)}, got {self.mode!r}"
            )


def read_pooling(folder: Path) -> Pooling | None:
    """The pooling a sentence-transformers folder declares; None when it is not one (no
    modules.json, or no Pooling module in it)."""
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        return None
    modules = _read_json(modules_path)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise BadInput(f"{modules_path} must be a list of modules: restore it from the original")
    kinds = [_module_kind(m, modules_path) for m in modules]
    if "Pooling" not in kinds:
        return None
    pooling_entry = modules[kinds.index("Pooling")]
    config_path = folder / str(pooling_entry.get("path", "")) / "config.json"
    if not config_path.is_file():
        raise BadInput(
            f"{config_path} is missing: the Pooling module's config is part of the model"
        )
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise BadInput(f"{config_path} must be a JSON object: restore it from the original")
    return Pooling(mode=_mode(config, config_path), normalize="Normalize" in kinds)


def _module_kind(entry: dict[str, Any], path: Path) -> str:
    """The class name of a sentence-transformers module (old and new import paths alike)."""
    type_name = str(entry.get("type", ""))
    kind = type_name.rsplit(".", 1)[-1]
    if not type_name.startswith("sentence_transformers.") or kind not in _KNOWN_MODULES:
        raise Unsupported(
            f"{path} lists module {type_name!r}; mahir reproduces only "
            f"{', '.join(sorted(_KNOWN_MODULES))}, so its sentence embeddings would be wrong"
        )
    return kind


def _mode(config: dict[str, Any], path: Path) -> PoolingMode:
    """The one pooling mode the config asks for, in the new (`pooling_mode`) or legacy format."""
    if "pooling_mode" in config:
        raw = config["pooling_mode"]
        modes = [raw] if isinstance(raw, str) else list(raw)
    else:
        modes = [mode for key, mode in _LEGACY_KEYS.items() if config.get(key, False)]
        modes = modes or ["mean"]  # sentence-transformers' default when no flag is set
    if len(modes) != 1:
        raise Unsupported(f"{path} concatenates pooling modes {modes}; mahir supports one mode")
    mode = modes[0]
    if mode not in get_args(PoolingMode):
        raise Unsupported(
            f"{path} asks for pooling mode {mode!r}; mahir supports {get_args(PoolingMode)}"
        )
    return cast(PoolingMode, mode)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadInput(f"{path} is not valid JSON ({err}): restore it from the original") from err


def pool(token_embeddings: np.ndarray, attention_mask: np.ndarray, pooling: Pooling) -> np.ndarray:
    """(batch, seq, hidden) token embeddings and their (batch, seq) mask -> (batch, hidden)
    sentence embeddings, computed in float32 at least (fp16 sums lose digits), as
    sentence-transformers computes them."""
    if token_embeddings.ndim != 3 or attention_mask.shape != token_embeddings.shape[:2]:
        raise ValueError(
            f"pooling needs (batch, seq, hidden) embeddings and a (batch, seq) mask, got "
            f"{token_embeddings.shape} and {attention_mask.shape}"
        )
    x = token_embeddings.astype(np.promote_types(token_embeddings.dtype, np.float32), copy=False)
    mask = attention_mask != 0
    batch, seq, _ = x.shape
    if pooling.mode == "mean":
        # where(), not multiply: a NaN at a padded position must not poison the sum.
        total = np.where(mask[..., None], x, 0).sum(axis=1)
        pooled = total / np.maximum(mask.sum(axis=1, keepdims=True), 1e-9).astype(x.dtype)
    elif pooling.mode == "cls":
        # The first real token: index 0 with right padding, past the pads with left padding.
        pooled = x[np.arange(batch), mask.argmax(axis=1)]
    elif pooling.mode == "max":
        pooled = np.where(mask[..., None], x, -np.inf).max(axis=1)
    else:  # lasttoken: the last real token; a row with none gives zeros, as in s-t
        last = seq - 1 - mask[:, ::-1].argmax(axis=1)
        pooled = np.where(mask.any(axis=1, keepdims=True), x[np.arange(batch), last], 0)
    if pooling.normalize:
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        pooled = pooled / np.maximum(norms, _NORMALIZE_EPS)
    return np.asarray(pooled, dtype=x.dtype)
