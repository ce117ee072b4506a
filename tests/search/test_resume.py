"""--resume after a run cut short before its candidates were timed: what was built and checked is
reused (kept files, recorded quality), only the timing is done again."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import mahir.search.builder
import mahir.search.halving
from mahir.export.conversions import Conversion
from mahir.model import Model
from mahir.search.candidates import baseline
from mahir.search.optimize import optimize
from mahir.search.optimize_config import OptimizeConfig
from mahir.search.optimize_result import OptimizeResult
from mahir.search.records import OutcomeCache
from mahir.types import Artifact

pytestmark = pytest.mark.usefixtures("short_rungs")  # what is timed matters, not how long
# Proposed on every CPU; one ONNX file, one OpenVINO IR (.xml and .bin) to keep.
ONLY = ("onnxruntime", "openvino-f32")
CONFIG = OptimizeConfig(only=ONLY, roofline=False)  # what is kept matters, not the report


def _interrupted_in_the_first_rung(
    mlp: Model,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    config: OptimizeConfig = CONFIG,
    *,
    sizes_timed: int = 0,
) -> tuple[OptimizeResult, Path]:
    """A run stopped by Ctrl-C in the first rung, after it timed `sizes_timed` batch sizes."""
    real = mahir.search.halving.measure
    timed: list[int] = []

    def interrupt(*args: Any, **kwargs: Any) -> Any:
        if len(timed) == sizes_timed:
            raise KeyboardInterrupt
        timed.append(1)
        return real(*args, **kwargs)

    cache = tmp_path / "cache.jsonl"
    with monkeypatch.context() as patch:
        patch.setattr(mahir.search.halving, "measure", interrupt)
        first = optimize(mlp, config, tmp_path / "w1", cache_path=cache)
    assert not first.complete
    return first, cache


def _count(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[tuple[Any, ...]]:
    """The arguments of each call of `owner.name` from now on, which still does its work."""
    calls: list[tuple[Any, ...]] = []
    real: Callable[..., Any] = getattr(owner, name)

    def counted(*args: object, **kwargs: object) -> Any:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_resume_after_the_first_rung_times_without_building_or_checking(
    mlp: Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, cache = _interrupted_in_the_first_rung(mlp, tmp_path, monkeypatch)
    checked = {o.candidate.id: o for o in first.candidates if o.status == "ok"}
    assert set(checked) == {"torch", *ONLY}
    assert not any(o.perf for o in checked.values())
    passes = _count(monkeypatch, mahir.search.builder, "run_pass")
    conversions = _count(monkeypatch, Conversion, "run")
    judged = _count(monkeypatch, mahir.search.halving, "fidelity")

    second = optimize(mlp, CONFIG, tmp_path / "w2", cache_path=cache, resume=True)

    assert passes == []
    assert conversions == []
    assert judged == []
    assert second.complete
    resumed = [o for o in second.candidates if o.candidate.id in checked]
    assert len(resumed) == len(checked)
    for outcome in resumed:
        assert outcome.status == "ok"
        assert outcome.perf, f"{outcome.candidate.id} was not timed"
        assert outcome.quality == checked[outcome.candidate.id].quality
    assert second.best is not None
    assert second.artifact is not None
    assert (second.save(tmp_path / "out") / "model").is_dir()
    assert not OutcomeCache(cache, "", resume=True).folder.exists()  # a complete run drops them


def test_a_kept_artifact_that_is_gone_is_built_and_checked_again(
    mlp: Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, cache = _interrupted_in_the_first_rung(mlp, tmp_path, monkeypatch)
    OutcomeCache(cache, "", resume=True).drop_artifacts()
    checks = _count(monkeypatch, mahir.search.halving.Search, "check")

    second = optimize(mlp, CONFIG, tmp_path / "w2", cache_path=cache, resume=True)

    # The baseline, a live module with no files to keep, is rebuilt and never checked again.
    assert {candidate.id for _search, candidate in checks} == set(ONLY)
    assert all(o.perf for o in second.candidates if o.candidate.id in ONLY)


def test_a_rung_cut_between_batch_sizes_is_timed_again(
    mlp: Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = OptimizeConfig(only=ONLY, batch_sizes=(1, 4), roofline=False)
    first, cache = _interrupted_in_the_first_rung(mlp, tmp_path, monkeypatch, config, sizes_timed=1)
    # batch 1 was timed, batch 4 not: a rung keeps nothing until every size is timed
    assert not any(o.perf for o in first.candidates)
    judged = _count(monkeypatch, mahir.search.halving, "fidelity")

    second = optimize(mlp, config, tmp_path / "w2", cache_path=cache, resume=True)

    assert judged == []
    ids = {"torch", *ONLY}
    assert all(
        set(o.perf) == {1, 4} and not o.cached for o in second.candidates if o.candidate.id in ids
    )


def test_kept_files_come_back_whole_and_a_fresh_run_drops_them(mlp: Model, tmp_path: Path) -> None:
    model = tmp_path / "built" / "model.xml"
    model.parent.mkdir()
    model.write_text("<net/>")
    model.with_suffix(".bin").write_bytes(b"\0" * 8)
    artifact = Artifact("openvino", mlp.spec, path=model, meta={"steps": [{"pass": "x"}]})
    candidate = baseline(mlp)
    cache = OutcomeCache(tmp_path / "cache.jsonl", "key", resume=False)

    cache.keep_artifact(candidate, artifact)
    kept = OutcomeCache(cache.path, "key", resume=True).kept_artifact(
        candidate, mlp.spec, tmp_path / "work"
    )

    assert kept is not None
    assert kept.format == "openvino"
    assert kept.meta == artifact.meta
    assert [p.read_bytes() for p in kept.files()] == [p.read_bytes() for p in artifact.files()]
    assert (
        OutcomeCache(cache.path, "other", resume=True).kept_artifact(
            candidate, mlp.spec, tmp_path / "other"
        )
        is None
    )  # another run's files never count
    OutcomeCache(cache.path, "key", resume=False)
    assert not cache.folder.exists()
