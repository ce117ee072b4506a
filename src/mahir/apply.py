"""`mahir apply`: build an artifact from a recipe, check it, and write an output directory.

The output directory is what serving and later runs open, so it is written whole or not at all:
everything goes into a staging folder beside it, which replaces the old directory in one rename.

    out/
      model/        the artifact's files (model.onnx, or model.xml + model.bin)
      mahir.json    how to open it: format, runtime, settings, input spec, fidelity
      recipe.yaml   the steps that built it, replayable with `mahir apply`
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mahir.errors import BadInput, Unsupported
from mahir.export import fidelity, reference_outputs, verification_batches
from mahir.model import Model
from mahir.passes import PassContext, apply_steps, convert
from mahir.recipe import Recipe
from mahir.runtimes import get_runtime, open_session
from mahir.types import Artifact, InputSpec, Quality, RuntimeOptions, Session, TensorSpec
from mahir.workload import Batch

MANIFEST = "mahir.json"


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
    artifact = convert(
        artifact, runtime.formats, dataclasses.replace(ctx, workdir=workdir / "final")
    )
    batches = [*evaluation, *verification_batches(model)]
    session = open_session(recipe.runtime, artifact, recipe.options)
    quality = fidelity(model, session, batches, reference_outputs(model, batches))
    return Applied(artifact, recipe, quality)


def write_output_dir(model: Model, applied: Applied, out: Path) -> None:
    """Write `out` atomically: a reader sees the old directory or the new one, never a mix."""
    artifact = applied.artifact
    if artifact.format == "torch" or artifact.path is None:
        raise Unsupported(
            "a torch module cannot be written as a portable artifact yet: end the recipe with "
            "an ONNX Runtime or OpenVINO runtime"
        )
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise BadInput(f"refusing to replace {out}: it is not a mahir output directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".mahir-staging-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the output is meant to be shared
    try:
        files = _copy_artifact(artifact, staging / "model")
        applied.recipe.save(staging / "recipe.yaml")
        manifest = {
            "format": artifact.format,
            "model_file": f"model/{files[0]}",
            "runtime": applied.recipe.runtime,
            "options": dataclasses.asdict(applied.recipe.options),
            "recipe_hash": applied.recipe.hash(),
            "source": {"name": model.name, "source": model.source},
            "spec": {
                "inputs": [dataclasses.asdict(t) for t in artifact.spec.inputs],
                "outputs": list(artifact.spec.outputs),
            },
            "pooling": None if model.pooling is None else dataclasses.asdict(model.pooling),
            "fidelity": _quality_json(applied.quality),
            "steps": list(artifact.meta.get("steps", ())),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        _replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_output_dir(out: Path) -> Session:
    """Open what `write_output_dir` wrote, on the runtime and settings it names."""
    manifest_path = out / MANIFEST
    if not manifest_path.is_file():
        raise BadInput(f"{out} has no {MANIFEST}: give a directory written by mahir apply")
    try:
        manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        spec = InputSpec(
            inputs=tuple(
                TensorSpec(t["name"], t["dtype"], tuple(t["shape"]))
                for t in manifest["spec"]["inputs"]
            ),
            outputs=tuple(manifest["spec"]["outputs"]),
        )
        artifact = Artifact(manifest["format"], spec, path=out / manifest["model_file"])
        options = RuntimeOptions(**manifest["options"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise BadInput(f"{manifest_path} is damaged ({err}): re-run mahir apply") from err
    return open_session(manifest["runtime"], artifact, options)


def _copy_artifact(artifact: Artifact, folder: Path) -> list[str]:
    """Copy the artifact's files into `folder`; their names, main file first."""
    folder.mkdir(parents=True)
    for source in artifact.files():
        shutil.copy2(source, folder / source.name)
    return [source.name for source in artifact.files()]


def _replace_dir(new: Path, out: Path) -> None:
    """Swap `new` into place at `out`; the old directory is removed only after the swap."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.replace(old)
        new.replace(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.replace(out)


def _quality_json(quality: Quality) -> dict[str, Any]:
    return {
        "embedding": None if quality.embedding is None else dataclasses.asdict(quality.embedding),
        "outputs": {name: dataclasses.asdict(f) for name, f in quality.outputs.items()},
    }
