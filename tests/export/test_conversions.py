from __future__ import annotations

from pathlib import Path

import pytest

from mahir.errors import Unsupported
from mahir.export.conversions import Conversion, convert, reachable, route
from mahir.model import Model
from mahir.types import ArtifactFormat


def _formats(source: ArtifactFormat, steps: tuple[Conversion, ...]) -> list[str]:
    return [source, *(step.target for step in steps)]


@pytest.mark.parametrize(
    ("source", "targets", "direct", "expected"),
    [
        ("torch", ("onnx",), False, ["torch", "onnx"]),
        ("torch", ("openvino",), False, ["torch", "onnx", "openvino"]),
        ("torch", ("openvino",), True, ["torch", "openvino"]),
        ("onnx", ("openvino",), False, ["onnx", "openvino"]),
        ("onnx", ("openvino",), True, ["onnx", "openvino"]),
        ("onnx", ("openvino", "onnx"), False, ["onnx"]),  # no conversion when one is needless
        ("torch", ("openvino", "onnx"), False, ["torch", "onnx"]),  # fewest conversions first
        ("torch", ("openvino", "onnx"), True, ["torch", "openvino"]),  # then the preferred
    ],
)
def test_each_route_is_found(
    source: ArtifactFormat, targets: tuple[ArtifactFormat, ...], direct: bool, expected: list[str]
) -> None:
    steps = route(source, targets, direct=direct)
    assert _formats(source, steps) == expected
    assert reachable(source, targets)


def test_the_direct_route_says_how() -> None:
    (step,) = route("torch", ("openvino",), direct=True)
    assert step.how == "torch.export"
    assert step.direct


@pytest.mark.parametrize(
    ("source", "targets"), [("onnx", ("torch",)), ("openvino", ("onnx",)), ("openvino", ("torch",))]
)
def test_an_impossible_route_is_refused_with_the_ways_there_are(
    source: ArtifactFormat, targets: tuple[ArtifactFormat, ...]
) -> None:
    assert not reachable(source, targets)
    with pytest.raises(Unsupported, match=f"cannot make a {targets[0]} artifact from {source}"):
        route(source, targets)
    with pytest.raises(Unsupported, match="torch -> onnx, onnx -> openvino, never back"):
        route(source, targets)


def test_convert_follows_the_route_and_keeps_each_file_under_the_folder(
    mlp: Model, tmp_path: Path
) -> None:
    ir = convert(mlp, mlp.original(), ("openvino",), tmp_path)
    assert ir.format == "openvino"
    assert ir.path == tmp_path / "openvino" / "model.xml"
    assert (tmp_path / "model.onnx").is_file()  # the export on the way, verified and kept
