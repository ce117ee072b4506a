"""`mahir profile` end to end (in this process: `tests.helpers.cli`) on tiny models, and what it
refuses in one line before any work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mahir.outdir import MANIFEST
from tests.helpers import TESTS, cli
from tests.profile.graphs import wide_mlp_onnx

QUICK = ("--runs", "5", "--seconds", "0.2", "--threads", "1")


def test_an_onnx_file_on_onnxruntime_with_its_profile_and_trace(tmp_path: Path) -> None:
    model = wide_mlp_onnx(tmp_path / "wide.onnx").path
    out, trace = tmp_path / "profile.json", tmp_path / "trace.json"
    found = cli(
        "profile", str(model), "-b", "16", *QUICK, "--json", str(out), "--trace", str(trace)
    )
    assert found.returncode == 0, found.stderr
    for heading in ("time by op type", "heaviest ops", "of the roofline", "peaks measured"):
        assert heading in found.stdout
    report = json.loads(out.read_text())
    assert (report["runtime"], report["device"]) == ("onnxruntime", "cpu")
    assert report["inputs"] == {"x": [16, 512]}
    assert report["peaks"]["measured"]["fp32"] > 0
    assert report["peaks"]["bandwidth"] > 0
    assert report["whole"]["flops"] == pytest.approx(2 * 2 * 16 * 512 * 2048, rel=0.01)
    assert report["whole"]["bound"] in ("compute", "memory", "overhead")
    assert report["whole"]["roofline_fraction"] > 0
    assert report["profiled"]["op_ms"] > 0
    assert sum(row["count"] for row in report["by_type"]) == len(report["ops"])
    assert sum(op["advice"] is not None for op in report["ops"]) == min(10, len(report["ops"]))
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("cat") == "Node" for e in events)


def test_a_torch_model_on_torch_with_its_trace(tmp_path: Path) -> None:
    trace = tmp_path / "trace.json"
    found = cli(
        "profile", f"{TESTS / 'models.py'}:mlp", "-r", "torch", "-b", "8", *QUICK,
        "--trace", str(trace),
    )  # fmt: skip
    assert found.returncode == 0, found.stderr
    assert "mlp on torch, cpu: x 8x32" in found.stdout
    assert "linear" in found.stdout
    assert json.loads(trace.read_text())["traceEvents"]


def test_an_output_directory_on_its_own_runtime(served_mlp_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    found = cli("profile", str(served_mlp_dir), "-b", "4", *QUICK, "--json", str(out))
    assert found.returncode == 0, found.stderr
    report = json.loads(out.read_text())
    assert report["runtime"] == "onnxruntime"
    assert report["inputs"] == {"x": [4, 32]}
    assert report["ops"]


def test_an_output_directory_is_profiled_on_the_device_it_was_built_for(
    served_mlp_dir: Path, tmp_path: Path
) -> None:
    """Without --device a directory built for a GPU is profiled there: on a machine without
    that GPU it is refused in one line, not profiled on the CPU in its place."""
    out = tmp_path / "gpu-out"
    shutil.copytree(served_mlp_dir, out)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["options"]["device"] = "cuda:7"
    (out / MANIFEST).write_text(json.dumps(manifest))
    found = cli("profile", str(out), *QUICK)
    assert found.returncode == 2, found.stderr
    assert "no cuda:7 here" in found.stderr
    on_cpu = cli("profile", str(out), "--device", "cpu", *QUICK)
    assert on_cpu.returncode == 0, on_cpu.stderr
    assert "on onnxruntime, cpu" in on_cpu.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("profile", "no/such/model.onnx"), "does not exist"),
        (("profile", "-r", "tensorrt"), "reads the profilers of onnxruntime, openvino, torch"),
        (("profile", "-b", "0"), "--batch-size"),
        (("profile", "--threads", "0"), "--threads must be >= 1, got 0"),
        (("profile", "--runs", "0"), "--runs must be >= 1, got 0"),
        (("profile", "--seconds", "0"), "--seconds must be > 0, got 0"),
        (("profile", "--trace", "/proc/t.json"), "--trace /proc/t.json: cannot create files"),
        (("profile", "-r", "openvino", "--trace", "t.json"), "OpenVINO writes no trace"),
        (("profile", "--device", "gpu"), "unknown device 'gpu'"),
        (("profile", "--device", "cuda:7"), "no cuda:7 here"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_any_work(
    args: tuple[str, ...], message: str
) -> None:
    found = cli(*args)
    assert found.returncode == 2, found.stderr
    assert message in found.stderr
    assert len(found.stderr.strip().splitlines()) == 1


def test_an_llm_is_profiled_in_its_prefill_and_a_decode_step(
    decoder_folders: dict[str, Path], tmp_path: Path
) -> None:
    out, trace = tmp_path / "llm.json", tmp_path / "llm-trace.json"
    folder = str(decoder_folders["llama"])
    found = cli(
        "profile", folder, "--sequence-length", "24", *QUICK, "--json", str(out), "--trace",
        str(trace),
    )  # fmt: skip
    assert found.returncode == 0, found.stderr
    assert "prefill: 1 x 24 prompt tokens" in found.stdout
    assert "decode: one token per sequence over 24 cached" in found.stdout
    report = json.loads(out.read_text())
    assert report["prefill"]["inputs"] == {"input_ids": [1, 24]}
    assert report["decode"]["inputs"] == {"input_ids": [1, 1], "kv_cache_tokens": [1, 24]}
    assert json.loads(trace.read_text())["traceEvents"]


def test_a_broken_gguf_is_one_line(tmp_path: Path) -> None:
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF")
    found = cli("profile", str(source))
    assert found.returncode == 2, found.stderr
    assert len(found.stderr.strip().splitlines()) == 1
