"""What a device could do on paper: the peak beside each measured one (`peaks.py`).

On a CPU the paper peak is cores x clock x operations per cycle per core, and the operations per
cycle follow from the microarchitecture: its vector FMA units, their width, and the dot-product
instructions it has (AVX-512 VNNI, AVX512-BF16, AMX). `/proc/cpuinfo` names the vendor, family
and model, from which `CORES` knows a few microarchitectures; any other is "unknown", said so,
never guessed. The clock is cpufreq's maximum where the kernel shows it, else the one
`/proc/cpuinfo` shows (a VM's nominal clock: boost can run above it, so a measured peak may pass
the paper one). A CPU's memory bandwidth depends on its channels and DIMMs, which a machine (let
alone a VM) does not show: unknown. On a GPU the paper peaks are the datasheet's dense (no
sparsity) numbers for the few GPUs in `DATASHEETS`.

Sources: Intel 64 and IA-32 Architectures Optimization Reference Manual (FMA ports, AMX TMUL
throughput: 1024 bf16 FLOPs and 2048 int8 operations per cycle per core); AMD Software
Optimization Guide for family 19h (Zen 4: two 256-bit FMA pipes, 512-bit instructions in two
halves) and 1Ah (Zen 5: 512-bit pipes); NVIDIA's H200, H100, A100, L4 and T4 datasheets.

Core layer: imports hardware and types only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mahir.hardware import Machine, physical_cores
from mahir.types import Device


@dataclass(frozen=True, slots=True)
class Core:
    """What one core of a microarchitecture does per cycle, by dtype (int8: operations)."""

    name: str
    per_cycle: dict[str, int]
    why: str


_AVX2 = Core("Haswell to Comet Lake", {"fp32": 32}, "2 x 256-bit FMA units")
_ICX = Core("Ice Lake-SP", {"fp32": 64, "int8": 256}, "2 x 512-bit FMA units")
_SPR = Core(
    "Sapphire/Emerald/Granite Rapids",
    {"fp32": 64, "bf16": 1024, "int8": 2048},
    "2 x 512-bit FMA units, AMX for bf16 and int8",
)
_ZEN2 = Core("Zen 2/3", {"fp32": 32}, "2 x 256-bit FMA pipes")
_ZEN4 = Core(
    "Zen 4", {"fp32": 32, "bf16": 64, "int8": 128}, "2 x 256-bit FMA pipes, AVX-512 in halves"
)
_ZEN5 = Core("Zen 5", {"fp32": 64, "bf16": 128, "int8": 256}, "2 x 512-bit FMA pipes")

CORES: dict[tuple[str, int], tuple[tuple[range, Core], ...]] = {
    ("GenuineIntel", 6): (
        *((range(m, m + 1), _AVX2) for m in (0x3C, 0x3F, 0x45, 0x46, 0x3D, 0x47, 0x4F, 0x56)),
        *((range(m, m + 1), _AVX2) for m in (0x4E, 0x5E, 0x8E, 0x9E, 0xA5, 0xA6)),
        (range(0x6A, 0x6D), _ICX),
        *((range(m, m + 1), _SPR) for m in (0x8F, 0xCF, 0xAD, 0xAE)),
    ),
    ("AuthenticAMD", 0x17): ((range(0x30, 0xB0), _ZEN2),),
    ("AuthenticAMD", 0x19): (
        (range(0x00, 0x10), _ZEN2),
        (range(0x20, 0x60), _ZEN2),
        (range(0x10, 0x20), _ZEN4),
        (range(0x60, 0x80), _ZEN4),
        (range(0xA0, 0xB0), _ZEN4),
    ),
    ("AuthenticAMD", 0x1A): ((range(0x00, 0x20), _ZEN5), (range(0x40, 0x50), _ZEN5)),
}
"""(vendor, family) -> (model range, core) pairs: the microarchitectures known here."""

SKYLAKE_SP = 0x55
"""Skylake-SP, Cascade Lake and Cooper Lake: one or two 512-bit FMA units by SKU."""

DATASHEETS: tuple[tuple[str, dict[str, float], float], ...] = (
    ("H200 NVL", {"fp32": 60e12, "bf16": 835e12, "fp16": 835e12, "fp8": 1671e12}, 4.8e12),
    ("H200", {"fp32": 67e12, "bf16": 989e12, "fp16": 989e12, "fp8": 1979e12}, 4.8e12),
    ("H100 PCIe", {"fp32": 51e12, "bf16": 756e12, "fp16": 756e12, "fp8": 1513e12}, 2.0e12),
    ("H100", {"fp32": 67e12, "bf16": 989e12, "fp16": 989e12, "fp8": 1979e12}, 3.35e12),
    ("A100-SXM4-80GB", {"fp32": 19.5e12, "bf16": 312e12, "fp16": 312e12}, 2.039e12),
    ("A100", {"fp32": 19.5e12, "bf16": 312e12, "fp16": 312e12}, 1.555e12),
    ("L4", {"fp32": 30.3e12, "bf16": 121e12, "fp16": 121e12, "fp8": 242e12}, 300e9),
    ("T4", {"fp32": 8.1e12, "fp16": 65e12}, 320e9),
)
"""GPU name part -> dense peaks (FLOP/s) and memory bandwidth (bytes/s), the first match wins.
int8 tensor cores peak at twice fp16 on these GPUs (`_INT8_OVER_FP16`)."""
_INT8_OVER_FP16 = 2


@dataclass(frozen=True, slots=True)
class PaperPeaks:
    """A device's peaks on paper, and how they were found, or why they are unknown."""

    flops_per_s: dict[str, float] = field(default_factory=dict)
    """dtype -> FLOP/s (int8: operations/s)."""
    bytes_per_s: float | None = None
    how: str = ""
    """What the numbers are made of, in one line."""
    unknown: str | None = None
    """What is not known, and why."""

    def get(self, dtype: str) -> float | None:
        return self.flops_per_s.get(dtype)


