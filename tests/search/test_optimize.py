"""End-to-end: the search on real runtimes with a small model, its output directory, resume,
user metrics and interruption. Candidates are narrowed with `only` to keep the suite quick."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest

import mahir
import mahir.search.halving
from mahir.errors import BadInput
from mahir.model import Model
from mahir.passes import STEP_TYPES
from mahir.recipe import ModelSource, load_recipe
from mahir.report.html import render_html
from mahir.report.schema import Report, report_json
from mahir.search.budget import FidelityBudget
from mahir.search.optimize import cache_path, optimize
from mahir.search.optimize_config import OptimizeConfig
from mahir.search.optimize_result import OptimizeResult
from tests.helpers import TESTS

pytestmark = pytest.mark.usefixtures("short_rungs")  # what is timed matters, not how long
# Proposed on every CPU (int8 candidates are not, where the CPU lacks VNNI and AMX).
ONLY = ("onnxruntime", "openvino-f32")


@pytest.fixture(scope="module")
def result(
    mlp: Model, tmp_path_factory: pytest.TempPathFactory, short_rungs: None
) -> OptimizeResult:
    work = tmp_path_factory.mktemp("optimize")
    config = OptimizeConfig(only=ONLY, batch_sizes=(1, 4))
    return optimize(mlp, config, work / "work", cache_path=cache_path(work / "out"))


def test_the_winner_meets_the_budget_and_every_candidate_has_an_outcome(
    result: OptimizeResult,
) -> None:
    assert result.complete
    assert result.best is not None
    assert result.best.status == "ok"
    assert result.best.quality is not None
    assert FidelityBudget().judge(result.best.quality) is None
    ids = {o.candidate.id for o in result.candidates}
    assert {"torch", *ONLY} <= ids
    for outcome in result.candidates:
        assert outcome.status in ("ok", "rejected", "failed", "skipped")
        assert (outcome.reason is None) == (outcome.status == "ok"), outcome
    baseline = next(o for o in result.candidates if o.candidate.id == "torch")
    assert baseline.rounds >= result.best.rounds >= 1
    assert set(result.best.perf) == {1, 4}


def test_the_report_puts_the_baseline_and_the_winner_on_the_roofline(
    result: OptimizeResult,
) -> None:
    assert result.best is not None
    report = Report.from_dict(json.loads(report_json(result.report())))
    labels = [(r.label, r.candidate) for r in report.rooflines]
    expected = [("baseline", "torch")]
    if result.best.candidate.id != "torch":
        expected.append(("winner", result.best.candidate.id))
    assert labels == expected, report.roofline_note
    per_row = 2 * (32 * 64 + 64 * 64 + 64 * 10)  # the MLP's matmuls, profiled at batch 1
    for record in report.rooflines:
        assert record.inputs == {"x": [1, 32]}
        whole = record.whole
        assert whole.flops >= per_row  # the graph's own count: matmuls, and bias adds
        assert whole.ms > 0
        assert whole.bytes > 0
        assert whole.bound in ("compute", "memory", "overhead")
        assert 0 < (whole.roofline_fraction or 0) <= 1.5  # cache-resident operands may beat DRAM
        assert record.ops
        assert record.compute_peaks["fp32"] > 0
        assert record.bandwidth
        assert record.bandwidth > 1e8
    page = render_html(report)
    assert "How much is left on the table" in page
    assert 'id="plot-roofline"' in page
    assert "left on the table" in page


def test_the_winner_is_the_fastest_of_those_timed_longest(result: OptimizeResult) -> None:
    assert result.best is not None
    finalists = [o for o in result.candidates if o.rounds == result.best.rounds and o.perf]
    best_speedup = result.best.speedup("latency")
    assert best_speedup == max(o.speedup("latency") or 0.0 for o in finalists)


def test_the_report_names_the_device_its_peak_and_each_candidate_s_share_of_it(
    result: OptimizeResult,
) -> None:
    report = json.loads(report_json(result.report()))
    device = report["device"]
    assert device["device"] == "cpu"
    assert device["name"] == result.machine.cpu
    assert device["peaks"][0]["dtype"] == "fp32"
    assert device["peaks"][0]["flops_per_s"] > 0
    per_row = 2 * (32 * 64 + 64 * 64 + 64 * 10)  # tests/models.py's MLP
    assert report["cost"]["flops_per_batch"] == {"1": per_row, "4": 4 * per_row}
    timed = [c for c in report["candidates"] if c["perf"]]
    assert {c["id"] for c in timed} >= {"torch", *ONLY}
    for candidate in timed:
        assert candidate["utilization"].keys() == candidate["perf"].keys()
        for size, used in candidate["utilization"].items():
            assert used["precision"] == used["peak"] == "fp32"
            assert 0 < used["fraction"] < 1
            seconds = candidate["perf"][size]["p50_ms"] / 1e3
            assert used["flops_per_s"] == pytest.approx(int(size) * per_row / seconds)
    assert "Of peak</th>" in render_html(result.report())


def test_save_writes_a_directory_that_loads_and_replays(
    result: OptimizeResult, mlp: Model, tmp_path: Path
) -> None:
    out = result.save(tmp_path / "out")
    assert {p.name for p in out.iterdir()} == {
        "model",
        "mahir.json",
        "recipe.yaml",
        "report.json",
        "report.html",
    }
    report = json.loads((out / "report.json").read_text())
    assert report["best"] == result.best.candidate.id  # type: ignore[union-attr]
    assert report["complete"] is True
    recipe = load_recipe(out / "recipe.yaml", STEP_TYPES)
    assert recipe.source == ModelSource.of(mlp.source)  # what `mahir apply` replays
    session = mahir.load(str(out))  # as the README writes it
    batch = {"x": np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)}
    got = session.run(batch)["output"]
    expected = mlp.module(**{"x": __import__("torch").from_numpy(batch["x"])})[0].detach().numpy()
    assert got.argmax(axis=1).tolist() == expected.argmax(axis=1).tolist()


def test_a_failed_save_keeps_the_reports_and_says_where(
    result: OptimizeResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the reports are rescued to
    with pytest.raises(BadInput, match=r"^cannot write /proc/mahir-out \(") as caught:
        result.save("/proc/mahir-out")  # procfs refuses new files, even root's
    kept = re.search(r"report\.html are in (\S+):", str(caught.value))
    assert kept is not None
    folder = Path(kept[1])
    assert folder.parent == tmp_path
    assert json.loads((folder / "report.json").read_text())["best"] == result.report().best
    assert (folder / "report.html").stat().st_size > 0


def test_resume_reuses_every_measurement(
    mlp: Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = OptimizeConfig(only=("onnxruntime",), roofline=False)
    cache = tmp_path / "cache.jsonl"
    first = optimize(mlp, config, tmp_path / "w1", cache_path=cache)

    def no_timing(*args: object, **kwargs: object) -> None:
        raise AssertionError("a resumed run measured again")

    monkeypatch.setattr(mahir.search.halving, "measure", no_timing)
    second = optimize(mlp, config, tmp_path / "w2", cache_path=cache, resume=True)
    timed = {o.candidate.id: o for o in first.candidates if o.perf}
    assert timed
    for outcome in second.candidates:
        if outcome.candidate.id in timed:
            assert outcome.cached
            assert outcome.perf[1].p50_ms == timed[outcome.candidate.id].perf[1].p50_ms
    assert second.best is not None
    assert first.best is not None
    assert second.best.candidate.id == first.best.candidate.id
    assert second.artifact is not None  # rebuilt, so it can be written out


def test_a_user_metric_decides_instead_of_fidelity(mlp: Model, tmp_path: Path) -> None:
    """ONNX Runtime's fp32 answers differ from PyTorch's in the last bits: within fidelity,
    but not within a metric that demands the very same numbers. The decision must follow."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 32)).astype(np.float32)
    import torch

    reference = mlp.module(x=torch.from_numpy(x))[0].detach().numpy()
    data = tmp_path / "data.npz"
    np.savez(data, x=x, reference=reference)
    only = ("onnxruntime",)
    by_fidelity = optimize(mlp, OptimizeConfig(only=only, roofline=False), tmp_path / "w1")
    strict = OptimizeConfig(
        only=only,
        metric=f"{TESTS / 'metrics.py'}:exactness",
        data=data,
        max_drop=0.0,
        roofline=False,
    )
    by_metric = optimize(mlp, strict, tmp_path / "w2")
    assert by_fidelity.best is not None
    assert by_fidelity.best.candidate.id == "onnxruntime"
    assert by_metric.best is not None
    assert by_metric.best.candidate.id == "torch"
    ort = next(o for o in by_metric.candidates if o.candidate.id == "onnxruntime")
    assert ort.status == "rejected"
    assert "exactness" in (ort.reason or "")
    report = by_metric.report()
    assert report.budget.kind == "metric"
    assert report.budget.baseline_metric == 0.0
    out = by_metric.save(tmp_path / "out")  # a torch winner is saved as a program
    assert (out / "model" / "model.pt2").is_file()
    np.testing.assert_allclose(mahir.load(out).run({"x": x})["output"], reference, atol=1e-6)


