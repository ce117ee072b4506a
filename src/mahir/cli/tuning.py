"""The batching an output directory carries, on the terminal: `mahir serve --tune` and the short
tune right after `mahir optimize` wrote its winner (`serve/tuned.py` does the work). Optimize
and serving meet here, in the CLI layer, because search never imports serve: the tune runs on
the directory `save` wrote.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from mahir.cli.common import console, errors, progress_bar
from mahir.errors import BadInput

if TYPE_CHECKING:
    from mahir.outdir import OutputDir
    from mahir.search.optimize_result import OptimizeResult
    from mahir.serve.batcher import BatcherConfig
    from mahir.serve.tune import TuneConfig


def tune_and_record(
    folder: Path,
    opened: OutputDir,
    base: BatcherConfig,
    tuning: TuneConfig,
    *,
    tuned_by: str = "serve",
) -> dict[str, Any]:
    """Measure the batching with a progress bar, print the table, record the choice."""
    from mahir.serve import tuned

    with progress_bar() as progress:
        task = progress.add_task("tuning batching", total=None)

        def on_trial(done: int, total: int) -> None:
            progress.update(task, total=total, completed=done)

        result, record = tuned.tune_and_record(
            folder, opened, base, tuning, tuned_by=tuned_by, on_trial=on_trial
        )
    console.print(result)
    return record


def tune_llm_and_record(folder: Path, tuning: TuneConfig) -> dict[str, Any]:
    """An LLM directory's slots measured under `tuning`'s bound on the p99 between tokens
    (`serve/llm_tune.py`), with a progress bar; the table printed, the choice recorded."""
    from mahir.serve.llm_tune import LlmTuneConfig, tune_and_record

    if tuning.p99_ms is None:
        raise BadInput("--tune needs its bound for an LLM: --p99-ms between tokens")
    config = LlmTuneConfig(tuning.p99_ms, tuning.concurrency, tuning.seconds)
    with progress_bar() as progress:
        task = progress.add_task("tuning slots", total=None)

        def on_trial(done: int, total: int) -> None:
            progress.update(task, total=total, completed=done)

        result, record = tune_and_record(folder, config, on_trial=on_trial)
    console.print(result)
    console.print(
        f"slots for mahir serve: {record['slots']} (recorded in {folder / 'mahir.json'}; "
        "override with mahir serve --slots N)",
        highlight=False,
        soft_wrap=True,
    )
    return record


def tune_after_optimize(
    out: Path, result: OptimizeResult, *, wanted: bool, deadline: float | None
) -> None:
    """Record a batching choice for the winner with the short tune, in what is left of the time
    budget (`deadline`, on `time.monotonic`), or print why not."""
    from mahir.outdir import open_output_dir
    from mahir.serve.batcher import BatcherConfig
    from mahir.serve.tuned import short_tune

    best = result.best
    why = skip_reason(has_winner=best is not None, complete=result.complete, wanted=wanted)
    if why is not None or best is None:
        errors.print(f"batching not tuned: {why}", highlight=False, soft_wrap=True)
        return
    smallest = best.perf[min(best.perf)]
    opened = open_output_dir(out)
    left = None if deadline is None else deadline - time.monotonic()
    tuning, count = short_tune(opened, left, item_s=1 / smallest.throughput)
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


def recorded_batching(config: Any, recorded: dict[str, Any] | None, explicit: set[str]) -> Any:
    """`serve.tuned.with_batching`, its note (a choice tuned on another machine) printed."""
    from mahir.serve.tuned import with_batching

    config, note = with_batching(config, recorded, explicit)
    if note is not None:
        errors.print(f"note: {note}", highlight=False, soft_wrap=True)
    return config
