"""The device and the runtime options: parsed, refused in one line, written and read back,
including the flat options that recipes and output directories held before devices."""

from __future__ import annotations

from typing import Any

import pytest

from mahir.errors import BadInput
from mahir.types import CPU, Device, OpenVinoOptions, RuntimeOptions


@pytest.mark.parametrize(
    ("text", "kind", "index", "shown"),
    [
        ("cpu", "cpu", 0, "cpu"),
        ("cuda", "cuda", 0, "cuda:0"),
        ("cuda:0", "cuda", 0, "cuda:0"),
        ("cuda:3", "cuda", 3, "cuda:3"),
        (" CUDA:1 ", "cuda", 1, "cuda:1"),
    ],
)
def test_devices_parse_and_print_back(text: str, kind: str, index: int, shown: str) -> None:
    device = Device.parse(text)
    assert (device.kind, device.index) == (kind, index)
    assert str(device) == shown
    assert Device.parse(str(device)) == device


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:-1", "cuda:x", "cpu:1", "tpu:0", ""])
def test_anything_else_is_refused_in_one_line(text: str) -> None:
    with pytest.raises(BadInput) as caught:
        Device.parse(text)
    message = str(caught.value)
    assert "\n" not in message
    assert f"unknown device {text!r}" in message
    assert '"cuda:N"' in message


def test_a_device_built_by_hand_is_checked_too() -> None:
    with pytest.raises(BadInput, match="no device cpu:2"):
        Device("cpu", 2)
    with pytest.raises(BadInput, match="no device cuda:-1"):
        Device("cuda", -1)


def test_options_round_trip_through_plain_data() -> None:
    options = RuntimeOptions(
        threads=2,
        device=Device.parse("cuda:1"),
        openvino=OpenVinoOptions(hint="throughput", precision=None),
    )
    data = options.to_dict()
    assert data == {
        "threads": 2,
        "device": "cuda:1",
        "openvino": {"hint": "throughput", "precision": None},
    }
    assert RuntimeOptions.from_dict(data) == options
    batched = RuntimeOptions(slots=8, step_tokens=32)
    assert batched.to_dict()["step_tokens"] == 32
    assert RuntimeOptions.from_dict(batched.to_dict()) == batched
    serving = RuntimeOptions(prefix_cache=True)
    assert serving.to_dict()["prefix_cache"] is True
    assert RuntimeOptions.from_dict(serving.to_dict()) == serving


@pytest.mark.parametrize(
    ("old", "expected"),
    [
        (None, RuntimeOptions()),
        ({}, RuntimeOptions()),
        ({"threads": None}, RuntimeOptions()),
        (
            {"threads": 4, "openvino_hint": "throughput", "openvino_precision": None},
            RuntimeOptions(threads=4, openvino=OpenVinoOptions(hint="throughput", precision=None)),
        ),
        (
            {"threads": None, "openvino_hint": "latency", "openvino_precision": "bf16"},
            RuntimeOptions(openvino=OpenVinoOptions(precision="bf16")),
        ),
    ],
)
def test_flat_options_written_before_devices_read_as_the_cpu(
    old: dict[str, Any] | None, expected: RuntimeOptions
) -> None:
    options = RuntimeOptions.from_dict(old)
    assert options == expected
    assert options.device == CPU


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"device": "gpu"}, "unknown device 'gpu'"),
        ({"device": 0}, "unknown device 0"),
        ({"threads": 0}, "threads must be an integer >= 1"),
        ({"threads": "2"}, "threads must be an integer >= 1"),
        ({"slots": 8, "step_tokens": 4}, "step_tokens must be an integer >= slots"),
        ({"speed": 11}, "unknown runtime option 'speed': known are threads, device, openvino"),
        ({"openvino": {"hint": "fast"}}, "the OpenVINO hint is latency or throughput"),
        ({"openvino": {"precision": "fp32"}}, "precision is f32, bf16, f16 or null"),
        ({"openvino": {"cache_dir": "x"}}, "unknown OpenVINO option 'cache_dir'"),
        ({"openvino": {"streams": 0}}, "OpenVINO streams must be an integer >= 1"),
        ({"openvino": "bf16"}, "`openvino:` options are a mapping"),
        ("threads: 2", "runtime options are a mapping"),
        ({"prefix_cache": "yes"}, "prefix_cache is true or false"),
    ],
)
def test_bad_options_are_bad_input(data: Any, message: str) -> None:
    with pytest.raises(BadInput) as caught:
        RuntimeOptions.from_dict(data)
    assert message in str(caught.value)


def test_options_are_keyword_only_and_take_a_parsed_device() -> None:
    with pytest.raises(TypeError):
        RuntimeOptions(2)  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"Device\.parse\('cuda'\)"):
        RuntimeOptions(device="cuda")  # type: ignore[arg-type]
