"""Several batches at once: an OpenVINO session compiled with N streams answers N threads at
once as it answers one, `mahir serve --workers N` serves with it, and a runtime that runs one
batch at a time refuses workers before serving."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from mahir.errors import BadInput
from mahir.model import Model
from mahir.outdir import open_output_dir
from mahir.recipe import Recipe
from mahir.runtimes import RUNTIMES, open_session
from mahir.search.apply import apply_recipe, write_output_dir
from mahir.serve.batcher import BatcherConfig
from mahir.serve.tune import TuneConfig
from mahir.serve.tuned import tune_and_record
from mahir.types import Artifact, Device, OpenVinoOptions, RuntimeOptions
from tests.helpers import Server, mahir


def test_an_openvino_session_with_two_streams_answers_two_threads_at_once(
    minilm: Model, minilm_ir: Artifact
) -> None:
    options = RuntimeOptions(openvino=OpenVinoOptions(streams=2))
    session = open_session("openvino", minilm_ir, options)
    assert session.describe()["streams"] == 2
    batches = [minilm.family.tokenize([f"sentence number {i} " * (1 + i % 5)]) for i in range(12)]  # type: ignore[attr-defined]
    alone = [session.run(b) for b in batches]
    with ThreadPoolExecutor(max_workers=2) as pool:
        together = list(pool.map(session.run, batches))
    for want, got in zip(alone, together, strict=True):
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


def test_options_for_workers_ask_openvino_for_streams_and_keep_old_recipes_stable() -> None:
    options = RuntimeOptions()
    assert options.for_workers(1) is options
    assert options.for_workers(3).openvino.streams == 3
    assert "streams" not in options.to_dict()["openvino"]  # recipe hashes written before stay
    assert RuntimeOptions.from_dict(options.for_workers(2).to_dict()).openvino.streams == 2


def test_workers_share_a_session_where_its_device_runs_batches_at_once() -> None:
    """A GPU queues one worker's batch while another's is prepared; on a CPU, PyTorch's threads
    already take every core, so only OpenVINO (a stream each) and ONNX Runtime take workers."""
    cpu, gpu = Device.parse("cpu"), Device.parse("cuda")
    assert [n for n, r in RUNTIMES.items() if r.concurrent_on(cpu)] == ["onnxruntime", "openvino"]
    assert {"torch", "torch-compile", "onnxruntime"} <= {
        n for n, r in RUNTIMES.items() if r.concurrent_on(gpu)
    }
    assert [n for n, r in RUNTIMES.items() if r.worker_streams] == ["openvino"]


def test_mahir_serve_with_two_workers_answers_every_request_with_its_own_vector(
    served_openvino_dir: Path,
) -> None:
    texts = [f"request {i}: " + "word " * (i % 9) for i in range(24)]
    server = Server(served_openvino_dir, "--workers", "2")
    try:
        with httpx.Client(timeout=60) as client:
            alone = [
                client.post(f"{server.url}/v1/embeddings", json={"input": [t]}) for t in texts[:4]
            ]

            def post(text: str) -> httpx.Response:
                return client.post(f"{server.url}/v1/embeddings", json={"input": [text]})

            with ThreadPoolExecutor(max_workers=8) as pool:
                together = list(pool.map(post, texts))
    finally:
        assert server.stop() == 0
    assert all(r.status_code == 200 for r in alone + together)
    vectors = [np.array(r.json()["data"][0]["embedding"]) for r in together]
    for first, second in zip(alone, vectors[:4], strict=True):
        np.testing.assert_allclose(
            np.array(first.json()["data"][0]["embedding"]), second, atol=1e-5
        )
    assert len({v.tobytes() for v in vectors}) == len(texts)  # no answer went to another request


def test_a_runtime_that_runs_one_batch_at_a_time_refuses_workers_and_tunes_without(
    mlp: Model, tmp_path: Path
) -> None:
    applied = apply_recipe(mlp, Recipe((), "torch"), tmp_path / "w", calibration=(), evaluation=())
    write_output_dir(mlp, applied, tmp_path / "out")
    with pytest.raises(BadInput, match=r"--workers 2: torch runs one batch at a time on cpu"):
        open_output_dir(tmp_path / "out", workers=2)
    # the command line refuses before it announces a server that will never listen
    refused = mahir("serve", str(tmp_path / "out"), "--workers", "2", "--host", "127.0.0.1")
    assert refused.returncode == 2
    assert refused.stderr.strip().startswith("error: --workers 2: torch runs one batch")
    assert "serving" not in refused.stderr
    opened = open_output_dir(tmp_path / "out")
    assert opened.session.runtime == "torch"
    tuning = TuneConfig(10_000, seconds=0.1, concurrency=4, batch_sizes=(1, 4), workers=(1, 2))
    result, record = tune_and_record(tmp_path / "out", opened, BatcherConfig(), tuning)
    assert {t.config.workers for t in result.trials} == {1}  # one batch at a time: not tried
    assert record["workers"] == 1
