"""Shared fixtures. Models load once per session: loading and exporting dominate test time."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mahir.model import Model, load_model

TESTS = Path(__file__).parent


# No model hub is reachable: a test that tries one must fail fast, not hang.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def minilm() -> Model:
    return load_model()


@pytest.fixture(scope="session")
def mlp() -> Model:
    return load_model(f"{TESTS / 'models.py'}:mlp")


@pytest.fixture(scope="session")
def cnn() -> Model:
    return load_model(f"{TESTS / 'models.py'}:cnn")


@pytest.fixture(scope="session")
def minilm_onnx(minilm: Model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mahir.export import export_onnx

    path = tmp_path_factory.mktemp("minilm") / "model.onnx"
    export_onnx(minilm, path)
    return path
