"""Packed sequences: a packed encoder answers every row as the padded one does (any pooling,
left or right padding, batches past the largest bucket), is judged and saved like any torch
artifact, and only BERT-style sentence encoders get it."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from mahir.errors import BadInput, Unsupported
from mahir.model import Model
from mahir.modules import PooledEmbedding, TupleOutputs
from mahir.outdir import load_output_dir
from mahir.passes import PassContext, apply_steps
from mahir.passes.packing import PackSequences
from mahir.passes.pooling import PoolInModel
from mahir.pooling import EMBEDDING
from mahir.quality import fidelity
from mahir.recipe import Recipe
from mahir.runtimes import open_session, reference_outputs
from mahir.runtimes.packing import (
    SEGMENT_BUCKETS,
    TOKEN_BUCKETS,
    Packing,
    _chunks,
    pack,
    packed_spec,
)
from mahir.runtimes.pending import queues, submit
from mahir.runtimes.pytorch import TorchSession
from mahir.search.apply import apply_recipe, write_output_dir
from mahir.types import InputSpec, TensorSpec
from mahir.varlen import PackedEncoder

SPEC = InputSpec(
    tuple(
        TensorSpec(name, "int64", ("batch", "sequence"))
        for name in ("input_ids", "attention_mask", "token_type_ids")
    ),
    (EMBEDDING,),
    max_sequence=64,
    packed=True,
)


@pytest.fixture(scope="module")
def bert() -> transformers.BertModel:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=500,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return transformers.BertModel(config).eval()


def ragged(rows: int, width: int, seed: int, left: bool = False) -> dict[str, np.ndarray]:
    """A padded batch of random lengths 1..width (one row always full)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, width + 1, rows)
    lengths[0] = width
    mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int64)
    mask = mask[:, ::-1].copy() if left else mask
    return {
        "input_ids": rng.integers(5, 500, (rows, width)) * mask,
        "attention_mask": mask,
        "token_type_ids": rng.integers(0, 2, (rows, width)) * mask,
    }


def padded_answer(bert: torch.nn.Module, batch: dict[str, np.ndarray], mode: str) -> np.ndarray:
    module = PooledEmbedding(TupleOutputs(bert, ("last_hidden_state",)), mode, True).eval()
    with torch.inference_mode():
        (out,) = module(**{k: torch.from_numpy(v) for k, v in batch.items()})
    return out.numpy()


def packed_session(bert: torch.nn.Module, mode: str) -> Packing:
    module = PackedEncoder(bert, mode, True, 64).eval()
    inner = TorchSession(module, packed_spec(SPEC), runtime="torch", precision="f32")
    return Packing(inner, SPEC)


@pytest.mark.parametrize("mode", ["mean", "cls", "max", "lasttoken"])
@pytest.mark.parametrize("left", [False, True])
def test_a_packed_batch_answers_as_the_padded_one(
    bert: transformers.BertModel, mode: str, left: bool
) -> None:
    batch = ragged(9, 20, seed=len(mode), left=left)
    got = packed_session(bert, mode).run(batch)[EMBEDDING]
    np.testing.assert_allclose(got, padded_answer(bert, batch, mode), atol=2e-6)
    assert bert.config._attn_implementation != "mahir_packed"  # the original is left as it was


def test_batches_past_the_largest_buckets_run_in_chunks(bert: transformers.BertModel) -> None:
    rows = SEGMENT_BUCKETS[-1] + 40  # more rows than one chunk
    batch = ragged(rows, 16, seed=3)
    session = packed_session(bert, "mean")
    got = session.run(batch)[EMBEDDING]
    np.testing.assert_allclose(got, padded_answer(bert, batch, "mean"), atol=2e-6)
    assert not queues(session)  # on the CPU each chunk runs when submitted
    queued = submit(session, batch).result()[EMBEDDING]
    np.testing.assert_array_equal(queued, got)


