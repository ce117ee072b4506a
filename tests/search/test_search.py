"""The search's parts that need no timing: shared building, ranking, rung sizing, records."""

from __future__ import annotations

from pathlib import Path

import pytest

from mahir.errors import Unsupported
from mahir.model import Model
from mahir.passes import PassContext
from mahir.passes.graph import TransformerFusion
from mahir.passes.quantize import DynamicInt8
from mahir.recipe import Recipe
from mahir.search.builder import ArtifactBuilder
from mahir.search.candidates import Candidate
from mahir.search.halving import Outcome, first_rung_seconds, rank
from mahir.search.records import OutcomeCache
from mahir.types import Perf


def test_the_builder_exports_once_and_shares_steps(mlp: Model, tmp_path: Path) -> None:
    builder = ArtifactBuilder(PassContext(model=mlp, workdir=tmp_path))
    onnx = builder.build((), ("onnx",))
    assert builder.build((), ("onnx",)) is onnx
    ir = builder.build((), ("openvino",))
    assert ir.format == "openvino"
    quantized = builder.build((DynamicInt8(),), ("onnx",))
    assert builder.build((DynamicInt8(),), ("openvino", "onnx")) is quantized
    assert len(list(tmp_path.rglob("*.onnx"))) == 2  # one export, one quantized model


def test_a_failed_step_fails_again_without_running_again(mlp: Model, tmp_path: Path) -> None:
    builder = ArtifactBuilder(PassContext(model=mlp, workdir=tmp_path))
    with pytest.raises(Unsupported) as first:
        builder.build((TransformerFusion(),), ("onnx",))
    with pytest.raises(Unsupported) as second:
        builder.build((TransformerFusion(), DynamicInt8()), ("onnx",))
    assert second.value is first.value


def perf(p50: float) -> Perf:
    return Perf(1, (p50,), p50, p50, p50, 1000 / p50, None, 0.0, False)


def outcome(cid: str, p50: float, base: float, rounds: int, status: str = "ok") -> Outcome:
    candidate = Candidate(cid, cid, Recipe((), "onnxruntime"))
    return Outcome(
        candidate, status, perf={1: perf(p50)}, baseline_perf={1: perf(base)}, rounds=rounds
    )  # type: ignore[arg-type]


def test_rank_prefers_the_longest_timed_then_the_fastest_beside_its_baseline() -> None:
    ranked = rank(
        [
            outcome("early-fast", 1.0, 10.0, rounds=1),  # lucky in a short first rung
            outcome("final-a", 2.0, 10.0, rounds=3),
            outcome("final-b", 2.5, 15.0, rounds=3),  # slower in ms, but 6x its baseline
            outcome("rejected", 0.5, 10.0, rounds=3, status="rejected"),
        ],
        "latency",
    )
    assert [o.candidate.id for o in ranked] == ["final-b", "final-a", "early-fast"]


def test_first_rung_fits_the_time_left() -> None:
    assert first_rung_seconds(None, 10, 1) == 1.0
    assert first_rung_seconds(10.0, 10, 1) == 0.3  # floor: shorter numbers mean nothing
    assert first_rung_seconds(1e6, 10, 1) == 2.0
    assert 0.3 < first_rung_seconds(30.0, 8, 1) < 2.0


def test_the_cache_reads_back_what_it_wrote_and_skips_torn_lines(tmp_path: Path) -> None:
    path = tmp_path / "cache.jsonl"
    cache = OutcomeCache(path, "run-1", resume=False)
    done = outcome("onnxruntime", 2.0, 10.0, rounds=2)
    cache.put(done, "latency")
    with path.open("a") as f:
        f.write('{"run_key": "run-1", "rec')  # interrupted mid-line
    again = OutcomeCache(path, "run-1", resume=True).get(done.candidate)
    assert again is not None
    assert again.cached
    assert again.perf[1].p50_ms == 2.0
    assert again.speedup("latency") == pytest.approx(5.0)
    assert OutcomeCache(path, "other-run", resume=True).get(done.candidate) is None
    OutcomeCache(path, "run-1", resume=False)  # a fresh run starts a fresh cache
    assert not path.exists()
