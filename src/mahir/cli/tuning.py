"""The batching an output directory carries for `mahir serve`: measured by `mahir serve --tune`,
or briefly right after `mahir optimize` wrote its winner, recorded in `mahir.json`, and applied
by `mahir serve` under whatever its command line sets. Optimize and serving meet here, in the
CLI layer, because search never imports serve: the tune runs on the directory `save` wrote.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from mahir.cli.common import console, errors, progress_bar

if TYPE_CHECKING:
    from mahir.outdir import OutputDir
    from mahir.search.optimize import OptimizeResult
    from mahir.serve.batcher import BatcherConfig
    from mahir.serve.tune import TuneConfig

MIN_SECONDS = 0.25
"""Timed seconds per setting below which a tune after optimize is skipped: it would time noise."""


def tune_and_record(
    folder: Path,
    opened: OutputDir,
    base: BatcherConfig,
    tuning: TuneConfig,
    *,
    tuned_by: str = "serve",
) -> dict[str, Any]:
    """Measure the batching, print the table, record the choice in mahir.json; returns it."""
    import asyncio

    from mahir.outdir import update_manifest
    from mahir.serve.tune import tune_batching

    with progress_bar() as progress:
        task = progress.add_task("tuning batching", total=None)

        def on_trial(done: int, total: int) -> None:
            progress.update(task, total=total, completed=done)

        result = asyncio.run(tune_batching(opened, tuning, base=base, on_trial=on_trial))
    console.print(result)
    record = result.record(tuned_by)
    update_manifest(folder, "batching", record)
    return record


def tune_after_optimize(
    out: Path, result: OptimizeResult, *, wanted: bool, deadline: float | None
) -> None:
    """Record a batching choice for the winner with the short tune, in what is left of the time
    budget (`deadline`, on `time.monotonic`), or print why not."""
    from mahir.outdir import open_output_dir
    from mahir.serve.batcher import BatcherConfig
    from mahir.serve.tune import TuneConfig, settings

    best = result.best
    why = skip_reason(has_winner=best is not None, complete=result.complete, wanted=wanted)
    if why is not None or best is None:
        errors.print(f"batching not tuned: {why}", highlight=False, soft_wrap=True)
        return
    smallest = best.perf[min(best.perf)]
    opened = open_output_dir(out)
    short = TuneConfig.short()
    count = len(settings(BatcherConfig(), short, bool(opened.spec.sequence_inputs)))
    left = None if deadline is None else deadline - time.monotonic()
    tuning = fit(short, count, left, item_s=1 / smallest.throughput)
    if tuning is None:
        errors.print(
            f"batching not tuned: the time budget is spent ({max(left or 0, 0):.0f} s left, too "
            f"little for {count} settings): mahir serve {out} --tune --p99-ms MS measures it",
            highlight=False,
            soft_wrap=True,
        )
        return
    try:
        record = tune_and_record(out, opened, BatcherConfig(), tuning, tuned_by="optimize")
    except KeyboardInterrupt:
        errors.print("batching tune interrupted: the winner is written, with default batching")
        raise typer.Exit(130) from None
    console.print(
        f"batching for mahir serve: batch {record['max_batch_size']}, delay "
        f"{record['max_delay_ms']:g} ms, padding {record['max_padding']:g} (recorded in "
        f"{out / 'mahir.json'}; override with mahir serve --max-batch-size N, or --tune --p99-ms "
        "MS for your own bound)",
        highlight=False,
        soft_wrap=True,
    )


def skip_reason(*, has_winner: bool, complete: bool, wanted: bool) -> str | None:
    """Why optimize does not tune the batching, or None when it does."""
    if not has_winner:
        return "no winner to serve"
    if not complete:
        return "the search was cut short"
    if not wanted:
        return "--no-tune-serving (mahir serve DIR --tune --p99-ms MS measures it later)"
    return None


def fit(
    config: TuneConfig, count: int, seconds_left: float | None, *, item_s: float
) -> TuneConfig | None:
    """`config` with its seconds per setting cut so `count` settings fit in `seconds_left`
    (None: no budget), or None when that leaves under MIN_SECONDS a setting. Beyond its timed
    seconds, each setting waits, in every round, for the requests still in flight when time is
    up, and once for warm-up requests: each about a full queue, `concurrency` requests of
    `item_s` seconds (the winner's time per item as optimize measured it)."""
    import dataclasses

    if seconds_left is None:
        return config
    queues = count * (config.rounds + 1) * config.concurrency * item_s
    seconds = min(config.seconds, (seconds_left - queues) / count)
    return None if seconds < MIN_SECONDS else dataclasses.replace(config, seconds=seconds)


def with_batching(config: Any, recorded: dict[str, Any] | None, explicit: set[str]) -> Any:
    """The batcher the tuner recorded, under whatever the command line set explicitly; a
    choice measured on another machine is still used, with a note saying so."""
    import dataclasses

    from mahir.hardware import detect
    from mahir.serve.tune import TUNED

    if not recorded:
        return config
    made_on, here = recorded.get("machine"), detect(gpus=False).summary()
    if made_on and made_on != here:
        by = recorded.get("tuned_by", "serve")
        errors.print(
            f"note: the recorded batching was tuned by mahir {by} on {made_on}, not on this "
            f"{here}: mahir serve DIR --tune --p99-ms MS measures it here",
            highlight=False,
            soft_wrap=True,
        )
    tuned = {name: recorded[name] for name in TUNED if name in recorded and name not in explicit}
    return dataclasses.replace(config, batcher=dataclasses.replace(config.batcher, **tuned))