def test_an_interrupted_run_leaves_a_valid_partial_report(mlp: Model, tmp_path: Path) -> None:
    def interrupt_at_openvino(candidate: str, text: str) -> None:
        if candidate == "openvino-f32" and text == "building":
            raise KeyboardInterrupt

    result = optimize(
        mlp,
        OptimizeConfig(only=ONLY, roofline=False),
        tmp_path / "w",
        on_event=interrupt_at_openvino,
    )
    assert not result.complete
    cut = next(o for o in result.candidates if o.candidate.id == "openvino-f32")
    assert cut.status == "skipped"
    assert cut.reason == "interrupted"
    out = result.save(tmp_path / "out")
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] is False
    assert "report.html" in {p.name for p in out.iterdir()}


def test_no_winner_never_replaces_an_earlier_model(mlp: Model, tmp_path: Path) -> None:
    good = optimize(mlp, OptimizeConfig(only=("onnxruntime",), roofline=False), tmp_path / "w1")
    out = good.save(tmp_path / "out")
    empty = OptimizeResult(**{**good.__dict__, "best": None, "artifact": None})
    written = empty.save(out)
    assert written == tmp_path / "out-report"
    assert (out / "mahir.json").is_file()
    assert (written / "report.json").is_file()


def test_a_tiny_time_budget_still_times_the_baseline(mlp: Model, tmp_path: Path) -> None:
    result = optimize(
        mlp, OptimizeConfig(only=ONLY, time_budget_s=1e-6, roofline=False), tmp_path / "w"
    )
    baseline = next(o for o in result.candidates if o.candidate.id == "torch")
    assert baseline.perf
    assert result.best is not None
    skipped = [o for o in result.candidates if o.candidate.id in ONLY]
    assert all(o.status == "skipped" and "time budget" in (o.reason or "") for o in skipped)
