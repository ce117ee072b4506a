"""The measured matmul peak of the device a run is on: the denominator of "fraction of peak".

A peak here is the best FLOP/s torch reaches on square matmuls of one dtype on this device,
timed on this machine, never a datasheet number: a datasheet's peak assumes clocks, cores and
kernels a shared 2-core VM or a power-capped GPU does not give, and the question a report
answers is how much of what this machine can do a candidate used. On a CPU: fp32; bf16 where
the CPU has bf16 instructions; int8 (`torch._int_mm`) where it multiplies int8 in hardware;
n = 256 to 1024 (cache-resident and not, the best counts), with torch at the cores the runtimes
use: about half a second on 2 cores. Other processes busy meanwhile make it low: such a peak
serves its run, says so, and is not cached. On a CUDA GPU: fp32 with TF32 off, fp16, bf16
(compute capability 8.0 or later) and int8 at n = 8192, timed by CUDA events. Each is the best
of a few timings: noise only ever makes a matmul slower.

Beside them, the memory bandwidth (`measure_bandwidth`): STREAM's triad `a = b + s*c`
(McCalpin, 1995) in fp32 on arrays far past the last-level cache, by torch on the same threads,
counting 12 bytes per element as STREAM does (two reads, one write; the write-allocate read a CPU
adds is not counted): the roof of memory-bound work (`profile/roofline.py`).

Measured once per machine: peaks are kept in `peaks.json` in the user's cache folder
(`cache_dir()`; `MAHIR_CACHE_DIR` moves it), keyed by the CPU model or GPU name, torch's
version, the dtype ("memory" for the bandwidth) and, on a CPU, the threads. The file is written
whole or not at all; a file that cannot be read, or an entry that is not a positive number, is
measured again, never trusted; a cache that cannot be written costs only a measurement next
time.

Core layer: imports hardware, measure (its timers), files and types; nothing that runs a model.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from mahir.files import cache_dir, write_text_atomically
from mahir.hardware import Machine, physical_cores
from mahir.measure import BUSY_CORES, MachineLoad, timer_for
from mahir.types import Device

FLOATS = ("fp32", "bf16", "fp16")
CPU_SIZES = (256, 512, 1024)
CUDA_SIZES = (8192,)
TRIAD_ELEMENTS = {"cpu": 2**25, "cuda": 2**28}
"""fp32 elements per triad array: 128 MiB on a CPU (three arrays, several times any L3), 1 GiB on a
GPU (twenty times an H200's L2)."""
TRIAD_BYTES = 12
"""Bytes STREAM counts per triad element: b and c read, a written, 4 bytes each."""
REPEATS = 5
"""Timings per size; the best counts."""

Measure = Callable[[Device, str], "Peak"]
"""(device, dtype) -> its peak, measured now."""
MeasureBandwidth = Callable[[Device], "Bandwidth"]
"""device -> its memory bandwidth, measured now."""


@dataclass(frozen=True, slots=True)
class Peak:
    dtype: str
    """fp32, bf16, fp16 or int8 (then the "FLOP/s" are int8 operations per second)."""
    flops_per_s: float
    size: int
    """n of the n x n x n matmul that reached it."""
    measured: str
    """When it was measured (ISO 8601): by this run, or by an earlier one (`cached`)."""
    cached: bool = False
    other_load: float = 0.0
    """Cores other processes kept busy while it was measured (a CPU's): above
    `measure.BUSY_CORES` it is likely low, so it serves this run and is not cached."""

    @property
    def busy(self) -> bool:
        return self.other_load > BUSY_CORES


@dataclass(frozen=True, slots=True)
class Bandwidth:
    """The best memory bandwidth STREAM's triad reached on a device."""

    bytes_per_s: float
    size: int
    """Bytes of each of the three arrays."""
    measured: str
    cached: bool = False
    other_load: float = 0.0
    """As `Peak.other_load`: above `measure.BUSY_CORES` it serves its run and is not cached."""

    @property
    def busy(self) -> bool:
        return self.other_load > BUSY_CORES


@dataclass(frozen=True, slots=True)
class Peaks:
    """The measured peaks of one device, and what they were measured with."""

    device: str
    """"cpu" or "cuda:N"."""
    name: str
    """The CPU model or the GPU's name."""
    torch: str
    threads: int | None
    """Torch's threads while a CPU was measured; None on a GPU."""
    peaks: tuple[Peak, ...]
    bandwidth: Bandwidth | None = None
    """The memory roof, where it was asked for (`device_bandwidth`)."""

    def get(self, dtype: str) -> Peak | None:
        return next((p for p in self.peaks if p.dtype == dtype), None)

    def denominator(self, precision: str) -> tuple[Peak | None, str | None]:
        """The peak a candidate computing in `precision` is a fraction of, and a note when that
        is not its own precision's (none measured here): then the best float peak, said so."""
        own = self.get(precision)
        if own is not None:
            return own, None
        floats = [p for p in self.peaks if p.dtype in FLOATS]
        if not floats:
            return None, f"no peak measured on {self.name}"
        best = max(floats, key=lambda p: p.flops_per_s)
        return best, f"{precision} against the best float peak ({best.dtype}): none measured"

    def summary(self) -> str:
        """One line: the device, each dtype's peak, and whether it was read from the cache."""
        if not self.peaks:
            return f"{self.device} ({self.name}): none measured"
        found = ", ".join(
            f"{p.dtype} {rate(p.flops_per_s)}{'OP' if p.dtype == 'int8' else 'FLOP'}/s"
            + (" (busy machine: likely low)" if p.busy else "")
            for p in self.peaks
        )
        memory = self.bandwidth
        if memory is not None:
            found += f", memory {rate(memory.bytes_per_s)}B/s" + (
                " (busy machine: likely low)" if memory.busy else ""
            )
        cached = all(p.cached for p in self.peaks) and (memory is None or memory.cached)
        return f"{self.device} ({self.name}): {found}{' (cached)' if cached else ''}"

    def method(self) -> str:
        threads = f", {self.threads} threads" if self.threads else ""
        timer = "CUDA events" if self.device.startswith("cuda") else "the host clock"
        return f"torch {self.torch} square matmuls{threads}, best of {REPEATS}, by {timer}"


def rate(per_s: float) -> str:
    """A rate with an SI prefix and 3 digits, for its unit to follow: "149 G", "0.79 P"."""
    for prefix, scale in _SI:
        if per_s >= scale:
            return f"{per_s / scale:.3g} {prefix}"
    return f"{per_s:.3g} "


_SI = (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3))


