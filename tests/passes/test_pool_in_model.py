"""Pooling inside the model: the torch module answers with the sentence embedding that numpy
pooling gives, the artifact is judged and served by that embedding (in ONNX too), and only
sentence encoders get it."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from mahir.errors import Unsupported
from mahir.model import Model
from mahir.modules import PooledEmbedding
from mahir.passes import PassContext, apply_steps
from mahir.passes.pooling import PoolInModel
from mahir.passes.precision import Float16
from mahir.pooling import EMBEDDING, Pooling, pool
from mahir.quality import fidelity
from mahir.recipe import Recipe
from mahir.runtimes import open_session, reference_outputs
from mahir.search.apply import apply_recipe, write_output_dir
from tests.helpers import Server


class Tokens(torch.nn.Module):
    """Answers with fixed token vectors, whatever the ids."""

    def __init__(self, tokens: torch.Tensor) -> None:
        super().__init__()
        self.tokens = tokens

    def forward(self, **inputs: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.tokens,)


@pytest.mark.parametrize("mode", ["mean", "cls", "max", "lasttoken"])
@pytest.mark.parametrize("normalize", [False, True])
def test_torch_pooling_is_numpy_pooling(mode: str, normalize: bool) -> None:
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(4, 6, 8)).astype(np.float16)  # a low-precision model's output
    mask = np.array(
        [[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]]
    )  # right padding, left padding, none, one token
    module = PooledEmbedding(Tokens(torch.from_numpy(tokens)), mode, normalize)
    (got,) = module(input_ids=torch.zeros(4, 6), attention_mask=torch.from_numpy(mask))
    want = pool(tokens, mask, Pooling(mode, normalize))  # type: ignore[arg-type]
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_a_pooled_artifact_answers_with_the_embedding_and_is_judged_by_it(
    minilm: Model, tmp_path: Path
) -> None:
    ctx = PassContext(model=minilm, workdir=tmp_path)
    pooled = apply_steps(minilm.original(), (PoolInModel(),), ctx)
    assert pooled.spec.outputs == (EMBEDDING,)
    assert pooled.spec.inputs == minilm.spec.inputs
    batches = minilm.family.verification_batches()
    session = open_session("torch", pooled)
    outputs = session.run(batches[0])
    assert set(outputs) == {EMBEDDING}
    assert minilm.family.scored(outputs, batches[0]) is outputs  # already what users score
    quality = fidelity(minilm, session, batches, reference_outputs(minilm, batches))
    assert quality.embedding is not None
    assert quality.embedding.cosine_min > 0.99999
    assert set(quality.outputs) == {EMBEDDING}


@pytest.mark.slow
def test_a_pooled_module_exports_to_onnx_with_the_embedding_alone(
    minilm: Model, tmp_path: Path
) -> None:
    """The GPU's ONNX Runtime candidates (`ort-cuda-fp16`): pooled, exported with the pooled
    module's own output, then fp16; checked on the CPU provider."""
    ctx = PassContext(model=minilm, workdir=tmp_path)
    artifact = apply_steps(minilm.original(), (PoolInModel(), Float16()), ctx)
    assert (artifact.format, artifact.spec.outputs) == ("onnx", (EMBEDDING,))
    batches = minilm.family.verification_batches()
    session = open_session("onnxruntime", artifact)
    assert set(session.run(batches[0])) == {EMBEDDING}
    quality = fidelity(minilm, session, batches, reference_outputs(minilm, batches))
    assert quality.embedding is not None
    assert quality.embedding.cosine_min > 0.999


def test_only_sentence_encoders_pool_in_the_model(mlp: Model, tmp_path: Path) -> None:
    with pytest.raises(Unsupported, match="not a sentence encoder"):
        apply_steps(mlp.original(), (PoolInModel(),), PassContext(model=mlp, workdir=tmp_path))


def test_a_pooled_output_directory_serves_the_same_embeddings(
    minilm: Model, served_dir: Path, tmp_path: Path
) -> None:
    recipe = Recipe((PoolInModel(),), "torch")
    applied = apply_recipe(minilm, recipe, tmp_path / "w", calibration=(), evaluation=())
    write_output_dir(minilm, applied, tmp_path / "out")
    texts = ["a short one", "a somewhat longer sentence, to see the padding left out"]
    vectors = []
    for folder in (tmp_path / "out", served_dir):
        server = Server(folder)
        try:
            response = httpx.post(f"{server.url}/v1/embeddings", json={"input": texts}, timeout=60)
        finally:
            server.stop()
        assert response.status_code == 200, response.text
        vectors.append(np.array([d["embedding"] for d in response.json()["data"]]))
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-5)
