"""`mahir optimize --llm` on a tiny random-weight Llama: candidates judged before timing (int8
rejected under a budget it cannot meet, with the measure it failed), the output directory
written whole, the winner reopened with the same greedy tokens, the report self-contained, and
a bad --out refused in one line before any work."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from mahir.errors import BadInput
from mahir.export.hf_folder import reference_folder
from mahir.families.decoder import LanguageModel
from mahir.generation import Generator, Sampling
from mahir.generation_quality import GenerationBudget, Judging
from mahir.llm_outdir import open_llm_output
from mahir.passes.gguf import GgufQuantize
from mahir.passes.torchao import TorchaoInt8
from mahir.recipe import ModelSource, load_recipe
from mahir.report.llm_html import render_llm_html
from mahir.runtimes.engines import open_engine
from mahir.search.llm_optimize import (
    LlmCandidate,
    LlmOptimizeConfig,
    LlmOutcome,
    LlmSearched,
    optimize_llm,
    thread_counts,
)
from mahir.search.llm_output import llm_report, llm_table, save_llm_output, winner_recipe
from mahir.search.llm_variants import VARIANTS, WEIGHT_STEPS, variant_artifact
from mahir.types import RuntimeOptions
from tests.helpers import cli

EXACT = GenerationBudget(min_top1=1.0, max_kl=1e-9)
"""Only answers identical to the reference's pass: int8 weights cannot."""
SMALL = dict(
    prompts=2,
    prompt_tokens=(16, 32),
    new_tokens=(4, 8),
    judging=Judging(passages=2, tokens=32, prompts=2, prompt_tokens=8, greedy_tokens=8),
)


@pytest.fixture(scope="module")
def searched(tiny_llm: LanguageModel) -> LlmSearched:
    config = LlmOptimizeConfig(
        variants=("torch", "torch-int8"), threads=(1,), budget=EXACT, **SMALL
    )  # type: ignore[arg-type]
    return optimize_llm(tiny_llm, config)


def _greedy(generator: Generator, prompt: list[int]) -> list[int]:
    return list(generator.stream(prompt, Sampling(max_new_tokens=12)))


def test_thread_counts_stay_few() -> None:
    assert thread_counts(1) == (1,)
    assert thread_counts(2) == (2,)
    assert thread_counts(4) == (4, 3, 2)
    assert thread_counts(16) == (16, 15, 8)


def test_a_candidate_outside_the_budget_is_rejected_before_timing(searched: LlmSearched) -> None:
    by_id = {o.candidate.id: o for o in searched.outcomes}
    assert list(by_id) == ["torch/1t", "torch-int8/1t"]
    int8 = by_id["torch-int8/1t"]
    assert int8.status == "rejected"
    assert int8.reason is not None
    assert "KL" in int8.reason
    assert int8.rounds == []  # never timed
    baseline = by_id["torch/1t"]
    assert baseline.status == "ok"
    assert baseline.rounds
    assert baseline.rounds[0].speedup == 1.0
    assert baseline.rounds[0].decode_p50_ms > 0
    assert searched.best is baseline
    assert searched.complete


def test_the_search_writes_the_directory_and_the_winner_reopens(
    searched: LlmSearched, tiny_llm: LanguageModel, tmp_path: Path
) -> None:
    out = save_llm_output(searched, tmp_path / "out")
    names = {p.name for p in out.iterdir()}
    assert {"mahir.json", "recipe.yaml", "report.json", "report.html", "model"} <= names
    manifest = json.loads((out / "mahir.json").read_text())
    assert manifest["engine"] == "torch"
    assert manifest["options"]["threads"] == 1
    assert manifest["stop_token_ids"] == list(tiny_llm.family.stop_token_ids)
    assert manifest["fidelity"]["kl_mean"] == 0.0
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["runtime"] == "torch"
    assert recipe["steps"] == []
    assert recipe["source"]["sha256"]
    report = json.loads((out / "report.json").read_text())
    assert report["best"] == "torch/1t"
    assert [c["status"] for c in report["candidates"]] == ["ok", "rejected"]
    assert "KL" in report["candidates"][1]["why"]
    generator, family = open_llm_output(out)
    prompt = tiny_llm.family.held_out(1, 16)[0]
    winner = open_engine("torch", searched.artifact, RuntimeOptions(threads=1))  # type: ignore[arg-type]
    assert _greedy(generator, prompt) == _greedy(winner, prompt)
    assert family.stop_token_ids == tiny_llm.family.stop_token_ids


