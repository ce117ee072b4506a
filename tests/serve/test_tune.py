"""The batching tuner: real batcher, real ONNX Runtime session, and `mahir serve --tune` and
`mahir optimize` as real processes whose choice lands in mahir.json and is what the server then
runs with."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from mahir.cli.tuning import skip_reason
from mahir.errors import BadInput
from mahir.hardware import detect
from mahir.model import Model
from mahir.outdir import open_output_dir, read_manifest, update_manifest
from mahir.serve.batcher import BatcherConfig
from mahir.serve.served import ServeConfig
from mahir.serve.tune import TUNED, Trial, TuneConfig, TuneResult, settings, tune_batching
from mahir.serve.tuned import MIN_SECONDS, fit, with_batching
from tests.helpers import Server, cli

QUICK = {"seconds": 0.2, "concurrency": 8, "batch_sizes": (1, 8), "delays_ms": (0.0, 2.0)}


@pytest.fixture(scope="module")
def mlp_dir(served_mlp_dir: Path) -> Path:
    """The session's fp32 MLP directory: tune_batching only reads it, and the tests that let
    a tuner write into mahir.json copy it first."""
    return served_mlp_dir


def tune(folder: Path, config: TuneConfig) -> TuneResult:
    return asyncio.run(tune_batching(open_output_dir(folder), config))


def test_every_setting_is_timed_and_the_choice_keeps_the_bound(mlp_dir: Path) -> None:
    result = tune(mlp_dir, TuneConfig(p99_ms=10_000, **QUICK))  # type: ignore[arg-type]
    tried = [(t.config.max_batch_size, t.config.max_delay_ms) for t in result.trials]
    assert sorted(tried) == [(1, 0.0), (8, 0.0), (8, 2.0)]  # batch 1 once: it never waits
    assert all(t.requests > 0 and len(t.latencies_ms) == t.requests for t in result.trials)
    best = result.best
    assert best is not None
    assert best.throughput == max(t.throughput for t in result.trials)
    record = result.record()
    assert record["max_batch_size"] == best.config.max_batch_size
    assert record["p99_ms"] <= record["p99_bound_ms"] == 10_000
    assert set(TUNED) <= set(record)


def test_a_bound_no_setting_meets_says_how_close_it_came(mlp_dir: Path) -> None:
    result = tune(mlp_dir, TuneConfig(p99_ms=1e-6, **QUICK))  # type: ignore[arg-type]
    assert result.best is None
    with pytest.raises(BadInput, match=r"no batching setting kept p99 under 1e-06 ms.*lowest"):
        result.record()


def test_batch_sizes_past_the_concurrency_and_padding_for_tensor_models_are_not_tried() -> None:
    config = TuneConfig(p99_ms=50, concurrency=16, batch_sizes=(1, 16, 64), paddings=(0.5, 2.0))
    tensor = settings(BatcherConfig(max_queue=99), config, text=False)
    assert {s.max_batch_size for s in tensor} == {1, 16}
    assert {s.max_padding for s in tensor} == {0.5}
    assert all(s.max_queue == 99 for s in tensor)  # what the tuner does not choose is kept
    text = settings(BatcherConfig(), config, text=True)
    assert [s.max_batch_size for s in text].count(1) == 1  # a batch of one has nothing to pad
    assert len(text) == 1 + 2 * (len(tensor) - 1)


def test_workers_are_tuned_on_sessions_that_run_that_many_batches(mlp_dir: Path) -> None:
    config = TuneConfig(p99_ms=10_000, workers=(1, 2), **QUICK)  # type: ignore[arg-type]
    grid = settings(BatcherConfig(), config, text=False)
    assert sorted((s.workers, s.max_batch_size) for s in grid if s.max_delay_ms == 0) == [
        (1, 1),
        (1, 8),
        (2, 1),
        (2, 8),
    ]
    opened = open_output_dir(mlp_dir)
    with pytest.raises(ValueError, match=r"no session to tune \[2\] workers"):
        asyncio.run(tune_batching(opened, config))
    two = open_output_dir(mlp_dir, workers=2).session  # ONNX Runtime: concurrent runs
    result = asyncio.run(tune_batching(opened, config, sessions={2: two}))
    assert {t.config.workers for t in result.trials} == {1, 2}
    assert all(t.requests > 0 for t in result.trials)
    assert result.record()["workers"] in (1, 2)


def test_without_a_bound_the_choice_keeps_batch_1s_own_tail() -> None:
    def trial(size: int, requests: int, p99: float) -> Trial:
        return Trial(BatcherConfig(max_batch_size=size), 1.0, (1.0,) * 99 + (p99,) * requests)

    unbatched, steady, fastest = trial(1, 10, 80.0), trial(8, 30, 60.0), trial(32, 50, 95.0)
    result = TuneResult(TuneConfig.short(), (unbatched, steady, fastest), "a CPU")
    assert result.bound_ms == unbatched.percentile(99)
    assert result.best is steady  # the fastest has a worse tail than not batching at all
    record = result.record("optimize")
    assert (record["max_batch_size"], record["tuned_by"]) == (8, "optimize")
    assert record["p99_bound_ms"] == round(unbatched.percentile(99), 2)
    with pytest.raises(ValueError, match="keep 1 in batch_sizes"):
        TuneConfig(None, batch_sizes=(4, 8))


def test_serve_tune_records_its_choice_and_serves_with_it(mlp_dir: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(mlp_dir, tmp_path / "out")  # the tuner writes into mahir.json
    args = ("--tune", "--p99-ms", "10000", "--tune-seconds", "0.2", "--tune-concurrency", "8")
    server = Server(folder, *args)
    try:
        recorded = read_manifest(folder)["batching"]
        served = httpx.get(f"{server.url}/v2/models/{read_name(folder)}/config").json()
    finally:
        assert server.stop() == 0
    assert recorded["max_batch_size"] in (1, 4, 8)  # the grid, capped at the concurrency
    assert recorded["tuned_by"] == "serve"
    assert recorded["workers"] in (1, 2)  # ONNX Runtime runs batches at once: both tried
    assert served["max_batch_size"] == recorded["max_batch_size"]
    delay_us = served["dynamic_batching"]["max_queue_delay_microseconds"]
    assert delay_us == int(recorded["max_delay_ms"] * 1000)


def test_the_command_line_overrides_what_was_recorded(mlp_dir: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(mlp_dir, tmp_path / "out")
    update_manifest(folder, {"batching": {"max_batch_size": 12, "max_delay_ms": 3.0}})
    server = Server(folder, "--max-batch-size", "5")
    try:
        served = httpx.get(f"{server.url}/v2/models/{read_name(folder)}/config").json()
    finally:
        assert server.stop() == 0
    assert served["max_batch_size"] == 5
    assert served["dynamic_batching"]["max_queue_delay_microseconds"] == 3000


def test_tune_needs_its_bound_and_an_output_directory(mlp: Model, tmp_path: Path) -> None:
    alone = cli("serve", "--tune")
    assert alone.returncode == 2
    assert "--tune and --p99-ms go together" in alone.stderr
    plain = cli("serve", "tests/models.py:mlp", "--tune", "--p99-ms", "50")
    assert plain.returncode == 2
    assert "records its choice in an output directory" in plain.stderr


def read_name(folder: Path) -> str:
    return str(json.loads((folder / "mahir.json").read_text())["source"]["name"])


def test_optimize_records_a_batching_choice_that_serve_runs_with(
    optimized_mlp: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    """(The same run's report and Triton export: tests/test_cli.py.)"""
    out, found = optimized_mlp
    assert found.returncode == 0, found.stderr
    recorded = read_manifest(out)["batching"]
    assert recorded["tuned_by"] == "optimize"
    assert recorded["machine"] == detect(gpus=False).summary()
    assert f"batching for mahir serve: batch {recorded['max_batch_size']}," in found.stdout
    server = Server(out)
    try:
        served = httpx.get(f"{server.url}/v2/models/{read_name(out)}/config").json()
    finally:
        assert server.stop() == 0
    assert served["max_batch_size"] == recorded["max_batch_size"]
    delay_us = served["dynamic_batching"]["max_queue_delay_microseconds"]
    assert delay_us == int(recorded["max_delay_ms"] * 1000)
    assert served["mahir_batching"]["max_padding"] == recorded["max_padding"]


def test_the_tune_after_optimize_fits_the_time_left_or_says_why_not() -> None:
    short = TuneConfig.short()
    assert fit(short, 17, None, item_s=0.1) == short  # no budget: the whole short tune
    assert fit(short, 17, 600.0, item_s=0.003) == short
    squeezed = fit(short, 17, 20.0, item_s=0.003)  # 17 x 3 x 32 x 3 ms = 4.9 s of queues
    assert squeezed is not None
    assert squeezed.seconds == pytest.approx((20.0 - 17 * 3 * 32 * 0.003) / 17)
    assert fit(short, 17, 20.0, item_s=0.03) is None  # a slow model's queues alone overrun it
    assert fit(short, 17, 17 * MIN_SECONDS, item_s=1e-6) is None
    assert skip_reason(has_winner=True, complete=True, wanted=True) is None
    assert skip_reason(has_winner=False, complete=True, wanted=True) == "no winner to serve"
    assert "cut short" in str(skip_reason(has_winner=True, complete=False, wanted=True))
    assert "--tune --p99-ms" in str(skip_reason(has_winner=True, complete=True, wanted=False))


def test_a_choice_made_on_another_machine_is_used_with_a_note() -> None:
    recorded = {"max_batch_size": 8, "max_delay_ms": 4.0, "tuned_by": "optimize"}
    here, note = with_batching(
        ServeConfig(), {**recorded, "machine": detect(gpus=False).summary()}, set()
    )
    assert here.batcher.max_batch_size == 8
    assert note is None
    elsewhere, note = with_batching(
        ServeConfig(), {**recorded, "machine": "a 96-core CPU"}, {"max_delay_ms"}
    )
    assert (elsewhere.batcher.max_batch_size, elsewhere.batcher.max_delay_ms) == (
        8,
        ServeConfig().batcher.max_delay_ms,  # what the command line set stays
    )
    assert "tuned by mahir optimize on a 96-core CPU, not on this" in str(note)
