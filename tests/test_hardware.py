from __future__ import annotations

from pathlib import Path

from mahir.hardware import detect, parse_cpuinfo

XEON = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16 avx512_fp16 amx_tile amx_bf16 amx_int8
"""
ZEN4 = """processor\t: 0
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16
"""


def test_amx_xeon_is_read_as_such() -> None:
    model, isa = parse_cpuinfo(XEON)
    assert model == "Intel(R) Xeon(R) Platinum 8488C"
    assert {"amx", "amx_bf16", "amx_int8", "avx512_vnni", "avx512_fp16"} <= set(isa)


def test_zen4_has_vnni_and_bf16_but_no_amx() -> None:
    _, isa = parse_cpuinfo(ZEN4)
    assert "avx512_vnni" in isa
    assert "avx512_bf16" in isa
    assert not any(f.startswith("amx") for f in isa)


def test_detect_reads_a_given_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(XEON)
    machine = detect(cpuinfo=cpuinfo, gpus=False)
    assert machine.has("amx_int8")
    assert machine.int8_dot_product
    assert machine.physical_cores >= 1
    assert machine.memory_gb > 0
    assert "Xeon" in machine.summary()


def test_detect_this_machine_agrees_with_proc() -> None:
    machine = detect(gpus=False)
    text = Path("/proc/cpuinfo").read_text()
    assert ("avx512_vnni" in text) == machine.has("avx512_vnni")
    assert ("amx_tile" in text) == machine.has("amx")
    assert 1 <= machine.physical_cores <= machine.logical_cores