def test_int8_weights_are_saved_as_int8_and_reopen_alike(
    searched: LlmSearched, tiny_llm: LanguageModel, tmp_path: Path
) -> None:
    """A winner with torchao int8 weights (here forced: the exact budget rejected it) is
    written as its int8 tensors, not quantized again when reopened."""
    int8 = next(o for o in searched.outcomes if o.candidate.variant == "torch-int8")
    artifact = variant_artifact(VARIANTS["torch-int8"], tiny_llm, RuntimeOptions(threads=1))
    forced = dataclasses.replace(searched, best=int8, artifact=artifact)
    out = save_llm_output(forced, tmp_path / "int8")
    recipe = load_recipe(out / "recipe.yaml", WEIGHT_STEPS)  # replayable: steps, engine, source
    assert recipe.steps == (TorchaoInt8(weight_only=True),)
    assert recipe.runtime == "torch"
    assert recipe.source == ModelSource.of(tiny_llm.source)
    generator, _ = open_llm_output(out)
    winner = open_engine("torch", artifact, RuntimeOptions(threads=1))
    assert generator.describe()["weights_mb"] == winner.describe()["weights_mb"]
    assert generator.describe()["weights_mb"] != tiny_llm.original().size_mb()
    prompt = tiny_llm.family.held_out(1, 16)[0]
    assert _greedy(generator, prompt) == _greedy(winner, prompt)


def test_a_llamacpp_winner_is_saved_as_its_gguf_and_reopens_alike(
    searched: LlmSearched, tiny_llm: LanguageModel, tmp_path: Path
) -> None:
    """A winner on another engine's format (forced here) keeps the file the search ran, and
    its family comes back from the config and tokenizer saved beside it."""
    pytest.importorskip("llama_cpp")
    options = RuntimeOptions(threads=1)
    artifact = variant_artifact(VARIANTS["llama.cpp-q8_0"], tiny_llm, options)
    forced = dataclasses.replace(
        searched, best=LlmOutcome(LlmCandidate("llama.cpp-q8_0", 1), "ok"), artifact=artifact
    )
    out = save_llm_output(forced, tmp_path / "q8")
    manifest = json.loads((out / "mahir.json").read_text())
    assert (manifest["format"], manifest["engine"]) == ("gguf", "llama.cpp")
    assert (out / manifest["model_file"]).read_bytes() == artifact.path.read_bytes()  # type: ignore[union-attr]
    recipe = load_recipe(out / "recipe.yaml", WEIGHT_STEPS)
    assert recipe.steps == (GgufQuantize("Q8_0"),)
    generator, family = open_llm_output(out)
    assert generator.describe()["gguf_type"] == "Q8_0"
    assert family.stop_token_ids == tiny_llm.family.stop_token_ids
    assert family.context_length == tiny_llm.family.context_length
    prompt = tiny_llm.family.held_out(1, 16)[0]
    winner = open_engine("llama.cpp", artifact, options)
    assert _greedy(generator, prompt) == _greedy(winner, prompt)


def test_a_vllm_winner_is_saved_as_the_folder_it_runs(
    searched: LlmSearched, tiny_llm: LanguageModel, tmp_path: Path
) -> None:
    """vLLM opens a Hugging Face folder: the winner's directory holds a copy of it."""
    artifact = reference_folder(tiny_llm)
    forced = dataclasses.replace(
        searched, best=LlmOutcome(LlmCandidate("vllm", 1), "ok"), artifact=artifact
    )
    out = save_llm_output(forced, tmp_path / "vllm")
    manifest = json.loads((out / "mahir.json").read_text())
    assert (manifest["format"], manifest["engine"], manifest["model_file"]) == (
        "hf", "vllm", "model/hf",
    )  # fmt: skip
    copied = out / "model" / "hf"
    assert artifact.path is not None
    assert sorted(p.name for p in copied.iterdir()) == sorted(
        p.name for p in artifact.path.iterdir()
    )


