"""Measured peaks and memory bandwidth: sane numbers on this CPU, measured once and cached, a bad
cache re-measured."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from mahir.files import CACHE_ENV, cache_dir
from mahir.hardware import Gpu, Machine
from mahir.peaks import (
    Bandwidth,
    Peak,
    Peaks,
    device_bandwidth,
    device_peaks,
    dtypes_for,
    measure_bandwidth,
    measure_matmul,
)
from mahir.types import CPU, Device

ZEN4 = Machine("AMD EPYC 9R14", 2, 2, ("avx2", "avx512", "avx512_vnni", "avx512_bf16"), 24.0)
OLD = Machine("Intel Xeon E5", 2, 2, ("avx2",), 24.0)
H200 = Machine("Intel Xeon", 16, 32, ("avx2",), 128.0, (Gpu("NVIDIA H200", (9, 0), 139.8),))
T4 = Machine("Intel Xeon", 4, 8, ("avx2",), 32.0, (Gpu("Tesla T4", (7, 5), 15.0),))


class Counting:
    """A measurement that counts its calls and returns made-up peaks."""

    def __init__(self, other_load: float = 0.0) -> None:
        self.calls: list[str] = []
        self.other_load = other_load

    def __call__(self, device: Device, dtype: str) -> Peak:
        self.calls.append(dtype)
        flops = {"fp32": 1e11, "bf16": 3e11, "int8": 6e11}[dtype]
        return Peak(dtype, flops, 512, "2026-01-01T00:00:00+00:00", other_load=self.other_load)


def test_fp32_peak_on_this_cpu_is_positive_and_below_what_its_cores_could_do() -> None:
    """Generously: every logical core at 6 GHz, two 512-bit FMA units (2 x 16 lanes x 2 FLOPs)."""
    flops = measure_matmul(CPU, "fp32", sizes=(128, 256), repeats=2).flops_per_s
    bound = (psutil.cpu_count(logical=True) or 1) * 6e9 * 2 * 32
    assert 0 < flops < bound


def test_the_second_call_reads_the_cache_and_measures_nothing(tmp_path: Path) -> None:
    path, measure = tmp_path / "peaks.json", Counting()
    first = device_peaks(ZEN4, CPU, path=path, measure=measure)
    assert measure.calls == ["fp32", "bf16", "int8"]
    assert not any(p.cached for p in first.peaks)
    second = device_peaks(ZEN4, CPU, path=path, measure=measure)
    assert measure.calls == ["fp32", "bf16", "int8"]
    assert all(p.cached for p in second.peaks)
    assert [(p.dtype, p.flops_per_s) for p in second.peaks] == [
        (p.dtype, p.flops_per_s) for p in first.peaks
    ]
    assert second.name == "AMD EPYC 9R14"
    assert "(cached)" in second.summary()
    assert [p.name for p in tmp_path.iterdir()] == ["peaks.json"]  # written whole, nothing beside


def test_the_cache_keys_on_the_cpu_and_threads(tmp_path: Path) -> None:
    path, measure = tmp_path / "peaks.json", Counting()
    device_peaks(ZEN4, CPU, path=path, measure=measure)
    device_peaks(OLD, CPU, path=path, measure=measure)  # another CPU: measured, not reused
    assert measure.calls == ["fp32", "bf16", "int8", "fp32"]
    keys = json.loads(path.read_text())
    assert len(keys) == 4
    assert all("threads" in key and "torch " in key for key in keys)


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[1, 2, 3]",
        "\udcff",
        json.dumps({"AMD EPYC 9R14 | whatever": 1}),
    ],
)
def test_a_corrupt_cache_is_measured_again_and_rewritten(tmp_path: Path, text: str) -> None:
    path, measure = tmp_path / "peaks.json", Counting()
    path.write_text(text, errors="surrogateescape")
    found = device_peaks(ZEN4, CPU, path=path, measure=measure)
    assert len(measure.calls) == 3
    assert found.get("fp32") is not None
    assert len(json.loads(path.read_text())) >= 3


def test_a_bad_entry_is_measured_again(tmp_path: Path) -> None:
    path, measure = tmp_path / "peaks.json", Counting()
    device_peaks(ZEN4, CPU, path=path, measure=measure)
    entries = json.loads(path.read_text())
    bf16 = next(k for k in entries if "| bf16 |" in k)
    int8 = next(k for k in entries if "| int8 |" in k)
    entries[bf16]["flops_per_s"] = -1.0
    entries[int8] = "fast"
    path.write_text(json.dumps(entries))
    device_peaks(ZEN4, CPU, path=path, measure=measure)
    assert measure.calls[3:] == ["bf16", "int8"]


def test_a_cache_that_cannot_be_written_costs_only_a_measurement(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    measure = Counting()
    found = device_peaks(ZEN4, CPU, path=blocker / "peaks.json", measure=measure)
    assert [p.dtype for p in found.peaks] == ["fp32", "bf16", "int8"]


def test_a_peak_measured_on_a_busy_machine_serves_its_run_and_is_not_cached(
    tmp_path: Path,
) -> None:
    path, busy = tmp_path / "peaks.json", Counting(other_load=1.0)
    found = device_peaks(ZEN4, CPU, path=path, measure=busy)
    assert all(p.busy for p in found.peaks)
    assert "likely low" in found.summary()
    assert not path.exists()


def test_a_dtype_torch_refuses_is_left_out(tmp_path: Path) -> None:
    def no_int8(device: Device, dtype: str) -> Peak:
        if dtype == "int8":
            raise RuntimeError("_int_mm is not supported here")
        return Counting()(device, dtype)

    found = device_peaks(ZEN4, CPU, path=tmp_path / "peaks.json", measure=no_int8)
    assert [p.dtype for p in found.peaks] == ["fp32", "bf16"]


def test_what_is_measured_follows_the_device() -> None:
    assert dtypes_for(ZEN4, CPU) == ("fp32", "bf16", "int8")
    assert dtypes_for(OLD, CPU) == ("fp32",)
    assert dtypes_for(H200, Device("cuda")) == ("fp32", "bf16", "fp16", "int8", "fp8")
    assert dtypes_for(T4, Device("cuda")) == ("fp32", "fp16", "int8")


def test_a_gpu_is_named_and_keyed_without_threads(tmp_path: Path) -> None:
    path = tmp_path / "peaks.json"
    found = device_peaks(H200, Device("cuda"), path=path, measure=Counting(), dtypes=("fp32",))
    assert (found.device, found.name, found.threads) == ("cuda:0", "NVIDIA H200", None)
    assert "CUDA events" in found.method()
    assert [key.split(" | ")[0] for key in json.loads(path.read_text())] == ["NVIDIA H200"]


def test_the_denominator_is_the_precision_s_own_peak_else_the_best_float_one() -> None:
    peaks = Peaks(
        "cpu",
        "AMD EPYC",
        "2.13",
        2,
        (Peak("fp32", 1e11, 512, ""), Peak("bf16", 3e11, 512, "")),
    )
    own, note = peaks.denominator("bf16")
    assert own is not None
    assert own.dtype == "bf16"
    assert note is None
    best, note = peaks.denominator("int8")
    assert best is not None
    assert best.dtype == "bf16"
    assert note == "int8 against the best float peak (bf16): none measured"
    assert Peaks("cpu", "x", "2.13", 2, ()).denominator("fp32") == (
        None,
        "no peak measured on x",
    )


def test_the_cache_folder_is_the_user_s_unless_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "moved"))
    assert cache_dir() == tmp_path / "moved"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "mahir"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "mahir"


def test_the_bandwidth_on_this_cpu_is_between_a_floppy_and_a_gpu() -> None:
    """STREAM's triad on 2 x 16 MiB arrays here: some GB/s on any machine mahir runs on."""
    found = measure_bandwidth(CPU, elements=2**22, repeats=2)
    assert 1e9 < found.bytes_per_s < 5e12
    assert found.size == 4 * 2**22


