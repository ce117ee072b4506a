"""`mahir optimize`: the main job. Propose candidates for this machine, search, keep the best.

The order of work: read the machine; gather the run's inputs once (evidence.py: the timing
workload, calibration batches, a check sample, held-out inputs, and the fp32 original's outputs
on all of them); then let the search build, check and time the candidates (halving.py states
its invariant). The result is the winner, every candidate's outcome and why, and the workload
and machine they were measured on; `OptimizeResult.save` writes the output directory. Sits
beside bench and apply, above search; the CLI and `mahir.search.optimize` call it. What it is
asked (`OptimizeConfig`) and what it returns (`OptimizeResult`) have modules of their own.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from mahir.errors import BadInput, first_line
from mahir.evidence import gather
from mahir.flops import model_cost
from mahir.hardware import Machine, detect
from mahir.model import Model, load_model, one_forward
from mahir.passes import PassContext
from mahir.peaks import device_peaks, rate
from mahir.report.schema import RooflineRecord
from mahir.runtimes import get_runtime
from mahir.search.builder import ArtifactBuilder
from mahir.search.candidates import Candidate, Objective, propose
from mahir.search.halving import Events, Outcome, Search
from mahir.search.optimize_config import TIMING_SHARE, OptimizeConfig
from mahir.search.optimize_result import OptimizeResult
from mahir.search.records import OutcomeCache
from mahir.search.rooflines import End, profile_ends
from mahir.types import Artifact
from mahir.workload import Workload


def optimize(
    model: Model | str | os.PathLike[str] | None = None,
    config: OptimizeConfig = OptimizeConfig(),
    workdir: str | os.PathLike[str] | None = None,
    *,
    cache_path: str | os.PathLike[str] | None = None,
    resume: bool = False,
    on_event: Events = lambda _id, _text: None,
) -> OptimizeResult:
    """Search this machine's candidates for `model`; Ctrl-C ends it early with what was found.
    `model` is a loaded model or a source for `load_model` (default: the bundled one). Built
    artifacts go to `workdir` (default: a new temporary folder, left for the caller, since the
    winner lives there until `save`). With `cache_path`, outcomes are recorded there as each
    stage completes (checked, timed; a checked candidate's files kept beside until the run
    completes); `resume` reuses them (records.py says how)."""
    if not isinstance(model, Model):
        model = one_forward(load_model(model), "optimize")
    config.check_model(model)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="mahir-optimize-"))
    started = time.monotonic()
    deadline = None if config.time_budget_s is None else started + config.time_budget_s
    machine = detect()
    machine.require(config.device)
    proposed, skipped = propose(
        model, machine, config.objective, max_drop=config.max_drop, device=config.device
    )
    baseline = proposed[0].id
    on_event(baseline, f"machine: {machine.summary()}")
    proposed = _only(proposed, config.only)  # a typo fails before any work
    peaks = device_peaks(machine, config.device)  # before anything else keeps the device busy
    on_event(baseline, f"measured peak: {peaks.summary()}")
    inputs = gather(model, config)
    workload, evidence = inputs.workload, inputs.evidence
    cost = model_cost(model, workload.batches)
    counted = ", ".join(f"batch {n}: {rate(f)}FLOP" for n, f in cost.flops_per_batch.items())
    on_event(baseline, f"FLOPs per forward: {counted or cost.note}")
    ctx = PassContext(model=model, workdir=workdir, calibration=inputs.calibration, machine=machine)
    builder = ArtifactBuilder(ctx)
    build_deadline = None
    if deadline is not None and config.time_budget_s is not None:
        build_deadline = deadline - TIMING_SHARE * config.time_budget_s
    search = Search(
        model, builder, evidence, config.objective, baseline, deadline, build_deadline, on_event
    )
    key = _run_key(model, machine, workload, config)
    cache = OutcomeCache(Path(cache_path), key, resume=resume) if cache_path else None
    if cache is None:
        searched = search.run(proposed, len(config.sizes))
    else:
        searched = search.run(
            proposed,
            len(config.sizes),
            done=_done(cache, proposed),
            reopen=lambda c: _reopen(cache, builder, c, model, workdir / "resumed"),
            on_checked=lambda o, a: _record_check(cache, o, a, config.objective, on_event),
        )
    outcomes = searched.outcomes + [Outcome(c, "skipped", reason=why) for c, why in skipped]
    if cache is not None:
        for outcome in outcomes:
            if outcome.perf.keys() == set(config.sizes):  # a rung cut short is not a timing
                cache.put(outcome, config.objective)
        if searched.complete:  # every checked candidate was timed: its kept files can go
            cache.drop_artifacts()
    best, artifact = searched.best, None
    rooflines: tuple[list[RooflineRecord], str | None] = ([], None)
    if best is not None:
        artifact = search.artifacts.get(best.candidate.id) or _rebuild(builder, best.candidate)
        first = searched.outcomes[0].candidate  # the baseline is always proposed first
        if config.roofline:
            rooflines = _rooflines(model, config, search, builder, first, best, artifact, workdir)
    return OptimizeResult(
        model,
        machine,
        workload,
        config,
        evidence.budget,
        outcomes,
        best,
        artifact,
        searched.complete,
        elapsed_s=time.monotonic() - started,
        peaks=peaks,
        cost=cost,
        rooflines=rooflines[0],
        roofline_note=rooflines[1],
    )


def cache_path(out: Path) -> Path:
    """Where the outcomes of a run writing `out` are recorded for `--resume`: beside it."""
    return out.with_name(f".{out.name}.cache.jsonl")


def _only(proposed: list[Candidate], only: Sequence[str]) -> list[Candidate]:
    if not only:
        return proposed
    known = {c.id for c in proposed}
    unknown = sorted(set(only) - known)
    if unknown:
        raise BadInput(
            f"unknown candidates {unknown}: on this machine, choose from {sorted(known)}"
        )
    return [c for c in proposed if c is proposed[0] or c.id in only]


def _run_key(model: Model, machine: Machine, workload: Workload, config: OptimizeConfig) -> str:
    """What must match for an earlier run's measurements to count in this one."""
    digest = hashlib.sha256()
    parts = (model.source, machine.summary(), config.objective, config.max_drop, config.metric)
    for part in (*parts, str(config.device)):
        digest.update(repr(part).encode())
    for path in _model_files(model):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    for size, batches in sorted(workload.batches.items()):
        for batch in batches:
            for name in sorted(batch):
                digest.update(f"{size}/{name}".encode() + batch[name].tobytes())
    if config.data is not None:
        digest.update(config.data.read_bytes())
    return str(digest.hexdigest()[:16])


