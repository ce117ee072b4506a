"""Paper peaks: cores x clock x operations per cycle where the microarchitecture is known, the
datasheet for a GPU, "unknown" otherwise; and this machine's measured peaks within sane bounds
of its paper ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from mahir.hardware import detect
from mahir.paper_peaks import CpuId, cpu_paper_peaks, gpu_paper_peaks, paper_peaks, read_cpu_id
from mahir.peaks import measure_matmul
from mahir.types import CPU

ZEN4 = CpuId("AuthenticAMD", 0x19, 0x11, "AMD EPYC 9R14", 2.6, "as /proc/cpuinfo shows it")
SAPPHIRE = CpuId("GenuineIntel", 6, 0x8F, "Intel(R) Xeon(R) Platinum 8488C", 2.4, "cpufreq")


def test_a_zen4_core_does_32_fp32_flops_a_cycle() -> None:
    paper = cpu_paper_peaks(ZEN4, 2)
    assert paper.get("fp32") == pytest.approx(2 * 2.6e9 * 32)
    assert paper.get("bf16") == pytest.approx(2 * 2.6e9 * 64)
    assert paper.get("int8") == pytest.approx(2 * 2.6e9 * 128)
    assert paper.how.startswith("Zen 4: 2 cores x 2.60 GHz x 32 fp32 FLOP/cycle")
    assert paper.bytes_per_s is None
    assert paper.unknown is not None
    assert "memory bandwidth: unknown" in paper.unknown


def test_amx_puts_bf16_and_int8_far_above_fp32() -> None:
    paper = cpu_paper_peaks(SAPPHIRE, 4)
    assert paper.get("fp32") == pytest.approx(4 * 2.4e9 * 64)
    assert paper.get("bf16") == pytest.approx(4 * 2.4e9 * 1024)
    assert paper.get("int8") == pytest.approx(4 * 2.4e9 * 2048)


@pytest.mark.parametrize(
    ("name", "fp32_per_cycle"),
    [
        ("Intel(R) Xeon(R) Platinum 8259CL CPU @ 2.50GHz", 64),
        ("Intel(R) Xeon(R) Silver 4214 CPU @ 2.20GHz", 32),
        ("Intel Xeon Processor (Cascadelake)", None),
    ],
)
def test_a_skylake_sp_xeon_has_one_or_two_fma_units_by_sku(
    name: str, fp32_per_cycle: int | None
) -> None:
    paper = cpu_paper_peaks(CpuId("GenuineIntel", 6, 0x55, name, 2.5, "cpufreq"), 1)
    if fp32_per_cycle is None:
        assert paper.flops_per_s == {}
        assert paper.unknown is not None
        assert "one or two AVX-512 FMA units" in paper.unknown
    else:
        assert paper.get("fp32") == pytest.approx(2.5e9 * fp32_per_cycle)


def test_an_unknown_cpu_or_clock_is_said_not_guessed() -> None:
    other = cpu_paper_peaks(CpuId("CentaurHauls", 7, 1, "VIA Nano", 1.6, "cpufreq"), 2)
    assert (other.flops_per_s, other.how) == ({}, "")
    assert other.unknown is not None
    assert "not a microarchitecture mahir knows" in other.unknown
    no_clock = cpu_paper_peaks(CpuId("AuthenticAMD", 0x19, 0x11, "AMD EPYC", None, ""), 2)
    assert no_clock.unknown is not None
    assert "clock is not shown" in no_clock.unknown


def test_a_gpu_s_paper_peaks_are_its_datasheet_s() -> None:
    h200 = gpu_paper_peaks("NVIDIA H200")
    assert (h200.get("bf16"), h200.get("int8"), h200.bytes_per_s) == (989e12, 1978e12, 4.8e12)
    assert gpu_paper_peaks("NVIDIA H100 PCIe").get("bf16") == 756e12
    assert (
        gpu_paper_peaks("Some GPU").unknown == "paper peak unknown: no datasheet for Some GPU here"
    )


def test_the_cpu_is_read_from_cpuinfo_and_cpufreq(tmp_path: Path) -> None:
    cpuinfo, freq = tmp_path / "cpuinfo", tmp_path / "max_freq"
    cpuinfo.write_text(
        "vendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
        "model name\t: AMD EPYC 9R14\ncpu MHz\t\t: 2596.128\n\nvendor_id\t: AuthenticAMD\n"
    )
    found = read_cpu_id(cpuinfo, freq)
    assert (found.vendor, found.family, found.model, found.name) == (
        "AuthenticAMD",
        25,
        17,
        "AMD EPYC 9R14",
    )
    assert found.ghz == pytest.approx(2.596128)
    freq.write_text("3700000\n")
    assert read_cpu_id(cpuinfo, freq).ghz == pytest.approx(3.7)


def test_this_machine_s_measured_fp32_peak_is_within_sane_bounds_of_its_paper_peak() -> None:
    """Between 1% (a busy, throttled VM) and 2x (a nominal clock that boost passes) of paper."""
    paper = paper_peaks(detect(gpus=False), CPU).get("fp32")
    if paper is None:
        pytest.skip(f"no paper peak for this CPU: {read_cpu_id().name}")
    measured = measure_matmul(CPU, "fp32", sizes=(256, 512), repeats=3).flops_per_s
    assert 0.01 * paper < measured < 2.0 * paper