def test_the_bandwidth_is_measured_once_and_cached_beside_the_peaks(tmp_path: Path) -> None:
    path, calls = tmp_path / "peaks.json", []

    def measure(device: Device) -> Bandwidth:
        calls.append(device)
        return Bandwidth(2e10, 2**27, "2026-01-01T00:00:00+00:00")

    first = device_bandwidth(ZEN4, CPU, path=path, measure=measure)
    second = device_bandwidth(ZEN4, CPU, path=path, measure=measure)
    assert len(calls) == 1
    assert (first.cached, second.cached, second.bytes_per_s) == (False, True, 2e10)
    device_peaks(ZEN4, CPU, path=path, measure=Counting())  # the matmul peaks join the file
    assert sum("| memory |" in key for key in json.loads(path.read_text())) == 1
    peaks = Peaks("cpu", "AMD EPYC", "2.13", 2, (Peak("fp32", 1e11, 512, ""),), second)
    assert "memory 20 GB/s" in peaks.summary()


def test_a_bandwidth_measured_on_a_busy_machine_is_not_cached(tmp_path: Path) -> None:
    path = tmp_path / "peaks.json"
    busy = Bandwidth(2e10, 2**27, "", other_load=1.0)
    found = device_bandwidth(ZEN4, CPU, path=path, measure=lambda device: busy)
    assert found.busy
    assert not path.exists()
