"""Profile one batch of a model, or of an output directory's winner, on one runtime.

The order: everything checkable is checked first (the runtime, the device, options that shape
text); the device's peaks are measured (or read from the cache) before the model keeps it
busy; then the model is built for the runtime (exported and verified, as `mahir bench` does),
opened with the runtime's own profiler, profiled, timed, and every op costed and placed on the
roofline (`result.Profile`). The runtime's profiler is the source of truth for time; the graph
it ran, at the batch's shapes, for cost.

Sits in profile/: imports export, runtimes, outdir, peaks and the profile rooms; never passes
or search. LLMs are profiled in `llm.py` (a prefill and a decode step apart).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mahir.errors import BadInput, refuse_below
from mahir.export.conversions import convert, reachable
from mahir.families import Family, open_family, refuse_text_options
from mahir.hardware import Machine, detect
from mahir.model import Model
from mahir.outdir import model_name, read_artifact, read_manifest
from mahir.paper_peaks import PaperPeaks, paper_peaks
from mahir.peaks import Peaks, device_bandwidth, device_peaks
from mahir.profile.breakdown import Breakdown
from mahir.profile.result import Profile
from mahir.runtimes import RUNTIMES, check_runnable, open_session
from mahir.types import CPU, Artifact, Device, Inputs, RuntimeOptions
from mahir.workload import Batch

PROFILED = ("onnxruntime", "openvino", "torch")
"""The runtimes whose own profiler mahir reads."""


@dataclass(frozen=True, slots=True)
class ProfileConfig:
    """What `profile_model` and `profile_output_dir` profile, and how long."""

    runtime: str | None = None
    """One of `PROFILED`; None: an output directory's own runtime, else onnxruntime on a CPU
    (its graph is costed node by node) and torch on a GPU."""
    batch_size: int = 1
    sequence_length: int | None = None
    """Tokens per sentence of a text model (about: generated text ends on a whole word); None:
    a sentence of a length traffic has."""
    device: Device = CPU
    threads: int | None = None
    runs: int = 20
    """Profiled calls; each op's time is its median over them."""
    seconds: float = 1.0
    """Time spent timing the call with the profiler off."""
    top: int = 10
    """Heaviest ops shown, each with its advice."""

    def __post_init__(self) -> None:
        if self.runtime is not None and self.runtime not in PROFILED:
            raise BadInput(
                f"mahir profile reads the profilers of {', '.join(PROFILED)}, not {self.runtime!r}"
            )
        if self.batch_size < 1 or (self.sequence_length is not None and self.sequence_length < 1):
            raise BadInput(
                f"--batch-size and --sequence-length must be >= 1, got {self.batch_size} and "
                f"{self.sequence_length}"
            )
        refuse_below(1, {"--runs": self.runs, "--top": self.top, "--threads": self.threads})
        refuse_below(0, {"--seconds": self.seconds}, above=True)

    def chosen_runtime(self, recorded: str | None = None) -> str:
        if self.runtime is not None:
            return self.runtime
        if recorded is not None:
            return recorded
        return "torch" if self.device.kind == "cuda" else "onnxruntime"


def check_runtime(runtime: str, device: Device, machine: Machine) -> None:
    """Refuse, before any work, a device this machine lacks or a runtime that cannot run there."""
    machine.require(device)
    check_runnable(runtime, device)


def profile_model(model: Model, config: ProfileConfig, workdir: str | os.PathLike[str]) -> Profile:
    """Profile one batch of `model` on the configured runtime, exporting what it needs into
    `workdir`."""
    runtime, machine = config.chosen_runtime(), detect()
    check_runtime(runtime, config.device, machine)
    source = model.original()
    if not reachable(source.format, RUNTIMES[runtime].formats):
        raise BadInput(
            f"{runtime} runs PyTorch modules, and {model.name} is an ONNX file: use --runtime "
            "onnxruntime or openvino"
        )
    batch, padding = one_batch(model.family, model.name, config)
    folder = Path(workdir)
    artifact = convert(model, source, RUNTIMES[runtime].formats, folder / "export")
    options = RuntimeOptions(threads=config.threads, device=config.device)
    return _profile(model.name, runtime, artifact, options, batch, padding, machine, config, folder)


