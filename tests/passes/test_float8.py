"""Static fp8 through torchao on this CPU (torch computes fp8 matmuls here too, slowly: the
small MLP keeps it quick; dynamic scaling refuses a CPU). The GPU, where fp8 pays, runs both
scalings in tests/runtimes/test_cuda.py. Each layer fp8 kernels take gets fp8 weights, the
answers stay the original's on held-out batches, a static scale is the one its calibration
observed, and a static pass without calibration is refused before any work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from torch import nn

from mahir.errors import Unsupported
from mahir.model import Model
from mahir.passes import PassContext, apply_steps, run_pass
from mahir.passes.float8 import TorchaoFloat8
from mahir.passes.precision import TorchLowPrecision
from mahir.quality import Quality, fidelity
from mahir.runtimes import open_session, reference_outputs
from mahir.types import Artifact

Batch = dict[str, np.ndarray]


@pytest.fixture(scope="module")
def held_out(mlp: Model) -> tuple[list[Batch], list]:
    """Traffic-shaped batches and the verification shapes, none of them calibration's."""
    batches = mlp.family.workload([8], batches_per_size=2, seed=9).batches[8]
    batches += mlp.family.verification_batches()
    return batches, reference_outputs(mlp, batches)


def _calibration(mlp: Model, scale: float = 1.0) -> tuple[Batch, ...]:
    batches = mlp.family.workload([8], batches_per_size=2, seed=3).batches[8]
    return tuple({"x": (b["x"] * scale).astype(np.float32)} for b in batches)


def _fp8(mlp: Model, config: TorchaoFloat8, calibration: tuple, tmp_path: Path) -> Artifact:
    ctx = PassContext(model=mlp, workdir=tmp_path, calibration=calibration)
    artifact = apply_steps(mlp.original(), (TorchLowPrecision("bfloat16"), config), ctx)
    assert artifact.meta["steps"][-1] == {
        "quantized": f"torchao-float8-{config.scaling}",
        "fp8_layers": 2,  # 32->64 and 64->64; the 64->10 head is no multiple of 16
    }
    return artifact


def _linears(artifact: Artifact) -> list[nn.Linear]:
    return [m for m in artifact.module.modules() if isinstance(m, nn.Linear)]


def _quality(mlp: Model, artifact: Artifact, held_out: tuple[list[Batch], list]) -> Quality:
    return fidelity(mlp, open_session("torch", artifact), *held_out)


def test_static_fp8_keeps_the_answers_on_inputs_it_did_not_calibrate_on(
    mlp: Model, held_out: tuple[list[Batch], list], tmp_path: Path
) -> None:
    artifact = _fp8(mlp, TorchaoFloat8(scaling="static"), _calibration(mlp), tmp_path)
    plain = [type(m.weight) is nn.Parameter for m in _linears(artifact)]
    assert plain == [False, False, True]
    assert all(type(m.weight) is nn.Parameter for m in _linears(mlp.original()))  # untouched
    quality = _quality(mlp, artifact, held_out).outputs["output"]
    assert quality.top1_agreement is not None
    assert quality.top1_agreement >= 0.95, quality
    assert quality.cosine_mean >= 0.99, quality


def test_a_static_scale_is_the_one_its_calibration_observed(
    mlp: Model, held_out: tuple[list[Batch], list], tmp_path: Path
) -> None:
    """Calibrated on inputs 1,000 times smaller than traffic, the first layer's fixed scale
    (the largest magnitude seen over fp8's largest value, 448) saturates real inputs and the
    answers break."""
    tiny = _calibration(mlp, scale=1e-3)
    static = _fp8(mlp, TorchaoFloat8(scaling="static"), tiny, tmp_path)
    scale = _linears(static)[0].weight.act_quant_scale  # type: ignore[attr-defined]
    largest = max(float(np.abs(b["x"]).max()) for b in tiny)
    assert float(scale) == pytest.approx(largest / 448, rel=0.01)
    broken = _quality(mlp, static, held_out).outputs["output"]
    assert broken.cosine_mean < 0.9, broken


def test_static_fp8_without_calibration_is_refused(mlp: Model, tmp_path: Path) -> None:
    with pytest.raises(Unsupported, match="static fp8 needs calibration inputs"):
        run_pass(mlp.original(), TorchaoFloat8(scaling="static"), PassContext(mlp, tmp_path))
    with pytest.raises(ValueError, match="scaling must be"):
        TorchaoFloat8(scaling="per-row")  # type: ignore[arg-type]
