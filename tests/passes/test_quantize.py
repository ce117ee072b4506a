"""ONNX Runtime int8: the graph holds int8 ops, fidelity stays within each pass's documented
bound, on ONNX Runtime and (for QDQ) OpenVINO, at several shapes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from mahir.errors import Unsupported
from mahir.hardware import detect
from mahir.model import Model
from mahir.passes import PassContext, apply_steps, run_pass
from mahir.passes.graph import TransformerFusion
from mahir.passes.quantize import DynamicInt8, StaticInt8, pad_to_common_shape
from mahir.quality import fidelity
from mahir.runtimes import open_session, reference_outputs
from mahir.types import Artifact, Quality

Int8 = Callable[[tuple[object, ...], str], tuple[Artifact, Quality]]


def _ops(path: Path | None) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


# (steps, runtimes, mean bound, worst bound): measured on all-MiniLM-L6-v2 with margin.
CASES = [
    ((DynamicInt8(per_channel=True),), ("onnxruntime",), 0.985, 0.97),
    ((TransformerFusion(), DynamicInt8(per_channel=True)), ("onnxruntime",), 0.985, 0.97),
    ((DynamicInt8(),), ("onnxruntime",), 0.93, 0.88),
    ((StaticInt8(),), ("onnxruntime", "openvino"), 0.90, 0.85),
    ((StaticInt8(calibration="entropy"),), ("onnxruntime",), 0.90, 0.85),
    ((StaticInt8(calibration="percentile"),), ("onnxruntime",), 0.90, 0.85),
]


@pytest.fixture(scope="module")
def int8(
    minilm: Model,
    minilm_onnx: Path,
    minilm_calibration: tuple[dict[str, np.ndarray], ...],
    minilm_eval: tuple[list, list],
    tmp_path_factory: pytest.TempPathFactory,
) -> Int8:
    """(steps, runtime) -> the default model's ONNX file through `steps`, and its fidelity on
    `runtime` on the held-out batches; each built and judged once for the module, so the
    per-channel comparison reads what the int8 cases made."""
    built: dict[tuple[object, ...], Artifact] = {}
    judged: dict[tuple[tuple[object, ...], str], Quality] = {}
    batches, reference = minilm_eval

    def make(steps: tuple[object, ...], runtime: str) -> tuple[Artifact, Quality]:
        if steps not in built:
            work = tmp_path_factory.mktemp("int8")
            ctx = PassContext(model=minilm, workdir=work, calibration=minilm_calibration)
            built[steps] = apply_steps(Artifact("onnx", minilm.spec, path=minilm_onnx), steps, ctx)
        artifact = built[steps]
        if (steps, runtime) not in judged:
            session = open_session(runtime, artifact)
            judged[steps, runtime] = fidelity(minilm, session, batches, reference)
        return artifact, judged[steps, runtime]

    return make


@pytest.mark.parametrize(
    ("steps", "runtimes", "mean_bound", "worst_bound"),
    CASES,
    ids=["dynamic-per-channel", "fused-dynamic", "dynamic", "static-minmax", "entropy", "pct"],
)
def test_int8_on_the_default_model(
    steps: tuple[object, ...],
    runtimes: tuple[str, ...],
    mean_bound: float,
    worst_bound: float,
    minilm_onnx: Path,
    int8: Int8,
) -> None:
    for runtime in runtimes:
        artifact, quality = int8(steps, runtime)
        ops = _ops(artifact.path)
        assert {"MatMulInteger", "QuantizeLinear"} & ops
        assert artifact.path is not None
        # int8 weights; the 47 MB fp32 embedding table (a Gather) stays float
        assert artifact.path.stat().st_size < 0.7 * minilm_onnx.stat().st_size
        assert quality.embedding is not None
        assert quality.embedding.cosine_mean >= mean_bound, runtime
        assert quality.embedding.cosine_min >= worst_bound, runtime


def test_per_channel_is_closer_than_per_tensor(int8: Int8) -> None:
    means = {
        per_channel: int8((DynamicInt8(per_channel=per_channel),), "onnxruntime")[1].headline
        for per_channel in (False, True)
    }
    assert means[True].cosine_mean > means[False].cosine_mean


def test_reduce_range_follows_the_cpu(minilm: Model, minilm_onnx: Path, tmp_path: Path) -> None:
    zen4_without_vnni = dataclasses.replace(detect(gpus=False), isa=("avx2",))
    with_vnni = dataclasses.replace(detect(gpus=False), isa=("avx2", "avx512_vnni"))
    onnx_artifact = Artifact("onnx", minilm.spec, path=minilm_onnx)
    for machine, expected in ((zen4_without_vnni, True), (with_vnni, False)):
        ctx = PassContext(model=minilm, workdir=tmp_path / str(expected), machine=machine)
        artifact = run_pass(onnx_artifact, DynamicInt8(per_channel=True), ctx)
        assert artifact.meta["steps"][-1]["reduce_range"] is expected
    # per tensor, 8 bits everywhere: the lost bit costs more than saturation (0.950 -> 0.859)
    ctx = PassContext(model=minilm, workdir=tmp_path / "per-tensor", machine=zen4_without_vnni)
    assert run_pass(onnx_artifact, DynamicInt8(), ctx).meta["steps"][-1]["reduce_range"] is False


def test_static_int8_on_the_cnn_keeps_top1(cnn: Model, tmp_path: Path) -> None:
    calibration = tuple(cnn.family.workload([8], batches_per_size=4).batches[8])
    ctx = PassContext(model=cnn, workdir=tmp_path, calibration=calibration)
    artifact = run_pass(cnn.original(), StaticInt8(), ctx)  # exports to ONNX first
    assert "QuantizeLinear" in _ops(artifact.path)
    batches = cnn.family.verification_batches() + list(
        cnn.family.workload([16], seed=3).batches[16]
    )
    reference = reference_outputs(cnn, batches)
    for runtime in ("onnxruntime", "openvino"):
        quality = fidelity(cnn, open_session(runtime, artifact), batches, reference)
        assert quality.outputs["output"].cosine_mean > 0.99, runtime
        assert quality.outputs["output"].top1_agreement >= 0.9, runtime


def test_histogram_calibration_pads_text_batches(
    minilm: Model, minilm_calibration: tuple[dict[str, np.ndarray], ...], tmp_path: Path
) -> None:
    ctx = PassContext(model=minilm, workdir=tmp_path, calibration=minilm_calibration)
    padded = pad_to_common_shape(ctx)
    lengths = {b["input_ids"].shape[1] for b in padded}
    assert len(lengths) == 1
    assert lengths.pop() == max(b["input_ids"].shape[1] for b in minilm_calibration)
    for before, after in zip(minilm_calibration, padded, strict=True):
        assert after["attention_mask"].sum() == before["attention_mask"].sum()


def test_static_without_calibration_and_bad_configs(minilm: Model, minilm_onnx: Path) -> None:
    ctx = PassContext(model=minilm, workdir=minilm_onnx.parent / "none")
    with pytest.raises(Unsupported, match="needs calibration inputs"):
        run_pass(Artifact("onnx", minilm.spec, path=minilm_onnx), StaticInt8(), ctx)
    with pytest.raises(ValueError, match="percentile"):
        StaticInt8(percentile=100.0)
    with pytest.raises(ValueError, match="op_types is empty"):
        DynamicInt8(op_types=())
