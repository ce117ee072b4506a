"""The batching an output directory carries: a tune recorded in `mahir.json`, the short tune
fitted into what is left of `mahir optimize`'s budget, and the recorded choice applied by
`mahir serve` under whatever its command line sets. The CLI only parses, calls and prints.

Knows the tuner and the output directory; nothing of HTTP, passes or search.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Set
from pathlib import Path
from typing import Any

from mahir.hardware import detect
from mahir.outdir import OutputDir, open_output_dir, update_manifest
from mahir.runtimes import get_runtime
from mahir.serve.batcher import BatcherConfig
from mahir.serve.tune import TUNED, TuneConfig, TuneResult, settings, tune_batching

MIN_SECONDS = 0.25
"""Timed seconds per setting below which a tune after optimize is skipped: it would time noise."""


def tune_and_record(
    folder: Path,
    opened: OutputDir,
    base: BatcherConfig,
    tuning: TuneConfig,
    *,
    tuned_by: str = "serve",
    on_trial: Callable[[int, int], None] = lambda done, total: None,
) -> tuple[TuneResult, dict[str, Any]]:
    """Measure the batching and record the choice in `folder`'s mahir.json; the measurements
    and the record. More than one worker is tried only where the runtime runs batches at once
    on the session's device; each count on a session opened for it where the runtime opens one
    for a number of workers (OpenVINO's streams), else on `opened`'s."""
    runtime = get_runtime(opened.manifest["runtime"])
    if not runtime.concurrent_on(opened.session.device):
        tuning = dataclasses.replace(tuning, workers=(1,))
    sessions = {
        n: open_output_dir(folder, workers=n).session if runtime.worker_streams else opened.session
        for n in tuning.workers
        if n > 1
    }
    result = asyncio.run(
        tune_batching(opened, tuning, base=base, on_trial=on_trial, sessions=sessions)
    )
    record = result.record(tuned_by)
    update_manifest(folder, {"batching": record})
    return result, record


def short_tune(
    opened: OutputDir, seconds_left: float | None, *, item_s: float
) -> tuple[TuneConfig | None, int]:
    """The short tune optimize runs for its winner, fitted into `seconds_left` (see `fit`), and
    how many settings it tries."""
    short = TuneConfig.short()
    count = len(settings(BatcherConfig(), short, bool(opened.spec.sequence_inputs)))
    return fit(short, count, seconds_left, item_s=item_s), count


def fit(
    config: TuneConfig, count: int, seconds_left: float | None, *, item_s: float
) -> TuneConfig | None:
    """`config` with its seconds per setting cut so `count` settings fit in `seconds_left`
    (None: no budget), or None when that leaves under MIN_SECONDS a setting. Beyond its timed
    seconds, each setting waits, in every round, for the requests still in flight when time is
    up, and once for warm-up requests: each about a full queue, `concurrency` requests of
    `item_s` seconds (the winner's time per item as optimize measured it)."""
    if seconds_left is None:
        return config
    queues = count * (config.rounds + 1) * config.concurrency * item_s
    seconds = min(config.seconds, (seconds_left - queues) / count)
    return None if seconds < MIN_SECONDS else dataclasses.replace(config, seconds=seconds)


def with_batching(
    config: Any, recorded: dict[str, Any] | None, explicit: Set[str]
) -> tuple[Any, str | None]:
    """The serving config with the batcher the tuner recorded, under whatever the command line
    set explicitly (`explicit`: batcher field names); and a note when the choice was measured
    on another machine, where it is still used."""
    if not recorded:
        return config, None
    note = None
    made_on, here = recorded.get("machine"), detect(gpus=False).summary()
    if made_on and made_on != here:
        by = recorded.get("tuned_by", "serve")
        note = (
            f"the recorded batching was tuned by mahir {by} on {made_on}, not on this {here}: "
            "mahir serve DIR --tune --p99-ms MS measures it here"
        )
    tuned = {name: recorded[name] for name in TUNED if name in recorded and name not in explicit}
    return dataclasses.replace(config, batcher=dataclasses.replace(config.batcher, **tuned)), note
