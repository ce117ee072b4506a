"""Reading an output directory (written by `mahir apply` or `mahir optimize`) back.

What a server or a later run needs is all inside it: the artifact and how to open it
(`mahir.json`), and what the model's family saved beside it: for text models the tokenizer
(`tokenizer/`) and the pooling, since both are part of the model's answer. This room imports
runtimes and the low rooms only, never passes or search, so serving stays free of the optimizer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mahir.errors import BadInput
from mahir.families import Family, open_family
from mahir.files import write_text_atomically
from mahir.runtimes import RUNTIMES, get_runtime, open_session
from mahir.types import Artifact, InputSpec, RuntimeOptions, Session, TensorSpec

MANIFEST = "mahir.json"


@dataclass
class OutputDir:
    """An opened output directory: the session and what surrounds the model."""

    name: str
    session: Session
    spec: InputSpec
    manifest: dict[str, Any]
    family: Family
    """The model's family as recorded: for text models the tokenizer, pooling and limits."""


def read_manifest(out: str | os.PathLike[str]) -> dict[str, Any]:
    """An output directory's `mahir.json`, or one line saying why there is none to read."""
    out = Path(out)
    path = out / MANIFEST
    if not path.is_file():
        raise BadInput(f"{out} has no {MANIFEST}: give a directory written by mahir optimize/apply")
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BadInput(f"{path} is damaged ({err}): write the directory again") from err
    return manifest


def update_manifest(out: Path, changes: Mapping[str, Any]) -> None:
    """Set top-level keys of `mahir.json`, atomically: a reader sees the old file or the new."""
    manifest = {**read_manifest(out), **changes}
    write_text_atomically(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def model_name(manifest: dict[str, Any], out: Path) -> str:
    """The name the output directory's model is served and exported under."""
    return str(manifest.get("source", {}).get("name") or out.name)


def read_artifact(out: Path, manifest: dict[str, Any]) -> Artifact:
    """The artifact the manifest describes, with its input spec."""
    try:
        spec = InputSpec(
            inputs=tuple(
                TensorSpec(t["name"], t["dtype"], tuple(t["shape"]))
                for t in manifest["spec"]["inputs"]
            ),
            outputs=tuple(manifest["spec"]["outputs"]),
            max_sequence=manifest["spec"].get("max_sequence"),
            packed=bool(manifest["spec"].get("packed", False)),
        )
        return Artifact(manifest["format"], spec, path=out / manifest["model_file"])
    except (KeyError, TypeError, ValueError) as err:
        raise BadInput(f"{out / MANIFEST} is damaged ({err}): write the directory again") from err


def open_output_dir(out: Path, *, workers: int = 1) -> OutputDir:
    """Open the artifact on the runtime and settings the manifest names, with its tokenizer.
    `workers`: batches the session will run at once (a server's); a runtime that runs one at a
    time refuses more, in one line."""
    manifest = read_manifest(out)
    artifact = read_artifact(out, manifest)
    try:
        options = RuntimeOptions.from_dict(manifest["options"])
        runtime = manifest["runtime"]
        family = open_family(manifest.get("family"), artifact.spec, out, manifest)
    except (KeyError, TypeError, ValueError, BadInput) as err:
        raise BadInput(f"{out / MANIFEST} is damaged ({err}): write the directory again") from err
    opens = get_runtime(runtime)
    if workers > 1 and not opens.concurrent_on(options.device):
        able = ", ".join(n for n, r in RUNTIMES.items() if r.concurrent_on(options.device))
        raise BadInput(
            f"--workers {workers}: {runtime} runs one batch at a time on {options.device}; serve "
            f"this directory with --workers 1, or write one for {able or 'another device'}"
        )
    if opens.worker_streams:
        options = options.for_workers(workers)
    return OutputDir(
        name=model_name(manifest, out),
        session=open_session(runtime, artifact, options),
        spec=artifact.spec,
        manifest=manifest,
        family=family,
    )


def load_output_dir(out: str | os.PathLike[str]) -> Session:
    """The session of an output directory: the winner, on the runtime it won on."""
    return open_output_dir(Path(out)).session
