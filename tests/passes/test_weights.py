"""Weight-only quantization: MatMulNBits in the ONNX graph on ONNX Runtime, integer weights in
the OpenVINO IR; the file shrinks, fidelity stays within each pass's documented bound at several
shapes, the input file is untouched, and graphs without the layers a pass needs are refused."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import openvino as ov
import pytest

from mahir.errors import Unsupported
from mahir.export.conversions import convert
from mahir.model import Model
from mahir.passes import PassContext
from mahir.passes.weights import (
    NncfWeightCompression,
    OrtWeightOnly,
    compressed_weights,
    nncf_weight_compression,
    ort_weight_only,
)
from mahir.quality import fidelity
from mahir.runtimes import open_session, reference_outputs
from mahir.types import Artifact
from mahir.workload import Batch

Eval = tuple[list[Batch], list[dict[str, np.ndarray]]]


def digest(path: Path | None) -> str:
    assert path is not None
    files = [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def size(path: Path | None) -> int:
    """Bytes on disk: the .onnx, or the IR's .bin."""
    assert path is not None
    return (path.with_suffix(".bin") if path.suffix == ".xml" else path).stat().st_size


def onnx_ops(path: Path | None) -> list[str]:
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


# (config, mean bound, worst bound, size bound): measured on all-MiniLM-L6-v2 with margin.
ORT_CASES = [
    (OrtWeightOnly(), 0.94, 0.90, 0.62),  # measured 0.960, 0.931; 0.605 of the size
    (OrtWeightOnly(bits=8), 0.999, 0.998, 0.68),  # measured 0.9998, 0.9997; 0.664
]


@pytest.mark.parametrize(
    ("config", "mean_bound", "worst_bound", "size_bound"), ORT_CASES, ids=["4-bit", "8-bit"]
)
def test_ort_weight_only_on_the_default_model(
    config: OrtWeightOnly,
    mean_bound: float,
    worst_bound: float,
    size_bound: float,
    minilm: Model,
    minilm_onnx: Path,
    minilm_eval: Eval,
    tmp_path: Path,
) -> None:
    source = Artifact("onnx", minilm.spec, path=minilm_onnx)
    before = digest(minilm_onnx)
    artifact = ort_weight_only(source, config, PassContext(model=minilm, workdir=tmp_path))
    assert digest(minilm_onnx) == before
    ops = onnx_ops(artifact.path)
    # every linear layer, six per encoder layer; the attention products stay MatMul
    assert ops.count("MatMulNBits") == artifact.meta["steps"][-1]["matmul_nbits"] == 36
    # the weights shrink to 4 or 8 bits; the fp32 embedding table (a Gather) is half the file
    assert size(artifact.path) < size_bound * size(minilm_onnx)
    # batches of 8, 8, 1, 3 and 2 sentences, 3 to 128 tokens
    batches, reference = minilm_eval
    quality = fidelity(minilm, open_session("onnxruntime", artifact), batches, reference)
    assert quality.embedding is not None
    assert quality.embedding.cosine_mean >= mean_bound
    assert quality.embedding.cosine_min >= worst_bound


def test_ort_weight_only_needs_a_matmul(cnn: Model, tmp_path: Path) -> None:
    ctx = PassContext(model=cnn, workdir=tmp_path)
    source = convert(cnn, cnn.original(), ("onnx",), ctx.workdir / "input")
    with pytest.raises(Unsupported, match=r"no MatMul with constant weights.*Conv x2"):
        ort_weight_only(source, OrtWeightOnly(), ctx)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        OrtWeightOnly(bits=3)  # type: ignore[arg-type]
    for block_size in (8, 48):
        with pytest.raises(ValueError, match=rf"power of two >= 16.*got {block_size}"):
            OrtWeightOnly(block_size=block_size)


# (config, mean bound, worst bound, size bound, integer weights by element type)
NNCF_CASES = [
    # measured 0.9992, 0.9987; the .bin at 0.256 of fp32; 36 MatMuls and 3 embedding tables
    (NncfWeightCompression(), 0.998, 0.995, 0.27, {"u8": 39}),
    # measured 0.943, 0.921; 0.202; embeddings and the last layer in int8
    (NncfWeightCompression(mode="int4"), 0.92, 0.88, 0.22, {"i4": 35, "u8": 4}),
]


