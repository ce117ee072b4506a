"""Build many recipes' artifacts from one model, sharing the work they have in common.

Recipes overlap: most start from the same ONNX export, many convert it to the same OpenVINO IR,
some share a first step (transformer fusion, then different quantizations). The builder keeps
every artifact it made, keyed by the steps that made it and its format, so each export,
conversion and step runs once per model; a step that raised `Unsupported` raises it again for
every recipe that shares it, without running again. Each step writes into its own numbered
folder under the work directory, so nothing one recipe built is overwritten by another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from mahir.errors import MahirError
from mahir.passes import PassContext, convert, run_pass
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
        made = {fmt: a for (key, fmt), a in self._made.items() if key == steps}
        if "onnx" not in formats and "torch" in made:
            made["onnx"] = self._in_format(steps, ("onnx",))  # later formats start from ONNX
        source = made.get("onnx") or next(iter(made.values()))
        ctx = self._ctx_for(steps)
        artifact = convert(source, formats, dataclasses.replace(ctx, workdir=ctx.workdir / "to"))
        self._made[(steps, artifact.format)] = artifact
        return artifact

    def _ctx_for(self, steps: Steps) -> PassContext:
        """Each chain of steps gets its own folder, numbered in order of first use."""
        if steps not in self._folders:
            name = type(steps[-1]).__name__.lower() if steps else "original"
            self._folders[steps] = f"{len(self._folders):02d}-{name}"
        return dataclasses.replace(self._ctx, workdir=self._ctx.workdir / self._folders[steps])
