"""llama.cpp's quantizer on the tiny Llama's f32 GGUF: Q8_0 is smaller and within the budget's
KL; Q4_0 is far further from the reference; a made file is reused; a quantized
input is refused in one line. The random model's next-token distributions are nearly flat
(entropy ~8 nats), so top-1 flips on near-ties even for Q8_0 (~0.87): KL is the measure here."""

from __future__ import annotations

from pathlib import Path

import pytest

from mahir.errors import BadInput
from mahir.families.decoder import LanguageModel
from mahir.generation_quality import (
    GenerationBudget,
    GenerationQuality,
    Judging,
    held_out_answers,
    judge,
)
from mahir.passes.gguf import GgufQuantize, quantize_gguf
from mahir.runtimes.engines import open_engine
from mahir.types import Artifact, RuntimeOptions

ONE_THREAD = RuntimeOptions(threads=1)


@pytest.fixture(scope="module")
def quantized(tiny_gguf: Artifact, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Artifact]:
    folder = tmp_path_factory.mktemp("quantized")
    return {
        kind: quantize_gguf(tiny_gguf, GgufQuantize(kind), folder=folder)
        for kind in ("Q8_0", "Q6_K", "IQ4_NL", "Q4_0")
    }


def _quality(llm: LanguageModel, artifact: Artifact) -> GenerationQuality:
    judging = Judging(passages=4, tokens=96, prompts=2, greedy_tokens=8)
    reference = open_engine("torch", llm.original(), ONE_THREAD)
    answers = held_out_answers(reference, llm.family, judging)
    return judge(open_engine("llama.cpp", artifact, ONE_THREAD), answers)


def test_q8_0_is_smaller_and_within_budget(
    tiny_llm: LanguageModel, tiny_gguf: Artifact, quantized: dict[str, Artifact]
) -> None:
    q8 = quantized["Q8_0"]
    assert q8.meta["gguf_type"] == "Q8_0"
    assert q8.size_mb() < tiny_gguf.size_mb() / 2.5  # 8.5 bits a weight instead of 32
    assert open_engine("llama.cpp", q8, ONE_THREAD).describe()["gguf_type"] == "Q8_0"
    assert _quality(tiny_llm, q8).kl_mean <= GenerationBudget().max_kl


def test_q4_0_is_further(tiny_llm: LanguageModel, quantized: dict[str, Artifact]) -> None:
    """Sizes say little here: the tiny model is nearly all its tied embedding, which llama.cpp
    keeps in Q8_0 in both files (it is the output layer too)."""
    q8, q4 = quantized["Q8_0"], quantized["Q4_0"]
    assert _quality(tiny_llm, q4).kl_mean > 10 * _quality(tiny_llm, q8).kl_mean


def test_the_engine_counts_each_files_tensor_types(quantized: dict[str, Artifact]) -> None:
    """A file type names a mix: llama.cpp keeps norms in f32 and the tied embedding in a wider
    type, and a k-quant falls back per tensor where a row is not whole super-blocks of 256 (the
    tiny model's rows are narrower), so the engine says what its file holds."""
    held = {
        kind: open_engine("llama.cpp", artifact, ONE_THREAD).describe()["tensor_types"]
        for kind, artifact in quantized.items()
    }
    assert len({sum(counts.values()) for counts in held.values()}) == 1  # the same tensors
    for kind in ("Q8_0", "IQ4_NL", "Q4_0"):
        assert {kind, "F32"} <= set(held[kind])
    assert "Q6_K" not in held["Q6_K"]  # every layer fell back to a 32-wide block type
    assert set(held["Q6_K"]) - {"F32"} <= {"Q8_0", "Q5_0", "Q5_1", "Q6_K"}


def test_a_made_file_is_reused(tiny_gguf: Artifact, quantized: dict[str, Artifact]) -> None:
    q8 = quantized["Q8_0"]
    assert q8.path is not None
    made = q8.path.stat().st_mtime_ns
    again = quantize_gguf(tiny_gguf, GgufQuantize("Q8_0"), folder=q8.path.parent)
    assert again.path == q8.path
    assert q8.path.stat().st_mtime_ns == made


def test_a_quantized_input_is_refused_in_one_line(
    quantized: dict[str, Artifact], tmp_path: Path
) -> None:
    with pytest.raises(BadInput, match=r"cannot quantize .* to Q4_0") as raised:
        quantize_gguf(quantized["Q8_0"], GgufQuantize("Q4_0"), folder=tmp_path)
    assert "\n" not in str(raised.value)
    assert not list(tmp_path.iterdir())
