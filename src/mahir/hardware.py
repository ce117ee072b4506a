"""What this machine is: CPU model, cores, the ISA features that decide which techniques pay
(VNNI and AMX for int8, BF16 and AMX for bf16), memory, and any CUDA GPU.

Never assume a feature: CI and development machines change CPU between runs (AMD Zen 4 without
AMX one day, Intel Xeon with AMX the next). Every recorded number carries `Machine.summary()`.
What the machine can do, measured (matmul peaks per dtype), is `peaks.py`'s.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from mahir.errors import BadInput
from mahir.types import Device

# cpuinfo flag -> the name mahir reports. Order is the order shown to people.
ISA_FLAGS: dict[str, str] = {
    "avx2": "avx2",
    "avx512f": "avx512",
    "avx512_vnni": "avx512_vnni",
    "avx_vnni": "avx_vnni",
    "avx512_bf16": "avx512_bf16",
    "avx512_fp16": "avx512_fp16",
    "amx_tile": "amx",
    "amx_bf16": "amx_bf16",
    "amx_int8": "amx_int8",
}


@dataclass(frozen=True, slots=True)
class Gpu:
    name: str
    compute_capability: tuple[int, int]
    memory_gb: float


@dataclass(frozen=True, slots=True)
class Machine:
    cpu: str
    physical_cores: int
    logical_cores: int
    isa: tuple[str, ...]
    memory_gb: float
    gpus: tuple[Gpu, ...] = field(default=())

    def has(self, feature: str) -> bool:
        return feature in self.isa

    @property
    def int8_dot_product(self) -> bool:
        """True when the CPU multiplies int8 in hardware (VNNI or AMX), so int8 can pay off."""
        return any(self.has(f) for f in ("avx512_vnni", "avx_vnni", "amx_int8"))

    def require(self, device: Device) -> None:
        """Refuse, in one line and before any work, a device this machine does not have."""
        if device.kind == "cuda" and device.index >= len(self.gpus):
            seen = f"{len(self.gpus)} CUDA GPU{'s' * (len(self.gpus) != 1)}"
            raise BadInput(f"no {device} here: this machine has {seen}; use --device cpu")

    def summary(self) -> str:
        isa = ", ".join(self.isa) or "no AVX2"
        gpus = "".join(f"; {g.name} ({g.memory_gb:.0f} GiB)" for g in self.gpus)
        return f"{self.cpu}, {self.physical_cores} cores ({isa}), {self.memory_gb:.0f} GiB{gpus}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_cpuinfo(text: str) -> tuple[str, tuple[str, ...]]:
    """CPU model name and mahir's ISA names from the text of /proc/cpuinfo."""
    model, flags = platform.processor() or "unknown CPU", set[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name":
            model = value.strip()
        elif key == "flags":
            flags = set(value.split())
            break
    return model, tuple(name for flag, name in ISA_FLAGS.items() if flag in flags)


def physical_cores() -> int:
    """Cores this process may use, counting each physical core once."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    physical = psutil.cpu_count(logical=False) or usable or 1
    return max(1, min(physical, usable or physical))


def detect_gpus() -> tuple[Gpu, ...]:
    """CUDA GPUs visible to torch; none when torch has no CUDA build."""
    import torch

    if not torch.cuda.is_available():
        return ()
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append(Gpu(props.name, (props.major, props.minor), props.total_memory / 2**30))
    return tuple(gpus)


def detect(*, cpuinfo: Path = Path("/proc/cpuinfo"), gpus: bool = True) -> Machine:
    """Read this machine's facts. `gpus=False` skips importing torch."""
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    model, isa = parse_cpuinfo(text)
    return Machine(
        cpu=model,
        physical_cores=physical_cores(),
        logical_cores=psutil.cpu_count(logical=True) or 1,
        isa=isa,
        memory_gb=psutil.virtual_memory().total / 2**30,
        gpus=detect_gpus() if gpus else (),
    )


if __name__ == "__main__":
    print(detect().summary())
