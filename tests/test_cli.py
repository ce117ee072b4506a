"""`mahir bench`, and `mahir optimize` then `mahir export`, end to end through the real console
entry point in a fresh process; what the command line refuses, in this process (`cli`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mahir.workload import Workload
from tests.helpers import TESTS, cli, mahir, tiny_factory


def test_bench_default_model_on_every_cpu_runtime(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = mahir(
        "bench", "-r", "torch", "-r", "onnxruntime", "-r", "openvino",
        "-b", "1", "-b", "4", "--seconds", "0.3", "--json", str(out), installed=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["model"]["name"] == "all-MiniLM-L6-v2"
    assert report["model"]["pooling"] == {"mode": "mean", "normalize": True}
    assert report["machine"]["physical_cores"] >= 1
    rows = {(r["runtime"], r["batch_size"]): r for r in report["results"]}
    assert set(rows) == {(r, b) for r in ("torch", "onnxruntime", "openvino") for b in (1, 4)}
    for (runtime, _), row in rows.items():
        assert row["device"] == "cpu"
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["throughput"] > 0
        assert row["tokens_per_s"] > row["throughput"]
        # fp32 runtimes on the same model: the sentence embeddings agree
        assert row["quality"]["measured_on"] == "sentence_embedding"
        assert row["quality"]["cosine_min"] > 0.9999, runtime
        assert row["quality"]["max_abs_err"] < 1e-3
    assert rows[("torch", 1)]["speedup"] == pytest.approx(1.0)
    assert rows[("openvino", 1)]["settings"]["precision"] == "f32"
    # the table names every runtime and the workload that produced the numbers is saved
    for runtime in ("torch", "onnxruntime", "openvino"):
        assert runtime in result.stdout
    workload = Workload.load(out.with_suffix(".workload.npz"))
    assert sorted(workload.batches) == [1, 4]
    assert len(workload.texts) > 0


def test_bench_a_factory_model_on_every_runtime(tmp_path: Path) -> None:
    """Other sources' bench (a CNN, a two-input module, ...): tests/search/test_sources.py."""
    runtimes = ("torch", "torch-compile", "onnxruntime", "openvino")
    out = tmp_path / "bench.json"
    args = [arg for r in runtimes for arg in ("-r", r)]
    result = mahir(
        "bench", f"{TESTS / 'models.py'}:mlp", "--logits", "output", *args,
        "-b", "1", "-b", "8", "--seconds", "0.2", "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["results"]
    assert {r["runtime"] for r in rows} == set(runtimes)
    for row in rows:
        assert row["quality"]["measured_on"] == "outputs"
        assert row["quality"]["cosine_min"] > 0.9999
        assert row["quality"]["outputs"]["output"]["top1_agreement"] == 1.0
        assert row["tokens_per_s"] is None
    workload = np.load(out.with_suffix(".workload.npz"))
    assert "b8/0/x" in workload.files


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("bench", "no/such/model"), "does not exist"),
        (("bench", "-r", "tensorrt-xl"), "unknown runtime"),
        (("bench", "--tokens", "many"), "MIN-MAX"),
        (("bench", "-b", "0"), "batch"),
        (("bench", "--seconds", "-1"), "--seconds must be >= 0, got -1"),
        (("bench", "tests"), "tests has no config.json"),
        (("bench", "--json", "/proc/b.json"), "--json /proc/b.json: cannot create files in"),
        (("bench", "--llm", "--json", "tests"), "--json tests is a folder: give a file to write"),
        (("bench", "--device", "gpu"), "unknown device 'gpu'"),
        (("bench", "--device", "cuda:7"), "no cuda:7 here"),
        (("bench", "--llm", "--device", "cuda:7"), "no cuda:7 here"),
        (("optimize", "--llm", "--device", "cuda:7", "--out", "/tmp/never"), "no cuda:7 here"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args: tuple[str, ...], message: str) -> None:
    result = cli(*args)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr  # not even a blank line a spinner left
    assert lines[0].startswith("error:")
    assert message in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["bench", "optimize", "serve", "profile"])