def device_name(machine: Machine, device: Device) -> str:
    if device.kind == "cuda" and device.index < len(machine.gpus):
        return machine.gpus[device.index].name
    return machine.cpu if device.kind == "cpu" else f"{device}"


def dtypes_for(machine: Machine, device: Device) -> tuple[str, ...]:
    """What is worth measuring on `device`: the precisions its candidates compute in."""
    if device.kind == "cuda":
        gpus = machine.gpus
        capability = gpus[device.index].compute_capability if device.index < len(gpus) else (0, 0)
        if capability < (8, 0):
            return ("fp32", "fp16", "int8")
        fp8 = ("fp8",) if capability >= (8, 9) else ()  # Ada and Hopper
        return ("fp32", "bf16", "fp16", "int8", *fp8)
    bf16 = machine.has("avx512_bf16") or machine.has("amx_bf16")
    return ("fp32", *(("bf16",) if bf16 else ()), *(("int8",) if machine.int8_dot_product else ()))


def device_peaks(
    machine: Machine,
    device: Device,
    *,
    path: Path | None = None,
    measure: Measure | None = None,
    dtypes: tuple[str, ...] | None = None,
) -> Peaks:
    """The peaks of `device`: from the cache at `path` (default `cache_dir()/peaks.json`),
    else measured (by `measure`, default `measure_matmul`) and written there. A dtype whose
    matmul torch refuses here is left out, not guessed."""
    import torch

    path = path or cache_dir() / "peaks.json"
    measure = measure or measure_matmul
    threads = physical_cores() if device.kind == "cpu" else None
    base = Peaks(str(device), device_name(machine, device), str(torch.__version__), threads, ())
    stored, found, fresh = _read(path), [], {}
    for dtype in dtypes if dtypes is not None else dtypes_for(machine, device):
        key = _key(base, dtype)
        peak = _peak(dtype, stored.get(key))
        if peak is None:
            try:
                peak = measure(device, dtype)
            except RuntimeError:  # torch has no such matmul on this device (an old GPU's int8)
                continue
            if not peak.busy:
                fresh[key] = {
                    "flops_per_s": peak.flops_per_s,
                    "size": peak.size,
                    "measured": peak.measured,
                }
        found.append(peak)
    _save(path, stored, fresh)
    return replace(base, peaks=tuple(found))


def device_bandwidth(
    machine: Machine,
    device: Device,
    *,
    path: Path | None = None,
    measure: MeasureBandwidth | None = None,
) -> Bandwidth:
    """The memory bandwidth of `device`: from the cache at `path` (as `device_peaks`), else
    measured (by `measure`, default `measure_bandwidth`) and written there."""
    import torch

    path = path or cache_dir() / "peaks.json"
    threads = physical_cores() if device.kind == "cpu" else None
    base = Peaks(str(device), device_name(machine, device), str(torch.__version__), threads, ())
    stored, key = _read(path), _key(base, "memory")
    found = _entry(stored.get(key), "bytes_per_s")
    if found is not None:
        return Bandwidth(*found, cached=True)
    bandwidth = (measure or measure_bandwidth)(device)
    if not bandwidth.busy:
        entry = {"bytes_per_s": bandwidth.bytes_per_s, "size": bandwidth.size}
        _save(path, stored, {key: entry | {"measured": bandwidth.measured}})
    return bandwidth


def _save(path: Path, stored: dict[str, Any], fresh: dict[str, Any]) -> None:
    """The cache with `fresh` entries added; a read-only home costs a measurement next time,
    which is all a cache saves."""
    if fresh:
        with suppress(OSError):
            write_text_atomically(path, json.dumps(stored | fresh, indent=1, sort_keys=True))