def profile_output_dir(
    out: str | os.PathLike[str], config: ProfileConfig, workdir: str | os.PathLike[str]
) -> Profile:
    """Profile one batch of an output directory's model, on its own runtime and settings
    unless `config` names another runtime that opens its artifact."""
    out = Path(out)
    manifest = read_manifest(out)
    if manifest.get("family") == "decoder":
        raise BadInput(
            f"{out} holds a decoder LLM's winner: profile its source's prefill and decode "
            f"with mahir profile --llm SOURCE, and time the winner with mahir bench --llm"
        )
    artifact = read_artifact(out, manifest)
    recorded = recorded_runtime(manifest)
    runtime = config.chosen_runtime(recorded)
    if artifact.format not in RUNTIMES[runtime].formats:
        raise BadInput(
            f"{out} holds a {artifact.format} artifact, which {runtime} does not run: use "
            f"--runtime {recorded or 'torch'}"
        )
    check_runtime(runtime, config.device, detect())  # before anything is read
    try:
        options = RuntimeOptions.from_dict(manifest.get("options"))
        family = open_family(manifest.get("family"), artifact.spec, out, manifest)
    except (KeyError, TypeError, ValueError) as err:
        raise BadInput(
            f"{out / 'mahir.json'} is damaged ({err}): write the directory again"
        ) from err
    options = replace(options, device=config.device, threads=config.threads or options.threads)
    name = model_name(manifest, out)
    return profile_artifact(name, runtime, artifact, options, family, config, workdir)


def profile_artifact(
    name: str,
    runtime: str,
    artifact: Artifact,
    options: RuntimeOptions,
    family: Family,
    config: ProfileConfig,
    workdir: str | os.PathLike[str],
) -> Profile:
    """Profile one batch of an artifact already built for `runtime` (what `mahir optimize`
    built for its baseline and winner)."""
    machine = detect()
    check_runtime(runtime, options.device, machine)
    batch, padding = one_batch(family, name, config)
    folder = Path(workdir)
    return _profile(name, runtime, artifact, options, batch, padding, machine, config, folder)


def recorded_runtime(manifest: Mapping[str, Any]) -> str | None:
    """The runtime an output directory records, where mahir profile reads its profiler."""
    recorded = manifest.get("runtime")
    return recorded if isinstance(recorded, str) and recorded in PROFILED else None


def recorded_device(manifest: Mapping[str, Any]) -> Device | None:
    """The device an output directory's options record (None where they are unreadable:
    `profile_output_dir` says so)."""
    try:
        return RuntimeOptions.from_dict(manifest.get("options")).device
    except (KeyError, TypeError, ValueError):
        return None


def one_batch(family: Family, name: str, config: ProfileConfig) -> tuple[Batch, float]:
    """The batch profiled, and the share of its tokens that are padding."""
    given = {"--sequence-length": config.sequence_length is not None}
    refuse_text_options(family, name, given)
    length = config.sequence_length
    workload = family.workload(
        [config.batch_size],
        batches_per_size=1,
        token_range=None if length is None else (length, length),
    )
    batch = workload.batches[config.batch_size][0]
    tokens = family.token_lengths(batch)
    sequence = next((batch[n] for n in family.spec.sequence_inputs if n in batch), None)
    if tokens is None or sequence is None or sequence.size == 0:
        return batch, 0.0
    return batch, 1.0 - float(tokens.sum()) / sequence.size


def _profile(
    name: str,
    runtime: str,
    artifact: Artifact,
    options: RuntimeOptions,
    batch: Inputs,
    padding: float,
    machine: Machine,
    config: ProfileConfig,
    folder: Path,
) -> Profile:
    peaks, paper = roofs(machine, options.device)  # before the model keeps the device busy
    breakdown = _breakdown(runtime, artifact, options, batch, config, folder / "profile")
    shapes = {n: tuple(int(d) for d in a.shape) for n, a in batch.items()}
    return Profile(name, runtime, machine, shapes, peaks, paper, breakdown, padding, config.top)


def roofs(machine: Machine, device: Device) -> tuple[Peaks, PaperPeaks]:
    """The device's measured peaks with its memory bandwidth (cached per machine), and its
    paper peaks."""
    peaks = replace(device_peaks(machine, device), bandwidth=device_bandwidth(machine, device))
    return peaks, paper_peaks(machine, device)


def _breakdown(
    runtime: str,
    artifact: Artifact,
    options: RuntimeOptions,
    batch: Inputs,
    config: ProfileConfig,
    folder: Path,
) -> Breakdown:
    """The runtime's own profiler on `batch` (each imports its framework: imported here)."""
    folder.mkdir(parents=True, exist_ok=True)
    runs, seconds = config.runs, config.seconds
    if runtime == "onnxruntime":
        from mahir.profile.onnxruntime import profile_onnxruntime

        return profile_onnxruntime(
            artifact, options, batch, runs=runs, seconds=seconds, folder=folder
        )
    if runtime == "openvino":
        from mahir.profile.openvino import profile_openvino

        return profile_openvino(artifact, options, batch, runs=runs, seconds=seconds)
    from mahir.profile.pytorch import profile_torch

    session = open_session("torch", artifact, options)
    return profile_torch(session, batch, runs=runs, seconds=seconds)