def test_a_missing_source_is_refused_before_torch_is_imported(command: str) -> None:
    """A typo in the path is one line at once, not after the seconds torch takes to import:
    here importing torch fails, and the refusal comes anyway."""
    script = (
        "import sys; sys.modules['torch'] = None; from mahir.cli import main; "
        f"sys.argv = ['mahir', {command!r}, 'no/such/model']; main()"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: no/such/model does not exist: give "), done.stderr
    assert len(done.stderr.splitlines()) == 1


def test_debug_shows_the_traceback() -> None:
    result = cli("--debug", "bench", "no/such/model")
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "BadInput" in result.stderr


def test_optimize_then_export_through_the_command(
    optimized_mlp: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    """The commands a user chains: optimize a model, then export the winner for Triton.
    (The same run's batching record and `mahir serve` of it: tests/serve/test_tune.py.)"""
    out, found = optimized_mlp
    repo = tmp_path / "repo"
    assert found.returncode == 0, found.stderr
    assert "report:" in found.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["best"] in ("torch", "onnxruntime")  # the baseline is always measured too
    assert (out / "mahir.json").is_file()
    exported = mahir("export", str(out), "--triton", str(repo))
    if report["best"] == "onnxruntime":
        assert exported.returncode == 0, exported.stderr
        assert len(list(repo.glob("*/config.pbtxt"))) == 1
    else:  # a torch program: refused in one line, nothing written
        assert exported.returncode == 2
        assert len(exported.stderr.strip().splitlines()) == 1
        assert not repo.exists()


def test_the_command_list_gives_each_summary_unbroken() -> None:
    """A summary is its docstring's first paragraph, joined, not cut where the source wraps."""
    result = cli("--help", env={"COLUMNS": "400"})
    assert result.returncode == 0
    rows = [line for line in result.stdout.splitlines() if " profile " in line]
    assert len(rows) == 1
    assert "bytes, and place the model and its heaviest ops on the roofline" in rows[0]


def test_help_shows_bracketed_text_that_rich_would_read_as_markup() -> None:
    result = cli("serve", "--help", env={"COLUMNS": "200"})
    assert result.returncode == 0
    assert "mahir[ray]" in result.stdout
    assert result.stdout.count("[default: tuned") == 4  # batch size, delay, padding, workers


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--out", "{tmp}/photos"), "not a mahir output directory"),
        (("--out", "{tmp}/notes.txt/out"), "notes.txt is a file"),
        (("--out", "/proc/mahir-out"), "cannot create files in /proc"),  # procfs refuses root too
        (("--max-drop", "2"), "must be in [0, 0.5) for fidelity, got 2.0"),
        (("--max-drop", "0.6"), "must be in [0, 0.5) for fidelity, got 0.6"),
        (("--max-drop", "-0.1"), "must be in [0, 0.5) for fidelity, got -0.1"),
        (("--max-drop", "nan"), "must be in [0, 0.5) for fidelity, got nan"),
        (("--max-drop", "nan", "--metric", "m.py:f", "--data", "{tmp}/notes.txt"), "got nan"),
        (("--device", "cuda:7"), "no cuda:7 here"),
    ],
)
def test_optimize_refuses_bad_arguments_before_loading_the_model(
    args: tuple[str, ...], message: str, tmp_path: Path
) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_text("precious")
    (tmp_path / "notes.txt").write_text("mine")
    filled = [arg.format(tmp=tmp_path) for arg in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "out")]
    result = cli("optimize", tiny_factory(tmp_path), "--only", "onnxruntime", *out, *filled)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    assert message in lines[0]
    assert not (tmp_path / "loaded").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "photos", "tiny.py"]


def test_optimize_refuses_sentences_for_a_tensor_model_before_the_search(tmp_path: Path) -> None:
    (tmp_path / "queries.txt").write_text("how fast is it?\n")
    result = cli(
        "optimize", tiny_factory(tmp_path), "--sentences", str(tmp_path / "queries.txt"),
        "--only", "onnxruntime", "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --sentences shape text, and model takes tensors (input): leave --sentences out"
    )
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / ".out.cache.jsonl").exists()


@pytest.mark.parametrize("command", ["bench", "optimize"])
def test_an_output_directory_given_as_a_model_says_what_takes_it(
    served_mlp_dir: Path, command: str, tmp_path: Path
) -> None:
    out = ["--out", str(tmp_path / "out")] if command == "optimize" else []
    result = cli(command, str(served_mlp_dir), *out)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: {served_mlp_dir} is a mahir output directory, not a model: give the model it "
        "was made from (mahir profile and mahir serve take the directory)"
    ]
