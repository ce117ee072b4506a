"""`mahir bench --llm`: the decoder-LLM side of `mahir bench` (parse, call the API, print)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from mahir.cli.common import (
    console,
    device_here,
    errors,
    parse_range,
    progress_bar,
    write_json,
)
from mahir.errors import BadInput

if TYPE_CHECKING:
    from mahir.recipe import Recipe
    from mahir.search.llm_bench import LlmBenchConfig


def is_llm(source: str | None, llm: bool) -> bool:
    """Whether `mahir bench` measures an LLM: asked with --llm, or a decoder source by itself."""
    from mahir.families.decoder import is_decoder_source

    return llm or (source is not None and is_decoder_source(Path(source)))


def run_llm_bench(
    source: str | None,
    encoder_only: dict[str, Any],
    engines: list[str],
    json_path: Path | None,
    **options: Any,
) -> None:
    """Refuse what only encoders take, configure, load the LLM, measure, print."""
    given = [flag for flag, value in encoder_only.items() if value]
    if given:
        raise BadInput(f"{' and '.join(given)} are not for LLMs: leave them out with --llm")
    config = _configure(engines, **options)
    from mahir.model import load_model
    from mahir.search.llm_bench import benchmark_llm

    with progress_bar() as progress:
        step = progress.add_task("loading the model", total=None)
        timing = progress.add_task("timing", total=1.0, visible=False)
        model = load_model(source, llm=True)

        def on_step(text: str) -> None:
            progress.update(step, description=text)
            progress.update(timing, visible=text.startswith("timing"), completed=0.0)

        def on_measure(engine: str, fraction: float) -> None:
            progress.update(timing, description=f"  {engine}", completed=fraction)

        result = benchmark_llm(model, config, on_step=on_step, on_measure=on_measure)
    console.print(result)
    if json_path is not None:
        write_json(json_path, result.to_json())
        console.print(f"results: {json_path}", soft_wrap=True)


def _configure(
    engines: list[str],
    *,
    at_once: list[int],
    data: Path | None,
    tokens: str | None,
    new_tokens: str | None,
    prompts: str | None,
    seconds: float | None,
    threads: int | None,
    device: str,
) -> LlmBenchConfig:
    from mahir.families.prompts import NEW_TOKENS, PROMPT_TOKENS
    from mahir.search.llm_bench import LlmBenchConfig
    from mahir.types import RuntimeOptions

    count, file = _prompt_source(prompts, data)
    if data is not None and (tokens or count is not None):
        raise BadInput("--data gives the prompts: leave out --tokens and --prompts N")
    if file is not None and tokens:
        raise BadInput("--prompts FILE gives the prompts: leave out --tokens")
    _check_file(file, "--data" if data is not None else "--prompts")
    try:
        return LlmBenchConfig(
            variants=tuple(engines),
            prompts=8 if count is None else count,
            prompt_tokens=parse_range(tokens) if tokens else PROMPT_TOKENS,
            new_tokens=parse_range(new_tokens, "--new-tokens") if new_tokens else NEW_TOKENS,
            prompts_file=file,
            min_time_s=seconds or 0.0,
            at_once=tuple(at_once),
            options=RuntimeOptions(threads=threads, device=device_here(device)),
        )
    except ValueError as err:  # the configs' own checks
        raise BadInput(str(err)) from err


def _prompt_source(prompts: str | None, data: Path | None) -> tuple[int | None, Path | None]:
    """--prompts as bench and optimize take it, (count, file): how many prompts to generate, or
    a file of them (which bench's --data may give instead)."""
    if prompts is None or prompts.strip().lstrip("-").isdigit():
        return (None if prompts is None else int(prompts)), data
    if data is not None:
        raise BadInput("--prompts and --data both give a file of prompts: give one")
    return None, Path(prompts)


def _check_file(file: Path | None, flag: str) -> None:
    """Refuse a prompts file that is not there, before the model loads."""
    if file is not None and not file.is_file():
        more = ", or a number of prompts to generate" if flag == "--prompts" else ""
        raise BadInput(f"{flag} {file} is not a file: give a .txt or .jsonl of prompts{more}")


def run_llm_optimize(
    source: str | None,
    encoder_only: dict[str, Any],
    out: Path,
    objective: str,
    time_budget: float | None,
    engines: list[str],
    prompts: str | None,
    device: str,
    at_once: list[int],
    tokens: str | None = None,
    new_tokens: str | None = None,
) -> None:
    """Refuse what only encoders take and an --out that cannot be written, before the model
    loads; search; print the table and why each candidate won or lost; write the directory."""
    given = [flag for flag, value in encoder_only.items() if value]
    if given:
        raise BadInput(f"{' and '.join(given)} are not for LLMs: leave them out with --llm")
    if len(at_once) > 1:
        raise BadInput("an LLM search times one number of requests at once: give -b once")
    count, file = _prompt_source(prompts, None)
    if file is not None and tokens:
        raise BadInput("--prompts FILE gives the prompts: leave out --tokens")
    _check_file(file, "--prompts")
    lengths: dict[str, Any] = {}  # given values only: the config's defaults stand otherwise
    if count is not None:
        lengths["prompts"] = count
    if tokens:
        lengths["prompt_tokens"] = parse_range(tokens)
    if new_tokens:
        lengths["new_tokens"] = parse_range(new_tokens, "--new-tokens")
    from mahir.search.apply import check_output_dir
    from mahir.search.llm_optimize import LlmOptimizeConfig, optimize_llm
    from mahir.search.llm_output import llm_table, save_llm_output, verdicts

    check_output_dir(out)
    config = LlmOptimizeConfig(
        objective=objective,  # type: ignore[arg-type]  # checked in __post_init__
        variants=tuple(engines),
        time_budget_s=None if time_budget is None else time_budget * 60,
        prompts_file=file,
        device=device_here(device),
        concurrency=at_once[0] if at_once else 1,
        **lengths,
    )
    from mahir.model import load_model

    def on_event(candidate: str, text: str) -> None:
        errors.print(f"[dim]{candidate:>24}[/dim]  {text}", highlight=False, soft_wrap=True)

    searched = optimize_llm(load_model(source, llm=True), config, on_event=on_event)
    console.print(llm_table(searched))
    best = None if searched.best is None else searched.best.candidate.id
    for candidate, why in verdicts(searched).items():
        console.print(f"{'*' if candidate == best else '-'} {candidate}: {why}", soft_wrap=True)
    written = save_llm_output(searched, out)
    console.print(f"report: {written / 'report.html'}", soft_wrap=True)
    if best is not None:
        console.print(
            f"use it: generator, family = mahir.llm_outdir.open_llm_output({str(written)!r})",
            soft_wrap=True,
            highlight=False,
        )
    if not searched.complete:
        errors.print("the search was cut short: the report holds what was measured")
        raise typer.Exit(130)
    if best is None:
        errors.print("no candidate met the quality budget: the report says how close each came")
        raise typer.Exit(1)


def run_llm_apply(recipe: Recipe, source: str, out: Path) -> None:
    """Check the recipe and --out before the model loads; rebuild, judge, write, print. Exit 1
    when what it built misses the quality budget (the directory is written all the same, as
    `mahir apply` writes an encoder's)."""
    from mahir.model import load_model
    from mahir.search.apply import check_output_dir
    from mahir.search.llm_apply import apply_llm_recipe, recipe_variant
    from mahir.search.llm_output import save_llm_applied
    from mahir.search.llm_variants import VARIANTS

    variant = recipe_variant(recipe)
    check_output_dir(out)
    with progress_bar() as progress:
        step = progress.add_task("loading the model", total=None)
        model = load_model(source, llm=True)
        applied = apply_llm_recipe(
            model, recipe, on_step=lambda text: progress.update(step, description=text)
        )
        save_llm_applied(applied, model, out)
    q = applied.quality
    console.print(
        f"wrote {out} ({variant}: {VARIANTS[variant].weights_label} weights on "
        f"{recipe.runtime}); against the fp32 reference: top-1 "
        f"{q.top1_agreement:.3f}, KL {q.kl_mean:.4f}, greedy {q.greedy_agreement:.0%}",
        soft_wrap=True,
    )
    if applied.failures:
        errors.print(f"outside the quality budget: {'; '.join(applied.failures)}")
        raise typer.Exit(1)
