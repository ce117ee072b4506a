from __future__ import annotations

from pathlib import Path

import pytest

from mahir import runtimes
from mahir.errors import BadInput
from mahir.hardware import Gpu, Machine
from mahir.model import Model, load_model
from mahir.passes.fuse_qkv import FuseQKV
from mahir.passes.packing import PackSequences
from mahir.passes.pooling import PoolInModel
from mahir.passes.precision import Float16
from mahir.search.candidates import propose
from mahir.types import Device

ZEN4 = Machine("AMD EPYC", 2, 2, ("avx2", "avx512", "avx512_vnni", "avx512_bf16"), 24.0)
OLD_XEON = Machine("Intel Xeon", 4, 8, ("avx2", "avx512"), 32.0)


def test_the_baseline_comes_first_and_ids_are_unique(minilm: Model) -> None:
    proposed, skipped = propose(minilm, ZEN4, "latency")
    ids = [c.id for c in proposed] + [c.id for c, _ in skipped]
    assert proposed[0].id == "torch"  # a module: PyTorch eager is the original as given
    assert proposed[0].recipe.steps == ()
    assert len(ids) == len(set(ids))


def test_int8_is_left_out_with_a_reason_where_the_cpu_has_no_int8_dot_product(
    minilm: Model,
) -> None:
    with_vnni = {c.id for c in propose(minilm, ZEN4, "latency")[0]}
    proposed, skipped = propose(minilm, OLD_XEON, "latency")
    assert "ort-dynamic-int8" in with_vnni
    assert "openvino-nncf-int8" in with_vnni
    assert not any("int8" in c.id for c in proposed)
    reasons = {c.id: why for c, why in skipped}
    assert "VNNI" in reasons["ort-dynamic-int8"]
    default = next(c for c in proposed if c.id == "openvino-default")
    assert "f32 here" in default.label  # no bf16 instructions: OpenVINO's default is f32


def test_transformer_techniques_are_left_out_for_other_models(mlp: Model) -> None:
    proposed, skipped = propose(mlp, ZEN4, "latency")
    assert "ort-fused" not in {c.id for c in proposed}
    assert "not a transformer" in dict((c.id, why) for c, why in skipped)["ort-fused"]


@pytest.mark.parametrize(
    ("objective", "hint"), [("latency", "latency"), ("throughput", "throughput")]
)
def test_openvino_candidates_follow_the_objective(mlp: Model, objective: str, hint: str) -> None:
    proposed, _ = propose(mlp, ZEN4, objective)  # type: ignore[arg-type]
    openvino = [c for c in proposed if c.recipe.runtime == "openvino"]
    assert openvino
    assert all(c.recipe.options.openvino.hint == hint for c in openvino)


def test_the_direct_openvino_conversion_is_left_out_for_an_onnx_model(
    minilm: Model, minilm_onnx: Path
) -> None:
    assert "openvino-direct-nncf-int8" in {c.id for c in propose(minilm, ZEN4, "latency")[0]}
    onnx_model = load_model(minilm_onnx)
    skipped = dict((c.id, why) for c, why in propose(onnx_model, ZEN4, "latency")[1])
    assert "ONNX" in skipped["openvino-direct-nncf-int8"]
    assert "ONNX" in skipped["openvino-direct-default"]


H200 = Machine(
    "Intel Xeon", 16, 32, ("avx2", "avx512"), 128.0, (Gpu("NVIDIA H200", (9, 0), 139.8),)
)
T4 = Machine("Intel Xeon", 4, 8, ("avx2",), 32.0, (Gpu("Tesla T4", (7, 5), 15.0),))
CUDA = Device.parse("cuda")


def test_a_gpu_gets_its_own_candidates_against_eager_fp32_on_the_same_gpu(
    minilm: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtimes, "available_providers", lambda: CPU_WHEEL)
    proposed, skipped = propose(minilm, H200, "throughput", device=CUDA)
    first = proposed[0]
    assert (first.id, first.recipe.runtime, first.recipe.steps) == ("torch", "torch", ())
    assert all(c.recipe.options.device == CUDA for c in proposed)
    ids = {c.id for c in proposed}
    assert {"cuda-graphs-bf16", "cuda-graphs-fp16", "torch-fp16", "torch-bf16"} <= ids
    assert {"packed-fp8", "cuda-graphs-fp8", "packed-fp8-static", "cuda-graphs-fp8-static"} <= ids
    assert {"packed-bf16", "packed-fp16"} <= ids
    for candidate in proposed:  # fp8 casts each matmul's input: q, k and v read one
        fused = any(isinstance(step, FuseQKV) for step in candidate.recipe.steps)
        assert fused == ("fp8" in candidate.id), candidate.id
    assert not any(c.recipe.runtime in ("onnxruntime", "openvino") for c in proposed)
    pooled_or_packed = (PoolInModel, PackSequences)  # an encoder: only the embedding leaves
    assert all(isinstance(c.recipe.steps[-1], pooled_or_packed) for c in proposed[1:])
    assert [c.id for c, _ in skipped] == ["ort-cuda-fp16", "ort-tensorrt-fp16"]  # CPU wheel
    assert "NVIDIA H200" in H200.summary()