def test_throughput_at_a_concurrency_times_requests_at_once(tiny_llm: LanguageModel) -> None:
    config = LlmOptimizeConfig(
        objective="throughput", concurrency=2, variants=("torch", "llama.cpp"), threads=(1,),
        **SMALL,
    )  # type: ignore[arg-type]  # fmt: skip
    found = optimize_llm(tiny_llm, config)
    assert found.best is not None
    report = llm_report(found)
    assert report["concurrency"] == 2
    for outcome in report["candidates"]:
        last = outcome["rounds"][-1]
        assert last["generations"] == 0  # whole groups of two, no per-token clock
        assert last["tokens"] >= 2 * 4  # every group's two rows, each its new tokens
        assert last["output_tokens_per_s"] > 0
        # both engines batch by slots: each ran the two as a continuous batch of two
        assert outcome["settings"]["slots"] == 2, outcome["variant"]
    assert "2 requests at once" in str(llm_table(found).title)
    assert "2 requests at once" in render_llm_html(report)  # no decode time, and no crash
    recipe = winner_recipe(found)
    assert recipe is not None
    assert recipe.options.slots == 2  # what `mahir serve` opens the winner with


def test_requests_at_once_are_for_throughput() -> None:
    with pytest.raises(BadInput, match="for --objective throughput"):
        LlmOptimizeConfig(concurrency=4)


def test_the_report_is_self_contained(searched: LlmSearched, tmp_path: Path) -> None:
    page = (save_llm_output(searched, tmp_path / "out") / "report.html").read_text()
    assert "torch/1t wins" in page
    assert "<svg" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", page, re.IGNORECASE)


def test_optimize_llm_through_the_command(decoder_folders: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "llm-out"
    # the default: at most 192 here; three prompts generated, not the default four
    lengths = ("--tokens", "200-210", "--new-tokens", "5-6", "--prompts", "3")
    found = cli(
        "optimize", str(decoder_folders["llama"]), "--engines", "torch", *lengths, "--out", str(out)
    )
    assert found.returncode == 0, found.stderr
    for text in ("batch 1", "ms/tok", "torch/", "won:", "open_llm_output"):
        assert text in found.stdout
    assert (out / "mahir.json").is_file()
    assert (out / "model" / "weights.pt").is_file()
    workload = json.loads((out / "report.json").read_text())["workload"]
    assert 190 <= workload["prompt_tokens"]["min"] <= workload["prompt_tokens"]["max"] <= 210
    assert 5 <= workload["new_tokens"]["min"] <= workload["new_tokens"]["max"] <= 6
    assert workload["prompts"] == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--tokens", "5"), "--tokens takes MIN-MAX"),
        (("--tokens", "10-5"), "--tokens 10-5 is empty"),
        (("--new-tokens", "0-4"), "--new-tokens 0-4 is empty"),
        (("--prompts", "p.txt", "--tokens", "8-16"), "--prompts FILE gives the prompts"),
        (("--prompts", "p.txt"), "--prompts p.txt is not a file"),
        (("--prompts", "0"), "--prompts must be >= 1, got 0"),
    ],
)
def test_workload_options_are_checked_in_one_line(args: tuple[str, ...], message: str) -> None:
    found = cli("optimize", "--llm", *args, "--out", "never-written")
    assert found.returncode == 2, found.stderr
    assert message in found.stderr
    assert len(found.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_text("x"), "is a file"),
        (lambda p: (p.mkdir(), (p / "notes.txt").write_text("x")), "not a mahir output directory"),
    ],
)
def test_a_bad_out_is_refused_before_any_work(tmp_path: Path, make: object, message: str) -> None:
    out = tmp_path / "out"
    make(out)  # type: ignore[operator]
    found = cli("optimize", "--llm", "--out", str(out))
    assert found.returncode == 2, found.stderr
    assert message in found.stderr
    assert len(found.stderr.strip().splitlines()) == 1