@pytest.mark.parametrize(
    ("config", "mean_bound", "worst_bound", "size_bound", "weights"),
    NNCF_CASES,
    ids=["int8", "int4"],
)
def test_nncf_weight_compression_on_the_default_model(
    config: NncfWeightCompression,
    mean_bound: float,
    worst_bound: float,
    size_bound: float,
    weights: dict[str, int],
    minilm: Model,
    minilm_ir: Artifact,
    minilm_eval: Eval,
    tmp_path: Path,
) -> None:
    before = digest(minilm_ir.path)
    artifact = nncf_weight_compression(
        minilm_ir, config, PassContext(model=minilm, workdir=tmp_path)
    )
    assert digest(minilm_ir.path) == before
    assert artifact.meta["steps"][-1]["weights"] == weights
    assert compressed_weights(ov.Core().read_model(str(artifact.path))) == weights
    assert size(artifact.path) < size_bound * size(minilm_ir.path)
    batches, reference = minilm_eval
    quality = fidelity(minilm, open_session("openvino", artifact), batches, reference)
    assert quality.embedding is not None
    assert quality.embedding.cosine_mean >= mean_bound
    assert quality.embedding.cosine_min >= worst_bound


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_nncf_weight_compression_on_the_small_models(
    name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    model: Model = request.getfixturevalue(name)
    ctx = PassContext(model=model, workdir=tmp_path)
    source = convert(model, model.original(), ("openvino",), ctx.workdir / "input")
    before = digest(source.path)
    artifact = nncf_weight_compression(source, NncfWeightCompression(), ctx)
    assert digest(source.path) == before
    assert artifact.meta["steps"][-1]["weights"] == {"u8": 3}
    batches = model.family.verification_batches() + list(
        model.family.workload([16], seed=3).batches[16]
    )
    session = open_session("openvino", artifact)
    quality = fidelity(model, session, batches, reference_outputs(model, batches))
    assert quality.outputs["output"].cosine_mean > 0.9999  # measured 0.99996, 0.99998
    assert quality.outputs["output"].top1_agreement == 1.0


def test_nncf_int4_needs_layers_it_can_group(mlp: Model, cnn: Model, tmp_path: Path) -> None:
    mlp_ctx = PassContext(model=mlp, workdir=tmp_path / "mlp")
    mlp_ir = convert(mlp, mlp.original(), ("openvino",), mlp_ctx.workdir / "input")
    # the MLP's 32 and 64 input channels do not split into groups of 128
    with pytest.raises(Unsupported, match="group size value 128"):
        nncf_weight_compression(mlp_ir, NncfWeightCompression(mode="int4"), mlp_ctx)
    small_groups = nncf_weight_compression(
        mlp_ir, NncfWeightCompression(mode="int4", group_size=32), mlp_ctx
    )
    assert small_groups.meta["steps"][-1]["weights"] == {"i4": 2, "u8": 1}  # the last stays int8
    # NNCF keeps convolutions and the last layer in int8: nothing of the CNN would be int4
    cnn_ctx = PassContext(model=cnn, workdir=tmp_path / "cnn")
    cnn_ir = convert(cnn, cnn.original(), ("openvino",), cnn_ctx.workdir / "input")
    with pytest.raises(Unsupported, match="kept every weight in int8"):
        nncf_weight_compression(cnn_ir, NncfWeightCompression(mode="int4"), cnn_ctx)


def test_nncf_weight_compression_bad_configs() -> None:
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\], got 0.0"):
        NncfWeightCompression(mode="int4", ratio=0.0)
    with pytest.raises(ValueError, match="applies to mode='int4' only"):
        NncfWeightCompression(ratio=0.5)
    with pytest.raises(ValueError, match="group_size must be >= 1, or -1"):
        NncfWeightCompression(mode="int4", group_size=0)
    with pytest.raises(ValueError, match="mode must be 'int8' or 'int4'"):
        NncfWeightCompression(mode="int2")  # type: ignore[arg-type]
