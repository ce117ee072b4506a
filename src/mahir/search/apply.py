"""`mahir apply`: build an artifact from a recipe, check it, and write an output directory.

The output directory is what serving and later runs open, so it is written whole or not at all:
everything goes into a staging folder beside it, which replaces the old directory in one rename.

    out/
      model/        the artifact's files (model.onnx, or model.xml + model.bin)
      mahir.json    how to open it: format, runtime, settings, input spec, fidelity
      recipe.yaml   the steps that built it and the model they were built from (path and
                    content hash), replayable with `mahir apply`
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mahir.errors import BadInput
from mahir.export.conversions import convert
from mahir.export.onnx import export_program
from mahir.families import refuse_text_options
from mahir.files import staged, unwritable
from mahir.model import Model, default_model_folder
from mahir.outdir import MANIFEST
from mahir.passes import PassContext, apply_steps
from mahir.quality import fidelity, quality_to_dict
from mahir.recipe import ModelSource, Recipe
from mahir.runtimes import get_runtime, open_session, reference_outputs
from mahir.types import Artifact, Quality
from mahir.workload import Batch


@dataclass(frozen=True)
class Applied:
    """The artifact a recipe built, and how close it comes to the original."""

    artifact: Artifact
    recipe: Recipe
    quality: Quality


def apply_recipe(
    model: Model,
    recipe: Recipe,
    workdir: Path,
    *,
    calibration: Sequence[Batch],
    evaluation: Sequence[Batch],
) -> Applied:
    """Run the recipe's steps, convert to what its runtime opens, measure fidelity on
    `evaluation` plus the verification shapes."""
    runtime = get_runtime(recipe.runtime)
    ctx = PassContext(model=model, workdir=workdir, calibration=tuple(calibration))
    artifact = apply_steps(model.original(), recipe.steps, ctx)
    artifact = convert(model, artifact, runtime.formats, workdir / "final" / "input")
    batches = [*evaluation, *model.family.verification_batches()]
    session = open_session(recipe.runtime, artifact, recipe.options)
    quality = fidelity(model, session, batches, reference_outputs(model, batches))
    return Applied(artifact, recipe, quality)


def apply_on_workload(
    model: Model, recipe: Recipe, workdir: Path, *, sentences: Sequence[str] | None = None
) -> Applied:
    """`apply_recipe` on traffic-shaped batches (of `sentences`, or generated text): passes
    calibrate on 8 batches of 8, fidelity is measured on 4 others, drawn apart (other seeds)."""
    refuse_text_options(model.family, model.name, {"--data": bool(sentences)})
    calibration = model.family.workload([8], texts=sentences, batches_per_size=8, seed=1)
    evaluation = model.family.workload([8], texts=sentences, batches_per_size=4, seed=2)
    return apply_recipe(
        model,
        recipe,
        workdir,
        calibration=calibration.batches[8],
        evaluation=evaluation.batches[8],
    )


def replay_source(recipe: Recipe, recipe_path: Path) -> str | None:
    """What to build `recipe` from when no model is given: the source it records, if that is
    still there unchanged; None (the bundled model) for a recipe that records none."""
    source = recipe.source
    if source is None:
        return None
    fix = f"give the model to build from: mahir apply {recipe_path} MODEL"
    hashed = source.hashed()
    if hashed is not None and not hashed.exists():
        raise BadInput(f"{recipe_path} was built from {source.path}, which is gone: {fix}")
    now = ModelSource.of(source.path).sha256
    if now != source.sha256:
        raise BadInput(
            f"{source.path} changed since {recipe_path} was built from it (sha256 "
            f"{(source.sha256 or '')[:12]} then, {(now or '')[:12]} now): to build from it as it "
            f"is, give it: mahir apply {recipe_path} {source.path}"
        )
    bundled = Path(source.path) == default_model_folder().resolve()
    return None if bundled else source.path  # the bundled model keeps its name


def check_output_dir(out: Path) -> None:
    """Refuse, before any work, an `out` that `write_output_dir` could not write: a file, a
    folder that is not a mahir output directory, or a place where no file can be created."""
    if out.exists() and not out.is_dir():
        raise BadInput(f"{out} is a file: give a folder to write the output directory to")
    if out.is_dir() and any(out.iterdir()) and not _is_output_dir(out):
        raise BadInput(
            f"refusing to replace {out}: it is not a mahir output directory; give another folder"
        )
    reason = unwritable(out)
    if reason is not None:
        raise BadInput(f"{reason}: give a folder you can write to")


def write_output_dir(
    model: Model, applied: Applied | None, out: Path, *, extra: Mapping[str, str] = {}
) -> None:
    """Write `out` atomically: a reader sees the old directory or the new one, never a mix.
    `extra` files (name -> text) go beside; with no `applied` artifact only they are written."""
    check_output_dir(out)
    with staged(out, folder=True) as staging:
        if applied is not None:
            _write_artifact(model, applied, staging)
        for name, text in extra.items():
            (staging / name).write_text(text)


def _is_output_dir(folder: Path) -> bool:
    return (folder / MANIFEST).is_file() or (folder / "report.json").is_file()


def _write_artifact(model: Model, applied: Applied, staging: Path) -> None:
    artifact = applied.artifact
    if artifact.format == "torch":  # a live module: saved as a program that needs no code
        (staging / "model").mkdir()
        artifact = export_program(model, artifact, staging / "model" / "model.pt2")
        files = ["model.pt2"]
    else:
        files = _copy_artifact(artifact, staging / "model")
    source = ModelSource.of(model.source)  # so `mahir apply recipe.yaml` replays this model
    dataclasses.replace(applied.recipe, source=source).save(staging / "recipe.yaml")
    manifest: dict[str, Any] = {
        "format": artifact.format,
        "model_file": f"model/{files[0]}",
        "runtime": applied.recipe.runtime,
        "options": applied.recipe.options.to_dict(),
        "recipe_hash": applied.recipe.hash(),
        "source": {"name": model.name, "source": model.source},
        "spec": {
            "inputs": [dataclasses.asdict(t) for t in artifact.spec.inputs],
            "outputs": list(artifact.spec.outputs),
            "max_sequence": artifact.spec.max_sequence,
            "packed": artifact.spec.packed,
        },
        "family": model.family.kind,
        **model.family.save(staging),
        "fidelity": quality_to_dict(applied.quality),
        "steps": list(applied.artifact.meta.get("steps", ())),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")


def _copy_artifact(artifact: Artifact, folder: Path) -> list[str]:
    """Copy the artifact's files into `folder`; their names, main file first."""
    if not artifact.files():
        raise BadInput(f"the artifact at {artifact.path} has no files: build it again")
    folder.mkdir(parents=True)
    for source in artifact.files():
        shutil.copy2(source, folder / source.name)
    return [source.name for source in artifact.files()]
