"""A profile renders itself for people (through a StringIO console) and writes itself for
machines, from a made-up breakdown on a made-up device."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import pytest
from rich.console import Console

from mahir.hardware import Machine
from mahir.paper_peaks import PaperPeaks
from mahir.profile.breakdown import Breakdown, OpTime
from mahir.profile.cost import OpCost
from mahir.profile.result import Profile
from mahir.types import Perf
from tests.profile.test_roofline import PEAKS

MACHINE = Machine("Test CPU", 2, 2, ("avx2",), 8.0)


def matmul(i: int) -> OpTime:
    """10 ms of compute (1 GFLOP at 100 GFLOP/s) done in 12.5 ms."""
    return OpTime(
        f"mm{i}", "MatMul", 0.0125, OpCost(f"mm{i}", "MatMul", "matmul", 1e9, 1e6, "fp32")
    )


def profile(call_s: float, other_load: float = 0.0) -> Profile:
    ops = (
        matmul(1),
        matmul(2),
        OpTime("reshape", "Reshape", 0.001, OpCost("reshape", "Reshape", "view", 0, 0, "fp32")),
        OpTime("custom", "Custom", 0.0005, None),
    )
    latency = Perf(1, (40.0,), 40.0, 41.0, 42.0, 25.0, None, 0.01, False, other_load)
    breakdown = Breakdown(ops, latency, ((0.0265, call_s),) * 10, {"threads": 2})
    paper = PaperPeaks({"fp32": 128e9}, None, "Test: 2 cores", "memory bandwidth: unknown")
    return Profile("tiny", "onnxruntime", MACHINE, {"x": (4, 8)}, PEAKS, paper, breakdown)


def render(found: Profile) -> str:
    out = io.StringIO()
    Console(file=out, width=400, color_system=None).print(found)
    return out.getvalue()


def test_the_tables_the_whole_model_and_the_advice_grouped_by_op() -> None:
    text = render(profile(call_s=0.027))
    assert "tiny on onnxruntime, cpu: x 4x8" in text
    assert "peaks on paper: fp32 128 GFLOP/s (Test: 2 cores); memory bandwidth: unknown" in text
    assert "calls 27 ms, ops 26.5 ms, 98% of each call seen in its ops (medians of 10)" in text
    assert "the roofs allow 20 ms of its 40 ms: 50% of the roofline, compute-bound" in text
    assert "time by op type" in text
    assert "heaviest ops" in text
    assert "1, 2: Compute-bound in fp32: int8 matmuls raise the roof 4.0x" in text
    assert "3: Overhead-bound small op" in text
    assert "note: 1 ops not costed" in text
    assert "the profiler sees" not in text


def test_what_makes_the_numbers_doubtful_is_said() -> None:
    text = render(profile(call_s=0.1, other_load=1.0))
    assert "note: the machine was busy" in text
    assert "note: the profiler sees 26% of a call" in text  # 26.5 of 100 ms
    stalls = profile(call_s=0.05)
    stalls.breakdown = replace(stalls.breakdown, calls=((0.048, 0.05),) * 10)
    assert "yet the ops' median times sum to 26.5 of its 50 ms" in render(stalls)


def test_the_json_holds_every_op_and_the_advice_of_the_heaviest() -> None:
    found = json.loads(json.dumps(profile(call_s=0.027).to_json()))
    assert [op["name"] for op in found["ops"]] == ["mm1", "mm2", "reshape", "custom"]
    assert found["whole"]["roofline_fraction"] == 0.5
    assert found["ops"][0]["bound"] == "compute"
    assert found["ops"][3]["bound"] == "unknown"
    assert found["profiled"]["coverage"] == pytest.approx(0.0265 / 0.027)
    assert found["peaks"]["bandwidth"] == 10e9
    assert found["peaks"]["paper"]["unknown"] == "memory bandwidth: unknown"
    assert [row["op_type"] for row in found["by_type"]] == ["MatMul", "Reshape", "Custom"]
