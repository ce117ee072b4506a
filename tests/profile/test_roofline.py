"""The roofline on a made-up device (fp32 100 GFLOP/s, int8 400 GOP/s, 10 GB/s: ridge at 10
FLOP/B): each op's bound, its fractions, and the advice its bound and kind call for."""

from __future__ import annotations

import pytest

from mahir.peaks import Bandwidth, Peak, Peaks
from mahir.profile.breakdown import OpTime
from mahir.profile.cost import OpCost
from mahir.profile.roofline import advice, place, ridge, whole

PEAKS = Peaks(
    "cpu",
    "Test CPU",
    "2.13",
    2,
    (Peak("fp32", 100e9, 1024, ""), Peak("int8", 400e9, 1024, "")),
    Bandwidth(10e9, 2**27, ""),
)


def op(kind: str, flops: float, moved: float, seconds: float, precision: str = "fp32") -> OpTime:
    return OpTime("op", kind, seconds, OpCost("op", kind, kind, flops, moved, precision))


def test_the_ridge_point_is_the_peak_over_the_bandwidth() -> None:
    assert ridge(PEAKS, "fp32") == pytest.approx(10.0)
    assert ridge(PEAKS, "int8") == pytest.approx(40.0)


def test_a_big_matmul_near_its_fp32_roof_is_compute_bound_and_told_about_int8() -> None:
    matmul = op("matmul", 1e9, 1e6, 0.0125)  # 10 ms of compute, 0.1 ms of memory, in 12.5 ms
    roof = place(matmul, PEAKS)
    assert roof.bound == "compute"
    assert roof.flops_fraction == pytest.approx(0.8)
    assert roof.bytes_fraction == pytest.approx(0.008)
    assert roof.fraction == pytest.approx(0.8)
    assert roof.intensity == pytest.approx(1000.0)
    text = advice(matmul, roof, PEAKS, gpu=False)
    assert "int8" in text
    assert "4.0x" in text


def test_on_a_gpu_the_advice_names_fp8_not_int8() -> None:
    gpu = Peaks(
        "cuda:0",
        "Test GPU",
        "2.13",
        None,
        tuple(Peak(d, f, 8192, "") for d, f in [("fp16", 500e12), ("int8", 900e12), ("fp8", 1e15)]),
        Bandwidth(4e12, 2**30, ""),
    )
    matmul = op("matmul", 1e12, 1e9, 2.5e-3, precision="fp16")  # 2 ms of compute in 2.5 ms
    text = advice(matmul, place(matmul, gpu), gpu, gpu=True)
    assert "fp8 matmuls raise the roof 2.0x" in text


def test_an_op_that_took_no_time_has_no_fractions() -> None:
    view = place(op("elementwise", 0.0, 1e3, 0.0), PEAKS)  # on a GPU: it launched no kernel
    assert (view.fraction, view.flops_fraction, view.bytes_fraction) == (None, None, None)
    assert view.bound == "unknown"


def test_an_int8_op_is_held_to_the_int8_roof() -> None:
    matmul = op("matmul", 4e9, 1e6, 0.0125, precision="int8")
    roof = place(matmul, PEAKS)
    assert (roof.peak, roof.flops_fraction) == ("int8", pytest.approx(0.8))
    assert "only less work helps" in advice(matmul, roof, PEAKS, gpu=False)


def test_a_low_intensity_op_is_memory_bound_and_told_about_fusion() -> None:
    add = op("elementwise", 1e6, 1e8, 0.02)  # 10 ms of memory in 20 ms
    roof = place(add, PEAKS)
    assert roof.bound == "memory"
    assert roof.fraction == pytest.approx(0.5)
    assert "fusion" in advice(add, roof, PEAKS, gpu=False)


def test_a_matmul_streaming_its_weights_is_told_about_batching() -> None:
    matmul = op("matmul", 1e6, 1e8, 0.02)
    assert "batching" in advice(matmul, place(matmul, PEAKS), PEAKS, gpu=False)


def test_time_far_above_both_roofs_is_overhead() -> None:
    tiny = op("elementwise", 1e3, 1e3, 1e-3)
    roof = place(tiny, PEAKS)
    assert roof.bound == "overhead"
    assert "fusion" in advice(tiny, roof, PEAKS, gpu=False)


def test_on_a_gpu_a_tiny_kernel_is_told_about_cuda_graphs_a_slow_attention_about_its_mask() -> None:
    """A GPU op's time is its kernels': a tiny one is its launch, a long one a slow kernel."""
    tiny = op("elementwise", 1e3, 1e3, 1e-5)
    assert "CUDA graphs" in advice(tiny, place(tiny, PEAKS), PEAKS, gpu=True)
    attention = op("attention", 1e6, 1e3, 1e-3)
    roof = place(attention, PEAKS)
    assert roof.bound == "overhead"
    text = advice(attention, roof, PEAKS, gpu=True)
    assert "flash kernel" in text
    assert "CUDA graphs" not in text


def test_padding_in_attention_is_named() -> None:
    attention = op("attention", 1e9, 1e6, 0.0125)
    text = advice(attention, place(attention, PEAKS), PEAKS, gpu=False, padding=0.4)
    assert "40% of the tokens are padding" in text


def test_an_op_without_a_cost_is_off_the_roofline() -> None:
    unknown = OpTime("x", "Custom", 1e-3, None)
    roof = place(unknown, PEAKS)
    assert roof.bound == "unknown"
    assert "Not on the roofline" in advice(unknown, roof, PEAKS, gpu=False)


def test_the_whole_model_sums_each_op_at_its_own_roof() -> None:
    ops = [op("matmul", 1e9, 1e6, 0.0125), op("elementwise", 1e6, 1e8, 0.02)]
    model = whole(ops, 0.04, PEAKS)
    assert model.flops == pytest.approx(1e9 + 1e6)
    assert model.bytes == pytest.approx(1e6 + 1e8)
    assert model.roof_s == pytest.approx(0.010 + 0.010)  # each op's larger bound, summed
    assert model.fraction == pytest.approx(0.5)
    assert model.peak == "fp32"


def test_without_a_measured_bandwidth_the_compute_roof_alone_places_an_op() -> None:
    no_memory = Peaks("cpu", "x", "2.13", 2, PEAKS.peaks)
    roof = place(op("matmul", 1e9, 1e6, 0.0125), no_memory)
    assert (roof.memory_s, roof.bound) == (None, "compute")