CPU_WHEEL = ("AzureExecutionProvider", "CPUExecutionProvider")
GPU_WHEEL = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def test_onnxruntime_gpu_candidates_where_its_providers_are(
    minilm: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With onnxruntime-gpu: the CUDA provider on an fp16 graph and TensorRT on the fp32 one,
    both pooled inside and on the device asked for, after PyTorch's."""
    monkeypatch.setattr(runtimes, "available_providers", lambda: GPU_WHEEL)
    gpu1 = Device.parse("cuda:1")
    two = Machine("Intel Xeon", 16, 32, ("avx2",), 128.0, H200.gpus * 2)
    proposed, skipped = propose(minilm, two, "latency", device=gpu1)
    assert skipped == []
    ids = [c.id for c in proposed]
    assert ids[-2:] == ["ort-cuda-fp16", "ort-tensorrt-fp16"]
    cuda, tensorrt = (c.recipe for c in proposed[-2:])
    assert (cuda.runtime, tensorrt.runtime) == ("onnxruntime", "onnxruntime-tensorrt")
    assert [type(s) for s in cuda.steps] == [PoolInModel, Float16]
    assert [type(s) for s in tensorrt.steps] == [PoolInModel]
    assert cuda.options.device == tensorrt.options.device == gpu1
    # CUDA alone: TensorRT is left out, saying which provider is missing.
    monkeypatch.setattr(runtimes, "available_providers", lambda: GPU_WHEEL[1:])
    proposed, skipped = propose(minilm, H200, "latency", device=CUDA)
    assert "ort-cuda-fp16" in {c.id for c in proposed}
    ((left_out, why),) = skipped
    assert left_out.id == "ort-tensorrt-fp16"
    assert why.startswith("onnxruntime here has no TensorRT provider: pip install onnxruntime-gpu")


@pytest.mark.skipif(
    "CUDAExecutionProvider" in runtimes.available_providers(), reason="onnxruntime-gpu here"
)
def test_onnxruntime_gpu_candidates_are_left_out_with_the_reason_here(mlp: Model) -> None:
    """The real onnxruntime here is the CPU wheel, as on the GPU machine mahir is measured on:
    its GPU candidates are listed as left out, with the fix."""
    proposed, skipped = propose(mlp, H200, "latency", device=CUDA)
    assert not any(c.recipe.runtime.startswith("onnxruntime") for c in proposed)
    reasons = {c.id: why for c, why in skipped}
    for cid in ("ort-cuda-fp16", "ort-tensorrt-fp16"):
        assert reasons[cid].startswith("onnxruntime here has no CUDA provider: pip install ")
    assert "torch-tensorrt" not in reasons  # no runtime for it: not a candidate at all


def test_only_a_sentence_encoder_pools_or_packs_in_the_model_on_a_gpu(mlp: Model) -> None:
    proposed, skipped = propose(mlp, H200, "latency", device=CUDA)
    assert len(proposed) > 1
    steps = [s for c in proposed for s in c.recipe.steps]
    assert not any(isinstance(s, (PoolInModel, PackSequences)) for s in steps)
    assert "sentence encoders" in dict((c.id, why) for c, why in skipped)["packed-fp16"]


def test_bf16_is_left_out_on_a_gpu_without_bf16_tensor_cores(minilm: Model) -> None:
    proposed, skipped = propose(minilm, T4, "latency", device=CUDA)
    assert not any("bf16" in c.id or "fp8" in c.id for c in proposed)
    reasons = dict((c.id, why) for c, why in skipped)
    assert "compute capability 8.0" in reasons["torch-bf16"]
    assert "compute capability 8.9" in reasons["cuda-graphs-fp8"]


def test_an_onnx_file_or_a_missing_gpu_is_refused_in_one_line(
    minilm: Model, minilm_onnx: Path
) -> None:
    with pytest.raises(BadInput, match=r"ONNX file.*--device cpu"):
        propose(load_model(minilm_onnx), H200, "latency", device=CUDA)
    with pytest.raises(BadInput, match=r"no cuda:1 here: this machine has 1 CUDA GPU;"):
        H200.require(Device.parse("cuda:1"))
    H200.require(CUDA)
    ZEN4.require(Device.parse("cpu"))
