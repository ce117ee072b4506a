from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mahir.errors import Unsupported
from mahir.hardware import detect
from mahir.model import Model
from mahir.passes import PassContext, run_pass
from mahir.passes.precision import Float16, TorchLowPrecision
from mahir.quality import fidelity
from mahir.runtimes import open_session
from mahir.types import Artifact


def test_fp16_onnx_halves_the_file_and_keeps_the_answers(
    minilm: Model, minilm_onnx: Path, minilm_eval: tuple[list, list], tmp_path: Path
) -> None:
    source = Artifact("onnx", minilm.spec, path=minilm_onnx)
    artifact = run_pass(source, Float16(), PassContext(model=minilm, workdir=tmp_path))
    assert artifact.path is not None
    assert artifact.path.stat().st_size < 0.55 * minilm_onnx.stat().st_size
    batches, reference = minilm_eval
    for runtime in ("onnxruntime", "openvino"):
        quality = fidelity(minilm, open_session(runtime, artifact), batches, reference)
        assert quality.headline.cosine_min > 0.9999, runtime
        assert quality.outputs["last_hidden_state"].max_abs_err < 0.05


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_torch_low_precision_keeps_an_fp32_contract(
    dtype: str, minilm: Model, minilm_eval: tuple[list, list], tmp_path: Path
) -> None:
    with_bf16 = dataclasses.replace(detect(gpus=False), isa=("avx2", "avx512_bf16"))
    ctx = PassContext(model=minilm, workdir=tmp_path, machine=with_bf16)
    artifact = run_pass(minilm.original(), TorchLowPrecision(dtype), ctx)  # type: ignore[arg-type]
    assert artifact.module is not minilm.module
    assert next(minilm.module.parameters()).dtype.is_floating_point  # original untouched:
    assert str(next(minilm.module.parameters()).dtype) == "torch.float32"
    batches, reference = minilm_eval
    session = open_session("torch", artifact)
    out = session.run(batches[0])
    assert out["last_hidden_state"].dtype.name == "float32"
    quality = fidelity(minilm, session, batches, reference)
    assert quality.headline.cosine_mean > 0.999
    assert quality.headline.cosine_min > 0.99


def test_bf16_needs_the_instructions(minilm: Model, tmp_path: Path) -> None:
    plain = dataclasses.replace(detect(gpus=False), isa=("avx2",), gpus=())
    ctx = PassContext(model=minilm, workdir=tmp_path, machine=plain)
    with pytest.raises(Unsupported, match="avx512_bf16, AMX or a GPU"):
        run_pass(minilm.original(), TorchLowPrecision(), ctx)
