"""What a candidate computes in, and its achieved FLOP/s as a share of the matching peak."""

from __future__ import annotations

import pytest

from mahir.flops import Cost
from mahir.passes.float8 import TorchaoFloat8
from mahir.passes.nncf import NncfInt8
from mahir.passes.precision import TorchLowPrecision
from mahir.passes.quantize import DynamicInt8
from mahir.passes.torchao import TorchaoInt8
from mahir.peaks import Peak, Peaks
from mahir.recipe import Recipe
from mahir.search.candidates import Candidate
from mahir.search.halving import Outcome
from mahir.search.utilization import precision_of, utilization
from mahir.types import Perf

PEAKS = Peaks(
    "cpu", "AMD EPYC", "2.13", 2, (Peak("fp32", 1e11, 512, ""), Peak("bf16", 4e11, 512, ""))
)


@pytest.mark.parametrize(
    ("recipe", "settings", "precision"),
    [
        (Recipe((), "torch"), {"precision": "f32"}, "fp32"),
        (Recipe((), "onnxruntime"), {}, "fp32"),
        (Recipe((), "openvino"), {"precision": "bf16"}, "bf16"),  # OpenVINO's own choice
        (Recipe((NncfInt8(),), "openvino"), {"precision": "bf16"}, "int8"),
        (Recipe((DynamicInt8(per_channel=True),), "onnxruntime"), {}, "int8"),
        (Recipe((TorchaoInt8(weight_only=True),), "torch-compile"), {}, "fp32"),
        (Recipe((TorchLowPrecision("float16"),), "torch"), {"precision": "f16"}, "fp16"),
        (Recipe((TorchLowPrecision("bfloat16"),), "torch-compile"), {}, "bf16"),
        (Recipe((TorchLowPrecision("bfloat16"), TorchaoFloat8()), "torch-compile"), {}, "fp8"),
    ],
)
def test_precision_of(recipe: Recipe, settings: dict[str, str], precision: str) -> None:
    assert precision_of(recipe, settings) == precision


def _outcome(recipe: Recipe, settings: dict[str, str], p50_ms: dict[int, float]) -> Outcome:
    perf = {
        size: Perf(size, (ms,), ms, ms, ms, 1e3 * size / ms, None, 0.0, False)
        for size, ms in p50_ms.items()
    }
    return Outcome(Candidate("c", "c", recipe), "ok", perf=perf, settings=settings)


def test_achieved_flops_are_the_batch_s_flops_over_its_median_latency() -> None:
    outcome = _outcome(Recipe((), "openvino"), {"precision": "bf16"}, {1: 0.5, 8: 2.0})
    used = utilization(outcome, Cost({1: 1e7, 8: 8e7}), PEAKS)
    assert used[1].flops_per_s == pytest.approx(1e7 / 0.5e-3)
    assert used[8].flops_per_s == pytest.approx(8e7 / 2e-3)
    assert (used[8].precision, used[8].peak, used[8].note) == ("bf16", "bf16", None)
    assert used[8].fraction == pytest.approx(4e10 / 4e11)


def test_int8_without_an_int8_peak_is_a_share_of_the_best_float_one_and_says_so() -> None:
    outcome = _outcome(Recipe((DynamicInt8(),), "onnxruntime"), {}, {1: 1.0})
    used = utilization(outcome, Cost({1: 1e8}), PEAKS)[1]
    assert (used.precision, used.peak) == ("int8", "bf16")
    assert used.note is not None
    assert "best float peak" in used.note


def test_nothing_counted_nothing_claimed() -> None:
    outcome = _outcome(Recipe((), "onnxruntime"), {}, {1: 1.0})
    assert utilization(outcome, Cost(note="not counted: an ONNX source"), PEAKS) == {}
    assert utilization(outcome, None, PEAKS) == {}
    unmeasured = utilization(outcome, Cost({1: 1e8}), None)[1]
    assert unmeasured.fraction is None
    assert unmeasured.flops_per_s == pytest.approx(1e11)
