"""Fused query, key and value: each self-attention of MiniLM becomes one projection, the
answers stay the original's on held-out batches of several shapes (padded, eager and SDPA
attention, fp32 and bf16), and a model without such attention is refused in one line."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from mahir.errors import Unsupported
from mahir.fused_qkv import FusedSelfAttention
from mahir.model import Model
from mahir.outdir import load_output_dir
from mahir.passes import PassContext, apply_steps, run_pass
from mahir.passes.fuse_qkv import FuseQKV
from mahir.passes.packing import PackSequences
from mahir.passes.precision import TorchLowPrecision
from mahir.pooling import EMBEDDING
from mahir.quality import fidelity
from mahir.recipe import Recipe
from mahir.runtimes import open_session, reference_outputs
from mahir.search.apply import apply_recipe, write_output_dir

Batches = tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_fused_attention_gives_the_original_answers(
    minilm: Model, minilm_eval: Batches, attention: str, tmp_path: Path
) -> None:
    original = minilm.original()
    original = dataclasses.replace(original, module=copy.deepcopy(original.module))
    inner = next(m for m in original.module.modules() if hasattr(m, "set_attn_implementation"))
    inner.set_attn_implementation(attention)
    fused = run_pass(original, FuseQKV(), PassContext(minilm, tmp_path))
    assert fused.meta["steps"][-1] == {"fused_qkv": 6}  # one a layer
    layers = [m for m in fused.module.modules() if isinstance(m, FusedSelfAttention)]
    assert len(layers) == 6
    assert layers[0].qkv.weight.shape == (3 * 384, 384)
    assert not any(hasattr(m, "query") for m in fused.module.modules())
    assert any(hasattr(m, "query") for m in original.module.modules())  # the input untouched
    quality = fidelity(minilm, open_session("torch", fused), *minilm_eval)
    embedding = next(iter(quality.outputs.values()))
    assert embedding.cosine_min > 0.99999, embedding


def test_fusing_after_bf16_keeps_bf16_and_the_answers(
    minilm: Model, minilm_eval: Batches, tmp_path: Path
) -> None:
    ctx = PassContext(minilm, tmp_path)
    steps = (TorchLowPrecision("bfloat16"), FuseQKV())
    fused = apply_steps(minilm.original(), steps, ctx)
    qkv = next(m for m in fused.module.modules() if isinstance(m, FusedSelfAttention)).qkv
    assert qkv.weight.dtype == torch.bfloat16
    bf16 = apply_steps(minilm.original(), steps[:1], ctx)
    fused_quality = fidelity(minilm, open_session("torch", fused), *minilm_eval)
    bf16_quality = fidelity(minilm, open_session("torch", bf16), *minilm_eval)
    (got,), (want,) = fused_quality.outputs.values(), bf16_quality.outputs.values()
    assert got.cosine_mean >= 0.999, got
    assert abs(got.cosine_mean - want.cosine_mean) < 1e-3


def test_a_model_without_encoder_attention_is_refused(mlp: Model, tmp_path: Path) -> None:
    with pytest.raises(Unsupported, match="has no encoder self-attention to fuse"):
        run_pass(mlp.original(), FuseQKV(), PassContext(mlp, tmp_path))


def test_a_fused_encoder_packs_saves_and_reopens_with_the_same_answers(
    minilm: Model, tmp_path: Path
) -> None:
    """Fused, then packed (the fused module calls whichever attention the model is set to,
    the packed one here), judged by its embedding, saved as a program and reopened."""
    steps = (FuseQKV(), PackSequences())
    packed = apply_steps(minilm.original(), steps, PassContext(minilm, tmp_path))
    batches = minilm.family.verification_batches()
    session = open_session("torch", packed)
    quality = fidelity(minilm, session, batches, reference_outputs(minilm, batches))
    assert quality.embedding is not None
    assert quality.embedding.cosine_min > 0.99999
    applied = apply_recipe(
        minilm, Recipe(steps, "torch"), tmp_path / "w", calibration=(), evaluation=()
    )
    write_output_dir(minilm, applied, tmp_path / "out")
    reopened = load_output_dir(tmp_path / "out")
    np.testing.assert_allclose(
        reopened.run(batches[1])[EMBEDDING], session.run(batches[1])[EMBEDDING], atol=1e-5
    )
