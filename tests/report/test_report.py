"""report.html from a realistic report dict: the Pareto front, the sentences, the edge cases."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mahir.report.html import render_html, write_html
from mahir.report.schema import CandidateRecord, PerfRecord, Report, report_json
from mahir.report.verdicts import explain, pareto_front
from mahir.types import Perf

XSS = '<script>alert("x")</script> $5 & co'


def _perf(p50: float, *, noisy: bool = False, runs: int = 120, batch: int = 1) -> dict[str, Any]:
    """One batch size's timing with latencies drawn around `p50` (a few slow outliers)."""
    rng = np.random.default_rng(int(p50 * 1000))
    latencies = p50 * rng.lognormal(0.0, 0.15 if noisy else 0.04, runs)
    latencies[: runs // 40] *= 2.5
    p90, p99 = np.percentile(latencies, [90, 99])
    return {
        str(batch): {
            "p50_ms": p50,
            "p90_ms": float(p90),
            "p99_ms": float(p99),
            "throughput": 1000.0 * batch / p50,
            "latencies_ms": [round(float(x), 3) for x in latencies],
            "noisy": noisy,
            "runs": runs,
        }
    }


def _candidate(cid: str, label: str, runtime: str, status: str, **fields: Any) -> dict[str, Any]:
    quality = fields.pop("quality", None)
    return {
        "id": cid,
        "label": label,
        "recipe": {"runtime": runtime, "options": {}, "steps": fields.pop("steps", [])},
        "recipe_hash": hashlib.sha256(cid.encode()).hexdigest()[:12],
        "runtime": runtime,
        "settings": {"threads": 2},
        "status": status,
        "reason": fields.pop("reason", None),
        "quality": None
        if quality is None
        else {
            "cosine_mean": quality[0],
            "cosine_min": quality[1],
            "max_abs_err": 0.02,
            "top1_agreement": None,
            "metric": None,
            "metric_drop": None,
        },
        "perf": fields.pop("perf", {}),
        "speedup": fields.pop("speedup", None),
        "size_mb": fields.pop("size_mb", None),
        "build_s": fields.pop("build_s", 10.0),
        "rounds": fields.pop("rounds", 0),
    }


def example_report() -> dict[str, Any]:
    """all-MiniLM-L6-v2 on an AMD Zen 4 (numbers from the design notes): a winner, a faster
    candidate that missed the budget, a slower ok one, a noisy one, an untimed miss, a failure."""
    ok, base = "ok", 16.6
    candidates = [
        _candidate("torch", "PyTorch eager fp32", "torch", ok, quality=(1.0, 0.9999999999999998),
                   perf=_perf(base), speedup=1.0, size_mb=86.7, rounds=3),
        _candidate("ov-nncf-int8", "OpenVINO + NNCF int8", "openvino", ok, quality=(0.994, 0.989),
                   perf=_perf(3.5), speedup=base / 3.5, size_mb=22.9, rounds=3, build_s=41.0,
                   steps=[{"_type": "NncfInt8", "_version": 1, "_data": {"preset": "mixed"}}]),
        _candidate("ov-bf16", "OpenVINO bf16", "openvino", ok, quality=(0.9996, 0.9991),
                   perf=_perf(4.6), speedup=base / 4.6, size_mb=43.5, rounds=3),
        _candidate("ov-fp32", "OpenVINO fp32", "openvino", ok, quality=(0.99999, 0.99998),
                   perf=_perf(6.0), speedup=base / 6.0, size_mb=86.8, rounds=2),
        _candidate("ort-fp32", "ONNX Runtime fp32", "onnxruntime", ok,
                   quality=(0.99999, 0.99997), perf=_perf(6.4, noisy=True), speedup=base / 6.4,
                   size_mb=86.8, rounds=2),
        _candidate("ort-dynamic-int8-pc", "ONNX Runtime dynamic int8 (per-channel)",
                   "onnxruntime", ok, quality=(0.991, 0.983), perf=_perf(5.1),
                   speedup=base / 5.1, size_mb=22.9, rounds=1),
        _candidate("prune-ffn-30", "Torch-Pruning FFN 30% + OpenVINO int8", "openvino", "rejected",
                   quality=(0.951, 0.912), reason="worst cosine 0.912 < 0.98", perf=_perf(2.4),
                   speedup=base / 2.4, size_mb=16.1, rounds=1),
        _candidate("ort-dynamic-int8", "ONNX Runtime dynamic int8 (per-tensor)", "onnxruntime",
                   "rejected", quality=(0.962, 0.885), reason="worst cosine 0.885 < 0.98"),
        _candidate("torch-compile", "PyTorch torch.compile fp32", "torch", "failed",
                   reason="RuntimeFailure: inductor needs a C++ compiler: install g++"),
    ]  # fmt: skip
    return {
        "schema": 1,
        "date": "2026-11-25T10:00:00+00:00",
        "complete": True,
        "objective": "latency",
        "batch_sizes": [1],
        "budget": {
            "description": "sentence-embedding cosine mean >= 0.99 and worst >= 0.98",
            "kind": "fidelity",
            "cosine_mean": 0.99,
            "cosine_min": 0.98,
        },
        "machine": {
            "cpu": "AMD EPYC 9R14 96-Core Processor",
            "physical_cores": 2,
            "logical_cores": 2,
            "isa": ["avx2", "avx512", "avx512_vnni", "avx512_bf16"],
            "memory_gb": 23.5,
            "gpus": [],
        },
        "model": {
            "name": "all-MiniLM-L6-v2",
            "source": "sentence-transformers/all-MiniLM-L6-v2",
            "inputs": [
                {"name": n, "dtype": "int64", "shape": ["batch", "sequence"]}
                for n in ("input_ids", "token_type_ids", "attention_mask")
            ],
            "outputs": ["last_hidden_state"],
            "pooling": {"mode": "mean", "normalize": True},
            "max_length": 256,
        },
        "workload": {
            "batch_sizes": [1],
            "batches_per_size": {"1": 8},
            "tokens": {"min": 9, "median": 74.0, "max": 126},
        },
        "time_budget_s": 600.0,
        "elapsed_s": 512.3,
        "baseline": "torch",
        "best": "ov-nncf-int8",
        "candidates": candidates,
    }


@pytest.fixture
def report() -> dict[str, Any]:
    return example_report()


def _by_id(report: dict[str, Any], cid: str) -> dict[str, Any]:
    return next(c for c in report["candidates"] if c["id"] == cid)


def test_pareto_front_keeps_only_undominated_ok_candidates(report: dict[str, Any]) -> None:
    # the faster pruned model missed the budget; ort-fp32 and the per-channel int8 are dominated
    assert pareto_front(Report.from_dict(report).candidates) == [
        "ov-nncf-int8",
        "ov-bf16",
        "ov-fp32",
        "torch",
    ]


def test_pareto_front_throughput_and_ties() -> None:
    def c(cid: str, samples_per_s: float, worst: float) -> CandidateRecord:
        perf = {"32": {"p50_ms": 32000 / samples_per_s, "throughput": samples_per_s}}
        record = {"id": cid, "label": cid, "status": "ok", "perf": perf}
        return CandidateRecord.from_dict({**record, "quality": {"cosine_min": worst}})

    cands = [c("a", 1000, 0.99), c("b", 400, 0.999), c("c", 900, 0.98), c("d", 1000, 0.99)]
    assert pareto_front(cands, objective="throughput") == ["a", "d", "b"]
    assert pareto_front([]) == []


def test_explain_names_the_numbers_and_reasons(report: dict[str, Any]) -> None:
    why = explain(Report.from_dict(report))
    assert set(why) == {c["id"] for c in report["candidates"]}
    assert why["ov-nncf-int8"].startswith("Won")
    assert all(s in why["ov-nncf-int8"] for s in ("3.50 ms p50", "4.74x", "0.989"))
    assert "0.885 < 0.98" in why["ort-dynamic-int8"]
    assert "mean 0.962" in why["ort-dynamic-int8"]
    assert "not timed" in why["ort-dynamic-int8"]
    assert "faster than the winner" in why["prune-ffn-30"]
    assert "6.92x" in why["prune-ffn-30"]
    assert "inductor needs a C++ compiler" in why["torch-compile"]
    assert "1.46x slower than the winner" in why["ort-dynamic-int8-pc"]
    assert "dropped after 1 of 3 timing rounds" in why["ort-dynamic-int8-pc"]
    assert "noisy" in why["ort-fp32"]
    assert "noisy" not in why["ov-fp32"]
    assert "Pareto front" in why["ov-fp32"]
    assert "baseline" in why["torch"]
    assert all("\n" not in s for s in why.values())


def test_html_is_self_contained(report: dict[str, Any]) -> None:
    page = render_html(Report.from_dict(report))
    assert page.startswith("<!doctype html>")
    assert "<script" not in page.lower()
    assert "<link" not in page.lower()
    assert "@import" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", page, re.IGNORECASE)
    assert "://" not in page
    assert page.count("<svg") == 3


def test_a_row_names_its_device_when_it_is_not_the_cpu(report: dict[str, Any]) -> None:
    """Records written before devices have none: those ran on the CPU, and say nothing more."""
    page = render_html(Report.from_dict(report))
    assert "<small>openvino &middot;" in page
    assert " on cpu" not in page
    _by_id(report, "ov-fp32")["device"] = "cuda:1"
    assert "<small>openvino on cuda:1 &middot;" in render_html(Report.from_dict(report))


def test_text_from_the_report_is_escaped(report: dict[str, Any]) -> None:
    _by_id(report, "ov-fp32")["label"] = XSS
    _by_id(report, "torch-compile")["reason"] = "<b>boom</b>"
    page = render_html(Report.from_dict(report))
    assert "<script" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; $5 &amp; co" in page
    assert "<b>boom</b>" not in page
    assert "&lt;b&gt;boom&lt;/b&gt;" in page


def test_headline_names_winner_speedup_and_budget(report: dict[str, Any]) -> None:
    page = render_html(Report.from_dict(report))
    headline = page[page.index("<h1>") : page.index("</h1>")]
    assert "OpenVINO + NNCF int8" in headline
    assert "4.74x" in headline
    assert "worst cosine 0.989" in page
    assert "Incomplete" not in page


def test_no_winner_says_what_came_closest(report: dict[str, Any]) -> None:
    report["best"] = None
    report["candidates"] = [
        c for c in report["candidates"] if c["status"] != "ok" or c["id"] == "torch"
    ]
    page = render_html(Report.from_dict(report))
    assert "No candidate met the budget" in page
    assert "Closest: <b>Torch-Pruning FFN 30% + OpenVINO int8</b>" in page
    assert "worst cosine ≥ 0.9120 and mean ≥ 0.9510 would accept it" in page
    assert "Recipe of the winner" not in page


def test_incomplete_run_is_said_first(report: dict[str, Any]) -> None:
    report["complete"] = False
    _by_id(report, "ov-fp32")["perf"] = {}
    page = render_html(Report.from_dict(report))
    assert page.index("Incomplete run") < page.index("<h1>")
    assert "after 8 min 32 s of a 10 min budget" in page
    assert "6 of 9 candidates were timed" in page
    assert "not timed before the run stopped" in explain(Report.from_dict(report))["ov-fp32"]


def test_single_candidate_and_nothing_timed(report: dict[str, Any]) -> None:
    report["candidates"] = [_by_id(report, "torch")]
    report["best"] = "torch"
    page = render_html(Report.from_dict(report))
    assert "PyTorch eager fp32 stays" in page
    assert page.count("<svg") == 3
    report["best"] = None
    report["candidates"] = [_by_id(example_report(), "torch-compile")]
    page = render_html(Report.from_dict(report))
    assert "Every candidate failed" in page
    assert "nothing to plot" in page


def test_metric_budget(report: dict[str, Any]) -> None:
    description = "accuracy drops at most 0.01 from 0.91"
    report["budget"] = {"description": description, "kind": "metric", "metric": "mymod:accuracy",
                        "max_drop": 0.01, "baseline_metric": 0.91}  # fmt: skip
    for c in report["candidates"]:
        if c["quality"] is not None:
            drop = round((1 - c["quality"]["cosine_min"]) / 2, 4)
            c["quality"].update(metric=0.91 - drop, metric_drop=drop)
    why = explain(Report.from_dict(report))
    assert "metric 0.866, drop 0.044" in why["prune-ffn-30"]
    page = render_html(Report.from_dict(report))
    assert "Metric</th><th>Drop" in page
    assert "accuracy drops at most 0.01" in page


def test_throughput_objective_judges_the_best_batch(report: dict[str, Any]) -> None:
    report["objective"], report["batch_sizes"] = "throughput", [1, 32]
    for c in report["candidates"]:
        if c["perf"]:
            p50 = c["perf"]["1"]["p50_ms"]
            c["perf"] |= _perf(p50 * 10, batch=32)
    why = explain(Report.from_dict(report))
    assert "914 samples/s at batch 32" in why["ov-nncf-int8"]
    assert "(batch 32)" in render_html(Report.from_dict(report))


def _with_peaks(report: dict[str, Any]) -> dict[str, Any]:
    """The example as a run with peaks writes it: the device, its peaks, the model's FLOPs."""
    report["device"] = {
        "device": "cpu",
        "name": "AMD EPYC 9R14 96-Core Processor",
        "method": "torch 2.13.0 square matmuls, 2 threads, best of 5, by the host clock",
        "peaks": [
            {"dtype": "fp32", "flops_per_s": 118e9, "size": 512, "measured": "2026-11-25T09:00"},
            {"dtype": "bf16", "flops_per_s": 390e9, "size": 512, "measured": "2026-11-25T09:00"},
        ],
    }
    report["cost"] = {"flops_per_batch": {"1": 1.7e8}, "method": "torch FlopCounterMode"}
    for cid, precision, peak in (("ov-bf16", "bf16", 390e9), ("ov-nncf-int8", "int8", 390e9)):
        seconds = _by_id(report, cid)["perf"]["1"]["p50_ms"] / 1e3
        note = (
            "int8 against the best float peak (bf16): none measured"
            if precision == "int8"
            else None
        )
        _by_id(report, cid)["utilization"] = {
            "1": {"flops_per_s": 1.7e8 / seconds, "precision": precision, "peak": "bf16",
                  "fraction": 1.7e8 / seconds / peak, "note": note}
        }  # fmt: skip
    return report


def test_the_page_names_the_device_its_measured_peaks_and_each_share(
    report: dict[str, Any],
) -> None:
    page = render_html(Report.from_dict(_with_peaks(report)))
    assert "<dt>Measured peak</dt><dd>fp32 118 GFLOP/s, bf16 390 GFLOP/s (torch 2.13.0" in page
    assert "<dt>Timed on</dt><dd>cpu (AMD EPYC 9R14 96-Core Processor)</dd>" in page
    assert "batch 1: 170 MFLOP (torch FlopCounterMode)" in page
    assert "Of peak</th>" in page
    assert ">9.5%<small>of bf16</small>" in page  # 0.17 GFLOP in 4.6 ms of 390 GFLOP/s
    assert ">12%<small>of bf16*</small>" in page  # int8, against the best float peak
    assert "computing in int8; int8 against the best float peak (bf16)" in page
    assert "datasheet" not in page


def test_a_report_without_peaks_leaves_the_column_empty(report: dict[str, Any]) -> None:
    page = render_html(Report.from_dict(report))
    assert "Measured peak" not in page
    assert "Of peak</th>" in page
    report = _with_peaks(report)
    report["cost"] = {"note": "not counted: an ONNX source has no torch module to count FLOPs on"}
    for c in report["candidates"]:
        c.pop("utilization", None)
    page = render_html(Report.from_dict(report))
    assert "<dt>FLOPs</dt><dd>not counted: an ONNX source" in page


def test_write_html_replaces_atomically(report: dict[str, Any], tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    target.write_text("old")
    write_html(Report.from_dict(report), target)
    assert target.read_text().startswith("<!doctype html>")
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_render_is_deterministic(report: dict[str, Any]) -> None:
    assert render_html(Report.from_dict(report)) == render_html(
        Report.from_dict(copy.deepcopy(report))
    )


def test_main_renders_beside_the_json(report: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "report.json").write_text(json.dumps(report))
    cmd = [sys.executable, "-W", "error", "-m", "mahir.report.html", str(tmp_path / "report.json")]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    assert "OpenVINO + NNCF int8" in (tmp_path / "report.html").read_text()


def test_the_records_read_an_older_report_and_write_it_back_whole(report: dict[str, Any]) -> None:
    """Keys an older report lacks take defaults; every key it has comes back with its value."""
    written = json.loads(report_json(Report.from_dict(report)))
    for key, value in report.items():
        if key != "candidates":
            assert written[key] == value, key
    for old, new in zip(report["candidates"], written["candidates"], strict=True):
        assert {k: v for k, v in new.items() if k in old and k != "perf"} == {
            k: v for k, v in old.items() if k != "perf"
        }
        for size, perf in old["perf"].items():
            assert perf.items() <= new["perf"][size].items()
    again = Report.from_dict(written)
    assert json.loads(report_json(again)) == written  # and from then on, key for key
    assert again.candidates[1].perf[1].p50_ms == 3.5


def test_a_perf_record_has_a_field_for_every_timing_field() -> None:
    """A field added to `types.Perf` (a device, say) must reach report.json too."""
    assert {f.name for f in dataclasses.fields(Perf)} <= {
        f.name for f in dataclasses.fields(PerfRecord)
    }