@dataclass(frozen=True, slots=True)
class CpuId:
    vendor: str
    family: int
    model: int
    name: str
    ghz: float | None
    clock: str
    """Where the clock came from."""


def paper_peaks(machine: Machine, device: Device, *, cpu: CpuId | None = None) -> PaperPeaks:
    """The paper peaks of `device`: a CPU's from its microarchitecture (`cpu`, default read from
    this machine), a GPU's from its datasheet."""
    if device.kind == "cuda":
        name = machine.gpus[device.index].name if device.index < len(machine.gpus) else ""
        return gpu_paper_peaks(name)
    return cpu_paper_peaks(cpu or read_cpu_id(), physical_cores())


def cpu_paper_peaks(cpu: CpuId, cores: int) -> PaperPeaks:
    """cores x clock x operations per cycle, where the microarchitecture is known."""
    memory = "memory bandwidth: unknown (channels and DIMMs are not visible from here)"
    core, why = _core(cpu)
    if core is None:
        return PaperPeaks(unknown=f"{why}; {memory}")
    if cpu.ghz is None:
        return PaperPeaks(unknown=f"{core.name}: the clock is not shown here; {memory}")
    peaks = {dtype: cores * cpu.ghz * 1e9 * ops for dtype, ops in core.per_cycle.items()}
    how = (
        f"{core.name}: {cores} cores x {cpu.ghz:.2f} GHz x {core.per_cycle['fp32']} fp32 "
        f"FLOP/cycle ({core.why}); clock {cpu.clock}"
    )
    return PaperPeaks(peaks, None, how, memory)


def _core(cpu: CpuId) -> tuple[Core | None, str]:
    """The microarchitecture of `cpu`, or why it is not known."""
    if (cpu.vendor, cpu.family, cpu.model) == ("GenuineIntel", 6, SKYLAKE_SP):
        units = _fma_units(cpu.name)
        if units is None:
            return None, (
                "Skylake-SP/Cascade Lake Xeons have one or two AVX-512 FMA units by SKU, and "
                f"{cpu.name!r} does not say which"
            )
        per_cycle = {"fp32": 32 * units, "int8": 128 * units}
        return Core("Skylake-SP/Cascade Lake", per_cycle, f"{units} x 512-bit FMA units"), ""
    for models, core in CORES.get((cpu.vendor, cpu.family), ()):
        if cpu.model in models:
            return core, ""
    return None, (
        f"paper peak unknown: {cpu.name} ({cpu.vendor} family {cpu.family:#x} model "
        f"{cpu.model:#x}) is not a microarchitecture mahir knows"
    )


def _fma_units(name: str) -> int | None:
    """AVX-512 FMA units of a Skylake-SP/Cascade Lake Xeon, by its SKU's name."""
    if "Platinum" in name or "Gold 6" in name:
        return 2
    if any(tier in name for tier in ("Silver", "Bronze", "Gold 5")):
        return 1
    return None


def gpu_paper_peaks(name: str) -> PaperPeaks:
    """The datasheet's dense peaks of the GPU called `name`, where `DATASHEETS` has it."""
    for part, flops, memory in DATASHEETS:
        if part in name:
            peaks = dict(flops)
            if "fp16" in peaks:
                peaks["int8"] = peaks["fp16"] * _INT8_OVER_FP16
            return PaperPeaks(peaks, memory, f"{part} datasheet, dense")
    return PaperPeaks(unknown=f"paper peak unknown: no datasheet for {name or 'this GPU'} here")


def read_cpu_id(
    cpuinfo: Path = Path("/proc/cpuinfo"),
    max_freq: Path = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq"),
) -> CpuId:
    """Vendor, family, model, name and clock of this machine's first CPU."""
    fields: dict[str, str] = {}
    text = cpuinfo.read_text() if cpuinfo.is_file() else ""
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    ghz, clock = None, "not shown"
    if max_freq.is_file():
        ghz, clock = int(max_freq.read_text()) / 1e6, "cpufreq maximum"
    elif fields.get("cpu MHz"):
        ghz, clock = float(fields["cpu MHz"]) / 1e3, "as /proc/cpuinfo shows it, boost may pass it"
    return CpuId(
        vendor=fields.get("vendor_id", "unknown"),
        family=int(fields.get("cpu family") or -1),
        model=int(fields.get("model") or -1),
        name=fields.get("model name", "unknown CPU"),
        ghz=ghz,
        clock=clock,
    )


if __name__ == "__main__":
    from mahir.hardware import detect
    from mahir.types import CPU

    paper = paper_peaks(detect(gpus=False), CPU)
    print(paper.how or paper.unknown)
    for dtype, flops in paper.flops_per_s.items():
        print(f"  {dtype}: {flops / 1e9:,.1f} G/s")
    if paper.unknown:
        print(f"  {paper.unknown}")
