"""Conversion as a recipe step, for when the route to a format changes the speed.

mahir converts between formats by itself (torch -> ONNX -> OpenVINO IR) when a step needs
another one. `OpenVinoDirect` asks for the other route to OpenVINO in the table of
`mahir.export.conversions`: torch.export straight into OpenVINO's converter, which keeps
PyTorch's scaled-dot-product attention as one OpenVINO op that the CPU plugin fuses
(`mahir.export.openvino_direct`). Which route is faster depends on the
model, the lengths and the CPU, so the search tries both and keeps what this machine runs
faster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from mahir.export.conversions import route
from mahir.types import Artifact, ArtifactFormat

if TYPE_CHECKING:
    from mahir.passes import PassContext


@dataclass(frozen=True, slots=True)
class OpenVinoDirect:
    """OpenVINO IR from the torch module through torch.export, verified like every export;
    weights stay fp32. Raises `Unsupported` for a model that torch.export cannot trace."""

    version: int = 1
    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ("torch",)


def openvino_direct(artifact: Artifact, config: OpenVinoDirect, ctx: PassContext) -> Artifact:
    (conversion,) = route(artifact.format, ("openvino",), direct=True)
    converted = conversion.run(ctx.model, artifact, ctx.workdir)
    return converted.derive(converted.path, converted_by=conversion.how)
