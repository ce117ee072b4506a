"""The one table of format conversions, and the route between two formats.

mahir converts forward only: torch -> ONNX -> OpenVINO IR, or torch -> OpenVINO IR straight
through torch.export. The direct row is taken only when asked for (the `OpenVinoDirect` recipe
step asks), since which way to OpenVINO runs faster depends on the model and the CPU and the
search times both. Each conversion verifies what it made (`export/onnx.py`,
`export/openvino_direct.py`). A pass needing another format, the builder sharing exports between
recipes, `mahir bench` and `mahir apply` all take their routes from here.

Sits in export/, above runtimes; knows nothing of passes or search.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mahir.errors import Unsupported
from mahir.export.onnx import export_onnx, export_openvino
from mahir.export.openvino_direct import export_openvino_direct
from mahir.model import Model
from mahir.types import Artifact, ArtifactFormat


@dataclass(frozen=True, slots=True)
class Conversion:
    """One way from one format to another: what does it, and where it writes."""

    source: ArtifactFormat
    target: ArtifactFormat
    how: str
    function: Callable[[Model, Artifact, Path], Artifact]
    file: str
    """The path it writes, under the folder it is given."""
    direct: bool = False
    """Skips ONNX; taken only when a route asks for it."""

    def run(self, model: Model, source: Artifact, folder: Path) -> Artifact:
        return self.function(model, source, folder / self.file)


def _onnx(model: Model, source: Artifact, path: Path) -> Artifact:
    return export_onnx(model, path, source=source)


CONVERSIONS = (
    Conversion("torch", "onnx", "torch.onnx.export", _onnx, "model.onnx"),
    Conversion("onnx", "openvino", "openvino.convert_model", export_openvino, "openvino/model.xml"),
    Conversion("torch", "openvino", "torch.export", export_openvino_direct, "model.xml", True),
)


def route(
    source: ArtifactFormat, targets: Sequence[ArtifactFormat], *, direct: bool = False
) -> tuple[Conversion, ...]:
    """The fewest conversions from `source` to one of `targets` (among equally short routes,
    to the target listed first); with `direct`, routes that skip ONNX too."""
    usable = tuple(c for c in CONVERSIONS if direct or not c.direct)
    found = [
        path
        for path in _paths(source, usable, seen=(source,))
        if (path[-1].target if path else source) in targets
    ]
    if not found:
        ways = ", ".join(f"{c.source} -> {c.target}" for c in usable)
        raise Unsupported(
            f"cannot make a {' or '.join(targets)} artifact from {source}: mahir converts "
            f"{ways}, never back (in a recipe, torch steps come first)"
        )
    return min(found, key=lambda p: (len(p), targets.index(p[-1].target if p else source)))


def reachable(source: ArtifactFormat, targets: Sequence[ArtifactFormat]) -> bool:
    """Whether some route leads from `source` to one of `targets`."""
    return any(
        (path[-1].target if path else source) in targets
        for path in _paths(source, CONVERSIONS, seen=(source,))
    )


def _paths(
    source: ArtifactFormat, usable: tuple[Conversion, ...], seen: tuple[ArtifactFormat, ...]
) -> Iterator[tuple[Conversion, ...]]:
    """Every route from `source` that visits no format twice, the empty one included."""
    yield ()
    for conversion in usable:
        if conversion.source == source and conversion.target not in seen:
            for rest in _paths(conversion.target, usable, (*seen, conversion.target)):
                yield (conversion, *rest)


def convert(
    model: Model,
    artifact: Artifact,
    targets: Sequence[ArtifactFormat],
    folder: Path,
    *,
    direct: bool = False,
) -> Artifact:
    """`artifact` in one of `targets` (see `route`), each conversion writing under `folder`."""
    for conversion in route(artifact.format, targets, direct=direct):
        artifact = conversion.run(model, artifact, folder)
    return artifact
