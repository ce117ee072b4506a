"""Build many recipes' artifacts from one model, sharing the work they have in common.

Recipes overlap: most start from the same ONNX export, many convert it to the same OpenVINO IR,
some share a first step (transformer fusion, then different quantizations). The builder keeps
every artifact it made, keyed by the steps that made it and its format, so each export,
conversion (routed by `export/conversions.py`) and step runs once per model; a step that raised
`Unsupported` raises it again for every recipe that shares it, without running again. Each
step writes into its own numbered folder under the work directory, so nothing one recipe built
is overwritten by another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from mahir.errors import MahirError
from mahir.export.conversions import route
from mahir.passes import PassContext, run_pass
from mahir.types import Artifact, ArtifactFormat

Steps = tuple[Any, ...]


class ArtifactBuilder:
    def __init__(self, ctx: PassContext) -> None:
        self._ctx = ctx
        self._made: dict[tuple[Steps, ArtifactFormat], Artifact] = {}
        self._failed: dict[Steps, MahirError] = {}
        self._folders: dict[Steps, str] = {}
        original = ctx.model.original()
        self._made[((), original.format)] = original

    def build(self, steps: Sequence[Any], formats: tuple[ArtifactFormat, ...]) -> Artifact:
        """The artifact `steps` make from the model, in the first of `formats` reachable."""
        done: Steps = ()
        for step in steps:
            key = (*done, step)
            if key in self._failed:
                raise self._failed[key]
            if not any(made == key for made, _ in self._made):
                source = self._in_format(done, step.input_formats)
                try:
                    artifact = run_pass(source, step, self._ctx_for(key))
                except MahirError as err:
                    self._failed[key] = err
                    raise
                self._made[(key, artifact.format)] = artifact
            done = key
        return self._in_format(done, formats)

    def _in_format(self, steps: Steps, formats: tuple[ArtifactFormat, ...]) -> Artifact:
        for fmt in formats:  # in the order the consumer prefers
            if (steps, fmt) in self._made:
                return self._made[(steps, fmt)]
        # every conversion starts from what the steps made, so a route's first conversions
        # are those an earlier consumer's route already took (torch -> ONNX for OpenVINO)
        artifact = next(a for (key, _), a in self._made.items() if key == steps)
        folder = self._ctx_for(steps).workdir / "to"
        for conversion in route(artifact.format, formats):
            if (steps, conversion.target) not in self._made:
                made = conversion.run(self._ctx.model, artifact, folder)
                self._made[(steps, conversion.target)] = made
            artifact = self._made[(steps, conversion.target)]
        return artifact

    def _ctx_for(self, steps: Steps) -> PassContext:
        """Each chain of steps gets its own folder, numbered in order of first use."""
        if steps not in self._folders:
            name = type(steps[-1]).__name__.lower() if steps else "original"
            self._folders[steps] = f"{len(self._folders):02d}-{name}"
        return dataclasses.replace(self._ctx, workdir=self._ctx.workdir / self._folders[steps])