def test_chunks_hold_at_most_the_largest_buckets_and_keep_the_rows_in_order() -> None:
    """Cut by rows and by tokens (a CPU run past 24,576 packed tokens would take minutes, so
    the cutting is checked here and the answers of a chunked batch above)."""
    top = TOKEN_BUCKETS[-1]
    lengths = np.random.default_rng(0).integers(1, 200, 700)
    lengths[300] = top + 5  # one row past the largest bucket runs alone, at its own size
    chunks = _chunks(lengths)
    assert chunks[0][0] == 0
    assert chunks[-1][1] == len(lengths)
    assert all(end == start for (_, end), (start, _) in itertools.pairwise(chunks))
    for start, end in chunks:
        assert end - start <= SEGMENT_BUCKETS[-1]
        assert lengths[start:end].sum() <= top or end - start == 1
    assert (300, 301) in chunks
    assert len(chunks) < len(lengths) / 50  # as few as the buckets allow, not a row each
    assert _chunks(np.full(SEGMENT_BUCKETS[-1], 90)) == [(0, SEGMENT_BUCKETS[-1])]


def test_the_packed_layout_holds_only_real_tokens_and_one_padding_segment() -> None:
    batch = ragged(3, 5, seed=1)
    lengths = batch["attention_mask"].sum(axis=1)
    packed = pack(batch, tokens=16, segments=4)
    assert packed["input_ids"].shape == (1, 16)
    assert list(packed["cu_seqlens"]) == [0, *np.cumsum(lengths), lengths.sum(), 16]
    assert list(packed["segments"][: lengths.sum()]) == list(np.repeat([0, 1, 2], lengths))
    assert set(packed["segments"][lengths.sum() :]) == {4}  # the padding's own segment
    assert list(packed["position_ids"][0, : lengths[0]]) == list(range(lengths[0]))


def test_a_bad_batch_is_refused_in_one_line(bert: transformers.BertModel) -> None:
    with pytest.raises(BadInput, match="the model takes input_ids"):
        packed_session(bert, "mean").run({"input_ids": np.ones((2, 3), np.int64)})


def test_the_packed_minilm_is_judged_by_its_embedding_and_saved(
    minilm: Model, tmp_path: Path
) -> None:
    ctx = PassContext(model=minilm, workdir=tmp_path)
    packed = apply_steps(minilm.original(), (PackSequences(),), ctx)
    assert packed.spec.packed
    assert packed.spec.outputs == (EMBEDDING,)
    batches = minilm.family.verification_batches()
    session = open_session("torch", packed)
    assert getattr(session, "packed", False)
    quality = fidelity(minilm, session, batches, reference_outputs(minilm, batches))
    assert quality.embedding is not None
    assert quality.embedding.cosine_min > 0.99999
    applied = apply_recipe(
        minilm, Recipe((PackSequences(),), "torch"), tmp_path / "w", calibration=(), evaluation=()
    )
    write_output_dir(minilm, applied, tmp_path / "out")  # saved as a program, verified there
    reopened = load_output_dir(tmp_path / "out")
    np.testing.assert_allclose(
        reopened.run(batches[1])[EMBEDDING], session.run(batches[1])[EMBEDDING], atol=1e-5
    )


def test_only_bert_style_sentence_encoders_are_packed(
    minilm: Model, mlp: Model, tmp_path: Path
) -> None:
    with pytest.raises(Unsupported, match="not a sentence encoder"):
        apply_steps(mlp.original(), (PackSequences(),), PassContext(model=mlp, workdir=tmp_path))
    ctx = PassContext(model=minilm, workdir=tmp_path)
    with pytest.raises(Unsupported, match="already pooled"):
        apply_steps(minilm.original(), (PoolInModel(), PackSequences()), ctx)
    roberta = transformers.RobertaModel(
        transformers.RobertaConfig(
            vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2
        )
    ).eval()
    other = replace(minilm.original(), module=TupleOutputs(roberta, ("last_hidden_state",)))
    with pytest.raises(Unsupported, match="not roberta"):
        apply_steps(other, (PackSequences(),), ctx)
