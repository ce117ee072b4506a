"""An ONNX file as the source: its baseline (and reference) is the file itself on ONNX Runtime,
never PyTorch eager, in optimize, its report and bench; and what bench refuses for one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mahir import runtimes
from mahir.errors import BadInput
from mahir.export.onnx import export_onnx
from mahir.hardware import Machine
from mahir.measure import MeasureConfig
from mahir.model import Model, load_model
from mahir.report.html import render_html
from mahir.search.bench import BenchConfig, benchmark
from mahir.search.candidates import propose
from mahir.search.optimize import optimize
from mahir.search.optimize_config import OptimizeConfig
from mahir.types import Device, RuntimeOptions
from tests.helpers import mahir

OLD_XEON = Machine("Intel Xeon", 4, 8, ("avx2", "avx512"), 32.0)
QUICK = MeasureConfig(warmup_runs=1, min_time_s=0.05, min_runs=3, round_time_s=0.02)


@pytest.fixture(scope="module")
def mlp_onnx(mlp: Model, tmp_path_factory: pytest.TempPathFactory) -> Model:
    path = tmp_path_factory.mktemp("mlp-onnx") / "mlp.onnx"
    export_onnx(mlp, path)
    return load_model(path)


def test_the_baseline_of_an_onnx_file_is_the_file_on_onnx_runtime(mlp_onnx: Model) -> None:
    proposed, skipped = propose(mlp_onnx, OLD_XEON, "latency")
    assert (proposed[0].id, proposed[0].recipe.runtime) == ("onnxruntime", "onnxruntime")
    assert proposed[0].recipe.steps == ()
    assert [c.id for c in proposed].count("onnxruntime") == 1
    reasons = dict((c.id, why) for c, why in skipped)
    assert "ONNX" in reasons["torch"]
    assert "ONNX" in reasons["torch-compile"]


def test_optimize_an_onnx_file_names_its_baseline(mlp_onnx: Model, tmp_path: Path) -> None:
    config = OptimizeConfig(only=("openvino-f32",), batch_sizes=(1,))
    result = optimize(mlp_onnx, config, tmp_path / "work")
    report = result.report()
    assert report.baseline == "onnxruntime"
    by_id = {c.id: c for c in report.candidates}
    assert set(by_id) >= {"onnxruntime", "openvino-f32", "torch"}
    assert by_id["onnxruntime"].status == "ok"
    assert by_id["onnxruntime"].speedup == pytest.approx(1.0)
    assert by_id["torch"].status == "skipped"
    assert result.best is not None
    assert report.cost is not None
    assert report.cost.flops_per_batch == {}
    assert (report.cost.note or "").startswith("not counted: an ONNX source")
    assert all(not c.utilization for c in report.candidates)
    html = render_html(report)
    assert "not counted: an ONNX source" in html
    assert "speedup over ONNX Runtime fp32" in html
    assert "over PyTorch eager" not in html


def test_mahir_optimize_on_an_onnx_file_with_only(mlp_onnx: Model, tmp_path: Path) -> None:
    out = tmp_path / "out"
    source = str(mlp_onnx.onnx_path)
    done = mahir(
        "optimize", source, "--only", "onnxruntime", "--out", str(out), "--no-tune-serving"
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "report.json").read_text())["best"] == "onnxruntime"


def test_bench_runs_what_can_run_an_onnx_file(mlp_onnx: Model, tmp_path: Path) -> None:
    config = BenchConfig(batch_sizes=(2,), measure=QUICK, batches_per_size=2)
    result = benchmark(mlp_onnx, config, tmp_path)
    assert {row.runtime for row in result.rows} == {"onnxruntime", "openvino"}
    assert result.baseline == "onnxruntime"
    baseline = next(row for row in result.rows if row.runtime == "onnxruntime")
    assert result.speedup(baseline) == pytest.approx(1.0)
    with pytest.raises(BadInput, match="ONNX file: choose from"):
        benchmark(mlp_onnx, BenchConfig(runtimes=("torch",), measure=QUICK), tmp_path)


def test_bench_refuses_text_options_for_a_tensor_model(mlp_onnx: Model, tmp_path: Path) -> None:
    config = BenchConfig(token_range=(8, 16), measure=QUICK)
    with pytest.raises(BadInput, match="--tokens shape text, and mlp takes tensors"):
        benchmark(mlp_onnx, config, tmp_path)


def test_bench_on_a_gpu_keeps_to_the_runtimes_that_run_there(
    mlp: Model, mlp_onnx: Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused before any work: a runtime that does not run on the device asked for, one whose
    ONNX Runtime provider this machine lacks, and a source no GPU runtime here can open (ONNX
    Runtime here is the CPU build)."""
    monkeypatch.setattr(runtimes, "available_providers", lambda: ("CPUExecutionProvider",))
    gpu = RuntimeOptions(device=Device.parse("cuda"))
    asked = BenchConfig(runtimes=("torch", "openvino"), options=gpu, measure=QUICK)
    with pytest.raises(
        BadInput, match=r"^openvino cannot run on cuda:0: choose from torch, torch-compile$"
    ):
        benchmark(mlp, asked, tmp_path)
    no_cuda = "onnxruntime here has no CUDA provider: pip install onnxruntime-gpu"
    for names in (("torch", "onnxruntime"), ("onnxruntime-tensorrt",)):
        asked = BenchConfig(runtimes=names, options=gpu, measure=QUICK)
        with pytest.raises(BadInput, match=rf"^{no_cuda} \(in place of onnxruntime\)$"):
            benchmark(mlp, asked, tmp_path)
    with pytest.raises(BadInput, match=rf"^no runtime runs mlp on cuda:0 here \({no_cuda}"):
        benchmark(mlp_onnx, BenchConfig(options=gpu, measure=QUICK), tmp_path)
