"""`mahir bench --llm` on a tiny random-weight Llama: the table printed, the JSON written with
timings and fidelity per engine, and what only encoders take refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mahir.model import default_model_folder
from tests.helpers import cli

SMALL = ("--tokens", "48-96", "--new-tokens", "4-8", "--prompts", "2", "--threads", "1")


def test_bench_llm_prints_the_table_and_writes_the_json(
    decoder_folders: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    folder = str(decoder_folders["llama"])
    engines = ("-r", "torch", "-r", "torch-int8")
    found = cli("bench", folder, *engines, *SMALL, "-b", "3", "--json", str(out))
    assert found.returncode == 0, found.stderr
    for text in ("batch 1", "TTFT", "ms/tok", "tok/s@3", "torch-int8", "KL", "greedy", "budget"):
        assert text in found.stdout
    data = json.loads(out.read_text())
    assert data["batch_size"] == 1
    assert data["model"]["family"] == "decoder"
    assert data["workload"]["prompts"] == 2
    rows = {row["engine"]: row for row in data["results"]}
    assert list(rows) == ["torch", "torch-int8"]
    reference = rows["torch"]
    assert reference["quality"]["top1_agreement"] == 1.0
    assert reference["quality"]["kl_mean"] == 0.0
    assert reference["within_budget"]
    assert reference["speedup"] == 1.0
    assert rows["torch-int8"]["settings"]["weights"] == "int8 weight-only (torchao)"
    assert reference["settings"]["weights"] == "original"
    for row in rows.values():
        assert row["generations"] == 2
        assert 8 <= row["tokens"] <= 16  # each prompt's new tokens, stop tokens ignored
        assert row["decode_ms"]["p50"] > 0
        assert row["ttft_ms"]["p50"] > 0
        assert row["output_tokens_per_s"] > 0
        assert row["size_mb"] > 0
        together = row["at_once"]["3"]
        assert together["how"] == "batch"  # PyTorch eager: a continuous batch of three slots
        # two prompts cycled into one group of three, each row its group's longest new tokens
        assert 3 * 4 <= together["tokens"] <= 3 * 8
        assert together["output_tokens_per_s"] > 0


def test_bench_llm_runs_llama_cpp_on_written_and_quantized_ggufs(
    decoder_folders: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    folder = str(decoder_folders["llama"])
    engines = ("-r", "torch", "-r", "llama.cpp", "-r", "llama.cpp-q8_0")
    found = cli("bench", folder, *engines, *SMALL, "-b", "2", "--json", str(out))
    assert found.returncode == 0, found.stderr
    rows = {row["engine"]: row for row in json.loads(out.read_text())["results"]}
    assert list(rows) == ["torch", "llama.cpp", "llama.cpp-q8_0"]
    assert rows["llama.cpp"]["at_once"]["2"]["how"] == "streams"  # a batch of two slots
    f32, q8 = rows["llama.cpp"], rows["llama.cpp-q8_0"]
    assert (f32["settings"]["gguf_type"], q8["settings"]["gguf_type"]) == ("F32", "Q8_0")
    assert q8["settings"]["weights"] == "GGUF Q8_0"
    assert f32["settings"]["threads"] == 1
    assert f32["quality"]["kl_mean"] < 1e-4  # the reference's own tensors
    assert q8["size_mb"] < f32["size_mb"] / 2.5
    for row in (f32, q8):
        assert 8 <= row["tokens"] <= 16
        assert row["decode_ms"]["p50"] > 0


def test_llama_cpp_refuses_what_it_cannot_write_in_one_line(
    decoder_folders: dict[str, Path],
) -> None:
    found = cli("bench", str(decoder_folders["gpt2"]), "-r", "llama.cpp", *SMALL)
    assert found.returncode == 2, found.stderr
    assert "not GPT2LMHeadModel" in found.stderr
    assert len(found.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--prompts", "3"), "--prompts is for LLMs: add --llm"),
        ((str(default_model_folder()), "--llm"), "is not a decoder LLM"),
        (("--llm", "-r", "tensorrt-llm"), "unknown LLM engine 'tensorrt-llm'"),
        (("--llm", "--workdir", "w"), "--workdir are not for LLMs"),
        (("--llm", "-b", "8", "-b", "0"), "requests at once must be >= 2"),
        (("--llm", "--data", "p.txt", "--tokens", "8-16"), "--data gives the prompts"),
        (("--llm", "--data", "nosuch.txt"), "--data nosuch.txt is not a file"),
        (("--llm", "--prompts", "nosuch.txt"), "--prompts nosuch.txt is not a file"),
        (("--llm", "--prompts", "0"), "--prompts must be >= 1, got 0"),
        (("--llm", "--tokens", "10-5"), "--tokens 10-5 is empty"),
    ],
)
def test_what_llms_do_not_take_is_refused_in_one_line(args: tuple[str, ...], message: str) -> None:
    found = cli("bench", *args)
    assert found.returncode == 2, found.stderr
    assert message in found.stderr
    assert len(found.stderr.strip().splitlines()) == 1


def test_prompts_from_a_file_come_through_prompts_as_through_data(
    decoder_folders: dict[str, Path], tmp_path: Path
) -> None:
    """bench's --prompts takes a file, as optimize's does, or a count of prompts to generate."""
    asked = tmp_path / "asked.txt"
    asked.write_text("What is the capital of France?\nName three colors.\n")
    folder, out = str(decoder_folders["llama"]), tmp_path / "bench.json"
    small = ("-r", "torch", "--new-tokens", "3-3", "--threads", "1")
    found = cli("bench", folder, *small, "--prompts", str(asked), "--json", str(out))
    assert found.returncode == 0, found.stderr
    workload = json.loads(out.read_text())["workload"]
    assert workload["origin"] == str(asked)
    assert workload["prompts"] == 2