def _model_files(model: Model) -> list[Path]:
    if model.folder is not None:
        return sorted(p for p in model.folder.rglob("*") if p.is_file())
    if model.onnx_path is not None:
        return [model.onnx_path]
    return [Path(model.source.rpartition(":")[0])] if ".py:" in model.source else []


def _done(cache: OutcomeCache, proposed: Sequence[Candidate]) -> dict[str, Outcome]:
    """Earlier outcomes that need no more work (rejected, failed, or ok and timed). The
    baseline's timing comes from the cache only when everything's does: else it is timed anew."""
    cached = {c.id: cache.get(c) for c in proposed}
    done = {cid: o for cid, o in cached.items() if o is not None and _final(o)}
    if len(done) < len(cached):
        done.pop(proposed[0].id, None)
    return done


def _record_check(
    cache: OutcomeCache,
    outcome: Outcome,
    artifact: Artifact | None,
    objective: Objective,
    on_event: Events,
) -> None:
    """Record a checked candidate; one that passed, with its files (kept first, so a record
    never promises files that are not there; without them, a resumed run builds it again)."""
    candidate = outcome.candidate
    if artifact is not None:
        try:
            cache.keep_artifact(candidate, artifact)
        except OSError as err:
            on_event(candidate.id, f"cannot keep its files for --resume ({first_line(err)})")
    cache.put(outcome, objective)


def _final(outcome: Outcome) -> bool:
    """Whether an outcome needs no more work: rejected, failed, or ok and timed."""
    return outcome.status != "ok" or bool(outcome.perf)


def _reopen(
    cache: OutcomeCache, builder: ArtifactBuilder, candidate: Candidate, model: Model, into: Path
) -> tuple[Outcome, Artifact] | None:
    """An earlier run's outcome of `candidate` if it was checked but not timed, with its
    artifact: its kept files copied `into` the work folder, or a live torch module built again
    (it has no files)."""
    earlier = cache.get(candidate)
    if earlier is None or _final(earlier):
        return None
    recipe = candidate.recipe
    if "torch" in get_runtime(recipe.runtime).formats:
        artifact: Artifact | None = _rebuild(builder, candidate)
    else:
        artifact = cache.kept_artifact(candidate, model.spec, into)
    return None if artifact is None else (earlier, artifact)


def _rooflines(
    model: Model,
    config: OptimizeConfig,
    search: Search,
    builder: ArtifactBuilder,
    first: Candidate,
    best: Outcome,
    artifact: Artifact,
    workdir: Path,
) -> tuple[list[RooflineRecord], str | None]:
    """The baseline (`first`) and the winner profiled at the batch size the objective judges."""
    built = search.artifacts.get(first.id)
    ends: list[End] = [("baseline", first, lambda: built or _rebuild(builder, first))]
    if best.candidate.id != first.id:
        ends.append(("winner", best.candidate, lambda: artifact))
    size = min(config.sizes) if config.objective == "latency" else max(config.sizes)
    return profile_ends(ends, model.family, model.name, size, config.device, workdir)


def _rebuild(builder: ArtifactBuilder, candidate: Candidate) -> Artifact:
    """A cached winner's artifact: built again (building is not measuring)."""
    recipe = candidate.recipe
    return builder.build(recipe.steps, get_runtime(recipe.runtime).formats)