def _key(peaks: Peaks, dtype: str) -> str:
    threads = f" | {peaks.threads} threads" if peaks.threads else ""
    return f"{peaks.name} | torch {peaks.torch} | {dtype}{threads}"


def _read(path: Path) -> dict[str, Any]:
    """The cache's entries; none when it is missing, unreadable or not a JSON object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _peak(dtype: str, entry: Any) -> Peak | None:
    """A cached peak, if the entry is a sane one."""
    found = _entry(entry, "flops_per_s")
    return None if found is None else Peak(dtype, *found, cached=True)


def _entry(entry: Any, rate_field: str) -> tuple[float, int, str] | None:
    """A cached entry's (rate, size, when measured), if it is a sane one."""
    if not isinstance(entry, dict):
        return None
    value, size, when = entry.get(rate_field), entry.get("size"), entry.get("measured")
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return None
    if not isinstance(size, int) or not isinstance(when, str):
        return None
    return float(value), size, when


def measure_matmul(
    device: Device, dtype: str, *, sizes: tuple[int, ...] | None = None, repeats: int = REPEATS
) -> Peak:
    """The best FLOP/s of n x n by n x n matmuls in `dtype` over `sizes` (default: the
    device's), each timed `repeats` times, with the n that reached it and, on a CPU, the cores
    other processes kept busy meanwhile."""
    import torch

    sizes = sizes or (CUDA_SIZES if device.kind == "cuda" else CPU_SIZES)
    where = str(device)
    best, best_size = 0.0, sizes[0]
    load = MachineLoad()
    with _exactly(device):
        for n in sizes:
            if dtype == "int8":
                a, b = (
                    torch.randint(-64, 64, (n, n), dtype=torch.int8, device=where) for _ in "ab"
                )
                matmul: Callable[[Any, Any], Any] = torch._int_mm
            elif dtype == "fp8":  # e4m3 x e4m3 (the second column-major), as torchao calls it
                a, b = (torch.randn(n, n, device=where).to(torch.float8_e4m3fn) for _ in "ab")
                b, one = b.t(), torch.ones((), device=where)
                matmul = partial(
                    torch._scaled_mm, scale_a=one, scale_b=one, out_dtype=torch.bfloat16
                )
            else:
                kind = getattr(torch, _TORCH[dtype])
                a, b = (torch.randn(n, n, dtype=kind, device=where) for _ in "ab")
                matmul = torch.matmul
            calls = 3 if device.kind == "cuda" else 1  # a GPU's matmul is short next to a launch
            matmul(a, b)  # warm-up: allocation, kernel choice
            timer = timer_for(device)
            for _ in range(repeats):
                timer.start()
                for _ in range(calls):
                    matmul(a, b)
                seconds = timer.stop()
                if seconds > 0 and calls * 2 * n**3 / seconds > best:
                    best, best_size = calls * 2 * n**3 / seconds, n
    other = load.other_cores() if device.kind == "cpu" else 0.0  # a GPU's matmul ignores the host
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return Peak(dtype, best, best_size, now, other_load=other)


_TORCH = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def measure_bandwidth(
    device: Device, *, elements: int | None = None, repeats: int = REPEATS
) -> Bandwidth:
    """The best bytes/s of STREAM's triad `a = b + 3c` on fp32 arrays of `elements` each
    (default: the device's `TRIAD_ELEMENTS`), timed `repeats` times by the device's timer."""
    import torch

    n = elements or TRIAD_ELEMENTS[device.kind]
    where = str(device)
    load = MachineLoad()
    best = 0.0
    with _exactly(device):
        a, b, c = (torch.full((n,), 1.0, device=where) for _ in "abc")  # touched: pages mapped
        torch.add(b, c, alpha=3.0, out=a)  # warm-up
        timer = timer_for(device)
        for _ in range(repeats):
            timer.start()
            torch.add(b, c, alpha=3.0, out=a)
            seconds = timer.stop()
            if seconds > 0:
                best = max(best, TRIAD_BYTES * n / seconds)
    other = load.other_cores() if device.kind == "cpu" else 0.0
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return Bandwidth(best, 4 * n, now, other_load=other)


@contextmanager
def _exactly(device: Device) -> Iterator[None]:
    """Torch set as the runs use it, and put back after: on a CPU the runtimes' threads (the
    physical cores); on a GPU fp32 matmuls in fp32, TF32 off."""
    import torch

    threads, precision = torch.get_num_threads(), torch.get_float32_matmul_precision()
    if device.kind == "cpu":
        torch.set_num_threads(physical_cores())
    else:
        torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision(precision)


if __name__ == "__main__":
    from mahir.hardware import detect
    from mahir.types import CPU

    machine = detect()
    found = device_peaks(machine, CPU)
    print(f"{found.name}: {found.method()}")
    for p in found.peaks:
        print(f"  {p.dtype}: {p.flops_per_s / 1e9:,.1f} G/s at n={p.size}, measured {p.measured}")
    memory = device_bandwidth(machine, CPU)
    print(f"  memory: {memory.bytes_per_s / 1e9:,.1f} GB/s (triad), measured {memory.measured}")
