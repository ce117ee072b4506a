"""mahir on a CUDA GPU: sessions, CUDA graphs over shape buckets, the GPU's candidates in
`optimize`, an output directory that runs there again, and `mahir serve` from it. Skipped where
torch sees no GPU (`gpu` marker, tests/conftest.py); the default encoder's folder may be given
with MAHIR_TEST_ENCODER where its package is not installed (a GPU machine)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

import mahir
from mahir.families import real_tokens
from mahir.hardware import detect
from mahir.measure import MeasureConfig, measure
from mahir.model import Model, load_model
from mahir.passes import PassContext, apply_steps
from mahir.passes.float8 import FP8_COMPUTE_CAPABILITY, TorchaoFloat8
from mahir.passes.packing import PackSequences, pack_sequences
from mahir.passes.pooling import PoolInModel
from mahir.passes.precision import TorchLowPrecision, torch_low_precision
from mahir.pooling import EMBEDDING
from mahir.quality import fidelity
from mahir.runtimes import get_runtime, open_session, reference_outputs
from mahir.runtimes.pending import queues, submit
from mahir.search.optimize import optimize
from mahir.search.optimize_config import OptimizeConfig
from mahir.search.optimize_result import OptimizeResult
from mahir.types import Device, RuntimeOptions
from tests.helpers import Server

pytestmark = pytest.mark.gpu
GPU = RuntimeOptions(device=Device.parse("cuda"))
QUICK = MeasureConfig(warmup_runs=2, min_time_s=0.2, min_runs=5, round_time_s=0.05)


@pytest.fixture(scope="module")
def encoder() -> Model:
    folder = os.environ.get("MAHIR_TEST_ENCODER")
    return load_model(folder) if folder else load_model()


@pytest.fixture(scope="module")
def batches(encoder: Model) -> list[dict[str, np.ndarray]]:
    """Several shapes: one short sentence, a few, and a full batch of long ones."""
    workload = encoder.family.workload((1, 5, 64), batches_per_size=1)
    return [b for size in sorted(workload.batches) for b in workload.batches[size]]


def _low(encoder: Model, dtype: str, tmp_path: Path) -> mahir.Artifact:
    ctx = PassContext(model=encoder, workdir=tmp_path, machine=detect())
    return torch_low_precision(encoder.original(), TorchLowPrecision(dtype), ctx)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [None, "float16", "bfloat16"])
@pytest.mark.parametrize("runtime", ["torch", "torch-compile"])
def test_gpu_sessions_answer_like_the_cpu_original(
    encoder: Model, batches: list, runtime: str, dtype: str | None, tmp_path: Path
) -> None:
    artifact = encoder.original() if dtype is None else _low(encoder, dtype, tmp_path)
    session = open_session(runtime, artifact, GPU)
    assert session.device == Device.parse("cuda:0")
    quality = fidelity(encoder, session, batches, reference_outputs(encoder, batches)).headline
    assert quality.cosine_mean >= 0.999, quality
    assert quality.cosine_min >= 0.99, quality
    settings = session.describe()
    assert settings["device"] == "cuda:0"
    if runtime == "torch-compile":
        assert settings["cuda_graphs"]
        assert settings["batch_buckets"][0] == 1


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("runtime", ["torch", "torch-compile"])
def test_packed_sessions_answer_like_the_cpu_original(
    encoder: Model, batches: list, runtime: str, dtype: str, tmp_path: Path
) -> None:
    ctx = PassContext(model=encoder, workdir=tmp_path, machine=detect())
    artifact = pack_sequences(_low(encoder, dtype, tmp_path), PackSequences(), ctx)
    session = open_session(runtime, artifact, GPU)
    quality = fidelity(encoder, session, batches, reference_outputs(encoder, batches)).embedding
    assert quality is not None
    assert quality.cosine_mean >= 0.999, quality
    assert quality.cosine_min >= 0.99, quality
    assert session.describe()["packed"]


@pytest.mark.parametrize("packed", [False, True])
def test_batches_queued_before_any_is_waited_for_keep_their_own_answers(
    encoder: Model, batches: list, packed: bool, tmp_path: Path
) -> None:
    """Every shape queued twice, then all waited for: no batch's inputs or outputs are
    overwritten by a later one's (each has its own pinned buffers)."""
    artifact = _low(encoder, "float16", tmp_path)
    if packed:
        ctx = PassContext(model=encoder, workdir=tmp_path, machine=detect())
        artifact = pack_sequences(artifact, PackSequences(), ctx)
    session = open_session("torch-compile", artifact, GPU)
    assert queues(session)
    alone = [session.run(batch) for batch in batches]
    queued = [submit(session, batch) for batch in batches + batches]
    for expected, pending in zip(alone + alone, queued, strict=True):
        answers = pending.result()
        assert answers.keys() == expected.keys()
        for name, array in expected.items():
            np.testing.assert_allclose(answers[name], array, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("runtime", "packed"), [("torch", False), ("torch-compile", False), ("torch-compile", True)]
)
def test_workers_on_threads_share_one_session_and_keep_their_own_answers(
    encoder: Model, batches: list, runtime: str, packed: bool, tmp_path: Path
) -> None:
    """A server's workers: four threads run every shape at once on one fresh session, so graphs
    are captured while other threads queue and wait; each answer is the one run alone gives."""
    artifact = _low(encoder, "float16", tmp_path)
    if packed:
        ctx = PassContext(model=encoder, workdir=tmp_path, machine=detect())
        artifact = pack_sequences(artifact, PackSequences(), ctx)
    assert get_runtime(runtime).concurrent_on(GPU.device)
    reference = open_session(runtime, artifact, GPU)
    alone = [reference.run(batch) for batch in batches]
    session = open_session(runtime, artifact, GPU)
    jobs = [i for _ in range(4) for i in range(len(batches))]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda i: session.run(batches[i]), jobs))
    for i, answers in zip(jobs, together, strict=True):
        for name, array in alone[i].items():
            np.testing.assert_allclose(answers[name], array, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("scaling", ["dynamic", "static"])
def test_fp8_matmuls_keep_the_embedding(
    encoder: Model, batches: list, scaling: str, tmp_path: Path
) -> None:
    """Static scales are observed on batches of their own, not on those checked here."""
    machine = detect()
    if machine.gpus[0].compute_capability < FP8_COMPUTE_CAPABILITY:
        pytest.skip(f"{machine.gpus[0].name} has no fp8 tensor cores")
    pytest.importorskip("torchao")
    calibration = tuple(encoder.family.workload((16,), batches_per_size=2, seed=5).batches[16])
    ctx = PassContext(encoder, tmp_path, calibration=calibration, machine=machine)
    fp8 = TorchaoFloat8(scaling=scaling)  # type: ignore[arg-type]
    steps = (TorchLowPrecision("bfloat16"), fp8, PoolInModel())
    for packed in (False, True):
        chosen = (*steps[:2], PackSequences()) if packed else steps
        artifact = apply_steps(encoder.original(), chosen, ctx)
        session = open_session("torch-compile", artifact, GPU)
        report = fidelity(encoder, session, batches, reference_outputs(encoder, batches))
        quality = report.embedding
        assert quality is not None
        assert quality.cosine_mean >= 0.99, quality
        assert quality.cosine_min >= 0.98, quality


def test_cuda_graphs_beat_eager_at_batch_one(encoder: Model, tmp_path: Path) -> None:
    """The point of CUDA graphs: batch 1 is launch-bound in eager. Checked here as a sanity
    bound on the GPU (benchmarks/gpu.py measures properly)."""
    artifact = _low(encoder, "float16", tmp_path)
    sessions = {r: open_session(r, artifact, GPU) for r in ("torch", "torch-compile")}
    batch = encoder.family.workload((1,), batches_per_size=4).batches[1]
    perf = measure(sessions, batch, QUICK, tokens=real_tokens(encoder.family, batch))
    assert perf["torch-compile"].p50_ms < perf["torch"].p50_ms


@pytest.fixture(scope="module")
def optimized(encoder: Model, tmp_path_factory: pytest.TempPathFactory) -> OptimizeResult:
    config = OptimizeConfig(
        device=Device.parse("cuda"),
        only=("torch-fp16", "cuda-graphs-fp16", "packed-fp16"),
        batches_per_size=4,
    )
    return optimize(encoder, config, tmp_path_factory.mktemp("work"))


@pytest.fixture(scope="module")
def gpu_out(optimized: OptimizeResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return optimized.save(tmp_path_factory.mktemp("gpu") / "out")


def test_optimize_on_a_gpu_keeps_a_gpu_candidate_pooled_or_packed_there(
    optimized: OptimizeResult,
) -> None:
    assert optimized.best is not None
    assert optimized.best.candidate.id != "torch"
    assert isinstance(optimized.best.candidate.recipe.steps[-1], (PoolInModel, PackSequences))
    report = optimized.report()
    assert all(c.device == "cuda:0" for c in report.candidates if c.status == "ok")


def test_the_winner_runs_on_the_gpu_again_from_its_directory(
    encoder: Model, batches: list, gpu_out: Path
) -> None:
    session = mahir.load(gpu_out)
    assert session.device == Device.parse("cuda:0")
    assert session.run(batches[0]).keys() == {EMBEDDING}
    quality = fidelity(encoder, session, batches, reference_outputs(encoder, batches)).embedding
    assert quality is not None
    assert quality.cosine_mean >= 0.999, quality


@pytest.mark.parametrize("workers", [1, 2])
def test_mahir_serve_answers_from_the_gpu_like_the_cpu_original(
    encoder: Model, gpu_out: Path, workers: int
) -> None:
    """With two workers, requests sent at once run as batches queued on one session."""
    texts = ["a short one", "a somewhat longer sentence, so that the batch is padded", "x"] * 8
    server = Server(gpu_out, "--workers", str(workers))
    try:
        with httpx.Client(timeout=60) as client, ThreadPoolExecutor(max_workers=8) as pool:
            url = f"{server.url}/v1/embeddings"
            replies = list(pool.map(lambda t: client.post(url, json={"input": [t]}), texts))
    finally:
        assert server.stop() == 0
    batch = encoder.family.tokenize(texts)  # type: ignore[attr-defined]
    want = encoder.family.scored(reference_outputs(encoder, [batch])[0], batch)[EMBEDDING]
    for reply, expected in zip(replies, want, strict=True):
        assert reply.status_code == 200, reply.text
        got = np.array(reply.json()["data"][0]["embedding"])
        assert float(got @ expected / np.linalg.norm(got) / np.linalg.norm(expected)) > 0.999
