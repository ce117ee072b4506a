"""`mahir apply` on an LLM recipe: the variant is rebuilt from the recorded source, judged against
the fp32 reference and written as an output directory that reopens with the same greedy tokens;
recipes no variant runs are refused in one line before the model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mahir.families.decoder import LanguageModel
from mahir.generation import Sampling
from mahir.llm_outdir import open_llm_output
from mahir.passes.gguf import GgufQuantize
from mahir.passes.torchao import TorchaoInt8
from mahir.recipe import ModelSource, Recipe
from mahir.runtimes.engines import open_engine
from mahir.search.llm_variants import VARIANTS, variant_artifact
from mahir.types import RuntimeOptions
from tests.helpers import cli

ONE_THREAD = RuntimeOptions(threads=1)


def _recipe(model: LanguageModel, folder: Path, steps: tuple[object, ...], engine: str) -> Path:
    path = folder / "recipe.yaml"
    Recipe(steps, engine, ONE_THREAD, ModelSource.of(model.source)).save(path)
    return path


def test_a_llamacpp_recipe_replays_into_a_directory_that_answers_alike(
    tiny_llm: LanguageModel, tmp_path: Path
) -> None:
    pytest.importorskip("llama_cpp")
    recipe = _recipe(tiny_llm, tmp_path, (), "llama.cpp")  # the f32 GGUF written from the source
    out = tmp_path / "out"
    found = cli("apply", str(recipe), "--out", str(out))
    assert found.returncode == 0, found.stderr
    assert "(llama.cpp: original weights on llama.cpp)" in found.stdout
    manifest = json.loads((out / "mahir.json").read_text())
    assert (manifest["variant"], manifest["format"]) == ("llama.cpp", "gguf")
    assert manifest["fidelity"]["top1_agreement"] >= 0.93
    assert (out / "recipe.yaml").read_text() == recipe.read_text()
    generator, _ = open_llm_output(out)
    built = variant_artifact(VARIANTS["llama.cpp"], tiny_llm, ONE_THREAD)
    prompt = tiny_llm.family.held_out(1, 16)[0]
    greedy = Sampling(max_new_tokens=8)
    expected = list(open_engine("llama.cpp", built, ONE_THREAD).stream(prompt, greedy))
    assert list(generator.stream(prompt, greedy)) == expected


def test_a_replay_outside_the_budget_is_written_and_exits_1(
    tiny_llm: LanguageModel, tmp_path: Path
) -> None:
    """Q8_0 of random weights, whose next-token choices are near ties, misses top-1 0.93."""
    pytest.importorskip("llama_cpp")
    recipe = _recipe(tiny_llm, tmp_path, (GgufQuantize("Q8_0"),), "llama.cpp")
    found = cli("apply", str(recipe), "--out", str(tmp_path / "out"))
    assert found.returncode == 1
    assert "outside the quality budget: top-1 agreement" in found.stderr
    manifest = json.loads((tmp_path / "out" / "mahir.json").read_text())
    assert manifest["variant"] == "llama.cpp-q8_0"
    assert manifest["fidelity"]["top1_agreement"] < 0.93


@pytest.mark.parametrize(
    ("steps", "engine", "message"),
    [
        ((GgufQuantize("Q8_0"),), "torch", "no LLM variant runs torch with GGUF Q8_0"),
        ((TorchaoInt8(), GgufQuantize("Q8_0")), "llama.cpp", "at most one weight step"),
    ],
)
def test_a_recipe_no_variant_runs_is_one_line_before_the_model_loads(
    tiny_llm: LanguageModel, tmp_path: Path, steps: tuple[object, ...], engine: str, message: str
) -> None:
    recipe = _recipe(tiny_llm, tmp_path, steps, engine)
    found = cli("apply", str(recipe), "--out", str(tmp_path / "o"))
    assert found.returncode == 2
    assert message in found.stderr
    assert len(found.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_an_llm_step_in_an_encoder_recipe_is_refused(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    Recipe((GgufQuantize("Q8_0"),), "onnxruntime", RuntimeOptions(), None).save(recipe)
    found = cli("apply", str(recipe), "--out", str(tmp_path / "o"))
    assert found.returncode == 2
    assert "GgufQuantize is a step of an LLM recipe" in found.stderr
