"""`mahir bench`, `mahir apply`, `mahir optimize`: the commands that measure and build."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mahir.cli.common import (
    DeviceOption,
    LogitsOption,
    ModelArg,
    console,
    device_here,
    errors,
    guard,
    load_with_logits,
    parse_range,
    progress_bar,
    refuse_unwritable,
    write_json,
)
from mahir.errors import BadInput, refuse_below
from mahir.sources import refuse_missing

if TYPE_CHECKING:
    from mahir.report.schema import Report
    from mahir.search.bench import BenchConfig
    from mahir.search.optimize_config import OptimizeConfig


def bench(
    ctx: typer.Context,
    model: ModelArg = None,
    logits: LogitsOption = None,
    runtime: Annotated[
        list[str] | None,
        typer.Option(
            "--runtime",
            "-r",
            help="Runtime to measure; repeat for several \\[default: torch, onnxruntime, "
            "openvino: those that can run the model]. LLMs: torch, torch-bf16, torch-int8, "
            "torch-compile, torch-compile-bf16, torch-compile-int8.",
        ),
    ] = None,
    batch_size: Annotated[
        list[int] | None,
        typer.Option(
            "--batch-size",
            "-b",
            help="Repeat for several. LLMs: requests at once beyond batch 1 (e.g. -b 8 -b 16).",
        ),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the results (and the workload) here.")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Sentences, one per line (text models); LLMs: prompts, one per line (.txt) or "
            'as {"prompt"|"messages", "max_new_tokens"} objects (.jsonl).',
        ),
    ] = None,
    tokens: Annotated[
        str | None,
        typer.Option(
            "--tokens",
            help="Generated sentences' token counts, MIN-MAX (e.g. 64-128); LLMs: generated "
            "prompts' \\[default: 32-1024].",
        ),
    ] = None,
    seconds: Annotated[
        float | None,
        typer.Option(
            "--seconds",
            help="Timed seconds per runtime and batch size \\[default: 2; LLMs: one pass over "
            "the prompts].",
        ),
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", help="Threads per runtime (default: cores).")
    ] = None,
    device: DeviceOption = "cpu",
    workdir: Annotated[
        Path | None,
        typer.Option("--workdir", help="Keep exported artifacts here (default: a temp folder)."),
    ] = None,
    llm: Annotated[
        bool,
        typer.Option(
            "--llm",
            help="A decoder LLM (default: the bundled SmolLM2-135M-Instruct): time to first "
            "token, decode latency and tokens/s at batch 1, fidelity, per engine. A .gguf file "
            "or a causal-LM folder is one by itself.",
        ),
    ] = False,
    prompts: Annotated[
        str | None,
        typer.Option(
            "--prompts",
            help="LLMs: how many prompts to generate, or a file of them (as --data: .txt lines "
            "or .jsonl objects) \\[default: 8 generated].",
            show_default=False,
        ),
    ] = None,
    new_tokens: Annotated[
        str | None,
        typer.Option(
            "--new-tokens", help="LLMs: new tokens per prompt, MIN-MAX \\[default: 64-256]."
        ),
    ] = None,
) -> None:
    """Measure the model on each runtime and batch size: latency, throughput, fidelity."""
    from mahir.cli.llm import is_llm, run_llm_bench

    guard(ctx, lambda: refuse_unwritable({"--json": json_path}))
    if is_llm(model, llm):
        asked = {"--logits": logits, "--workdir": workdir}
        guard(
            ctx,
            lambda: run_llm_bench(
                model,
                asked,
                runtime or [],
                json_path,
                at_once=[n for n in batch_size or [] if n != 1],
                data=data,
                tokens=tokens,
                new_tokens=new_tokens,
                prompts=prompts,
                seconds=seconds,
                threads=threads,
                device=device,
            ),
        )
        return
    if prompts is not None or new_tokens is not None:
        flag = "--prompts" if prompts is not None else "--new-tokens"
        guard(ctx, lambda: _refuse(f"{flag} is for LLMs: add --llm, or give a .gguf file"))

    def configure() -> BenchConfig:
        refuse_missing(model)
        refuse_below(0, {"--seconds": seconds})
        from mahir.measure import MeasureConfig
        from mahir.search.bench import BenchConfig
        from mahir.types import RuntimeOptions
        from mahir.workload import read_sentences

        try:
            return BenchConfig(
                runtimes=tuple(runtime or ()),
                batch_sizes=tuple(batch_size or (1, 32)),
                measure=MeasureConfig(min_time_s=2.0 if seconds is None else seconds),
                options=RuntimeOptions(threads=threads, device=device_here(device)),
                sentences=tuple(read_sentences(data)) if data else (),
                token_range=parse_range(tokens) if tokens else None,
            )
        except ValueError as err:  # the configs' own checks
            raise BadInput(str(err)) from err

    config = guard(ctx, configure)
    guard(ctx, lambda: _run_bench(model, logits, config, json_path, workdir))


def _refuse(message: str) -> None:
    raise BadInput(message)


def _run_bench(
    source: str | None,
    logits: list[str] | None,
    config: Any,
    json_path: Path | None,
    workdir: Path | None,
) -> None:
    from mahir.search.bench import benchmark

    with progress_bar() as progress:
        step = progress.add_task("loading the model", total=None)
        timing = progress.add_task("timing", total=1.0, visible=False)
        model = load_with_logits(source, logits, "mahir bench")

        def on_step(text: str) -> None:
            progress.update(step, description=text)
            progress.update(timing, visible=text.startswith("timing"), completed=0.0)

        def on_measure(runtime: str, fraction: float) -> None:
            progress.update(timing, description=f"  {runtime}", completed=fraction)

        with tempfile.TemporaryDirectory(prefix="mahir-bench-") as tmp:
            result = benchmark(
                model, config, workdir or Path(tmp), on_step=on_step, on_measure=on_measure
            )
    console.print(result)
    if json_path is not None:
        write_json(json_path, result.to_json())
        result.workload.save(json_path.with_suffix(".workload.npz"))
        workload = json_path.with_suffix(".workload.npz")
        console.print(f"results: {json_path}  workload: {workload}", soft_wrap=True)


def apply(
    ctx: typer.Context,
    recipe: Annotated[Path, typer.Argument(help="A recipe.yaml (see README: Recipes).")],
    model: Annotated[
        str | None,
        typer.Argument(
            help="The model to build (default: the one the recipe records, else the bundled "
            "all-MiniLM-L6-v2).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Output directory.")] = Path("mahir-out"),
    data: Annotated[
        Path | None, typer.Option("--data", help="Calibration sentences, one per line.")
    ] = None,
) -> None:
    """Build an artifact from a recipe, check its fidelity, write it to an output directory."""
    guard(ctx, lambda: _run_apply(recipe, model, out, data))


def _run_apply(recipe_path: Path, source: str | None, out: Path, data: Path | None) -> None:
    from mahir.cli.llm import run_llm_apply
    from mahir.families.decoder import is_decoder_source
    from mahir.model import load_model, one_forward
    from mahir.passes import STEP_TYPES
    from mahir.recipe import load_recipe
    from mahir.runtimes import get_runtime
    from mahir.search.apply import (
        apply_on_workload,
        check_output_dir,
        replay_source,
        write_output_dir,
    )
    from mahir.search.llm_variants import WEIGHT_STEPS
    from mahir.workload import read_sentences

    recipe = load_recipe(recipe_path, {**STEP_TYPES, **WEIGHT_STEPS})
    if source is None:
        source = replay_source(recipe, recipe_path)
    if source is not None and is_decoder_source(Path(source)):
        if data is not None:
            raise BadInput("--data calibrates encoders: leave it out for an LLM recipe")
        run_llm_apply(recipe, source, out)
        return
    llm_only = [name for step in recipe.steps if (name := type(step).__name__) not in STEP_TYPES]
    if llm_only:
        raise BadInput(
            f"{recipe_path}: {', '.join(llm_only)} is a step of an LLM recipe: give the LLM it "
            f"builds from: mahir apply {recipe_path} MODEL"
        )
    get_runtime(recipe.runtime)  # everything checkable is checked before the model loads
    check_output_dir(out)
    sentences = read_sentences(data) if data else None
    with progress_bar() as progress:
        progress.add_task("loading the model", total=None)
        model = one_forward(load_model(source), "mahir apply")
        progress.add_task(f"applying {len(recipe.steps)} steps", total=None)
        with tempfile.TemporaryDirectory(prefix="mahir-apply-") as tmp:
            applied = apply_on_workload(model, recipe, Path(tmp), sentences=sentences)
            write_output_dir(model, applied, out)
    headline = applied.quality.headline
    what = "sentence embedding" if applied.quality.embedding is not None else "outputs"
    console.print(
        f"wrote {out} ({applied.artifact.format}, runs on {recipe.runtime}); {what} cosine vs "
        f"the original: mean {headline.cosine_mean:.5f}, worst {headline.cosine_min:.5f}",
        soft_wrap=True,
    )


def optimize(
    ctx: typer.Context,
    model: ModelArg = None,
    logits: LogitsOption = None,
    out: Annotated[Path, typer.Option("--out", help="Output directory.")] = Path("mahir-out"),
    objective: Annotated[
        str, typer.Option("--objective", help="latency (batch-1 p50) or throughput.")
    ] = "latency",
    batch_size: Annotated[
        list[int] | None,
        typer.Option(
            "--batch-size",
            "-b",
            help="Batch sizes timed (default 1; for throughput 8 and 32 on a CPU, 64 and 256 "
            "on a GPU). Repeat for several. LLMs, with --objective throughput: requests at once "
            "(once).",
        ),
    ] = None,
    time_budget: Annotated[
        float | None, typer.Option("--time-budget", help="Minutes for the whole search.")
    ] = None,
    max_drop: Annotated[
        float, typer.Option("--max-drop", help="Quality budget (README: Quality budget).")
    ] = 0.01,
    metric: Annotated[
        str | None,
        typer.Option(
            "--metric",
            help="module:fn scoring (outputs, data), higher "
            "is better; decides quality instead of fidelity.",
        ),
    ] = None,
    data: Annotated[Path | None, typer.Option("--data", help="The data --metric scores.")] = None,
    sentences: Annotated[
        Path | None, typer.Option("--sentences", help="Traffic-like sentences, one per line.")
    ] = None,
    tokens: Annotated[
        str | None,
        typer.Option(
            "--tokens",
            help="Generated sentences' token counts, MIN-MAX (e.g. 64-128); LLMs: generated "
            "prompts' \\[default: 32-256].",
        ),
    ] = None,
    new_tokens: Annotated[
        str | None,
        typer.Option(
            "--new-tokens", help="LLMs: new tokens per prompt, MIN-MAX \\[default: 32-64]."
        ),
    ] = None,
    only: Annotated[
        list[str] | None, typer.Option("--only", help="Try only this candidate; repeat.")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Reuse what an earlier run with --out measured.")
    ] = False,
    tune_serving: Annotated[
        bool,
        typer.Option(
            "--tune-serving/--no-tune-serving",
            help="Then tune mahir serve's batching for the winner (1 s per setting, ~25 s for "
            "the default model; inside --time-budget) and record it in mahir.json.",
        ),
    ] = True,
    device: DeviceOption = "cpu",
    llm: Annotated[
        bool,
        typer.Option(
            "--llm",
            help="A decoder LLM (default: the bundled SmolLM2-135M-Instruct; a .gguf file or a "
            "causal-LM folder is one by itself): engines x weights x threads, judged against "
            "the fp32 reference, halved on decode ms/token (latency) or tokens/s (throughput); "
            "--out defaults to mahir-llm-out.",
        ),
    ] = False,
    engines: Annotated[
        list[str] | None,
        typer.Option(
            "--engines",
            help="LLMs: a variant to try (torch, torch-bf16, torch-int8, torch-compile, ...); "
            "repeat \\[default: every one this machine runs].",
        ),
    ] = None,
    prompts: Annotated[
        str | None,
        typer.Option(
            "--prompts",
            help="LLMs: prompts to time, one per line (.txt) or as "
            '{"prompt"|"messages", "max_new_tokens"} objects (.jsonl); or how many to generate '
            "\\[default: 4 generated].",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Search techniques x runtimes x settings; keep the fastest within the quality budget."""
    from mahir.cli.llm import is_llm, run_llm_optimize

    if is_llm(model, llm):
        encoder_only = {
            "--logits": logits, "--metric": metric, "--data": data,
            "--sentences": sentences, "--only": only, "--resume": resume,
            "--max-drop": max_drop != 0.01,
        }  # fmt: skip
        llm_out = out if out != Path("mahir-out") else Path("mahir-llm-out")
        guard(
            ctx,
            lambda: run_llm_optimize(
                model,
                encoder_only,
                llm_out,
                objective,
                time_budget,
                engines or [],
                prompts,
                device,
                batch_size or [],
                tokens,
                new_tokens,
            ),
        )
        return
    if engines or prompts is not None or new_tokens is not None:
        flag = "--engines" if engines else "--prompts" if prompts is not None else "--new-tokens"
        guard(ctx, lambda: _refuse(f"{flag} is for LLMs: add --llm, or give a .gguf file"))

    def configure() -> OptimizeConfig:
        """Everything checkable before the model loads: the config's own checks and --out."""
        refuse_missing(model)
        from mahir.search.apply import check_output_dir
        from mahir.search.optimize_config import OptimizeConfig
        from mahir.workload import read_sentences

        check_output_dir(out)
        return OptimizeConfig(
            objective=objective,  # type: ignore[arg-type]  # checked in __post_init__
            batch_sizes=tuple(batch_size or ()),
            max_drop=max_drop,
            time_budget_s=None if time_budget is None else time_budget * 60,
            only=tuple(only or ()),
            sentences=tuple(read_sentences(sentences)) if sentences else (),
            token_range=parse_range(tokens) if tokens else None,
            metric=metric,
            data=data,
            device=device_here(device),
        )

    config = guard(ctx, configure)
    guard(ctx, lambda: _run_optimize(model, logits, config, out, resume, tune_serving))


def _run_optimize(
    source: str | None,
    logits: list[str] | None,
    config: Any,
    out: Path,
    resume: bool,
    tune_serving: bool,
) -> None:
    from mahir.cli.tuning import tune_after_optimize
    from mahir.search.optimize import cache_path, optimize

    def on_event(candidate: str, text: str) -> None:
        errors.print(f"[dim]{candidate:>24}[/dim]  {text}", highlight=False, soft_wrap=True)

    # optimize() refuses what it cannot use at once
    model = load_with_logits(source, logits, "mahir optimize")
    budget = config.time_budget_s
    deadline = None if budget is None else time.monotonic() + budget
    with tempfile.TemporaryDirectory(prefix="mahir-optimize-") as tmp:
        result = optimize(
            model, config, Path(tmp), cache_path=cache_path(out), resume=resume, on_event=on_event
        )
        console.print(result)
        for line in _why_lines(result.report()):
            console.print(line, soft_wrap=True, highlight=False)
        written = result.save(out)  # if this fails, it says where the reports went instead
    console.print(f"report: {written / 'report.html'}", soft_wrap=True)
    if result.best is not None:
        console.print(f"use it: session = mahir.load({str(written)!r})", soft_wrap=True)
    tune_after_optimize(written, result, wanted=tune_serving, deadline=deadline)
    if not result.complete:
        errors.print("the search was cut short: the report holds what was measured")
        raise typer.Exit(130)
    if result.best is None:
        errors.print("no candidate met the quality budget: the report says how close each came")
        raise typer.Exit(1)


def _why_lines(report: Report) -> list[str]:
    from mahir.report.verdicts import explain

    reasons = explain(report)
    best = report.best
    return [f"{'*' if cid == best else '-'} {cid}: {text}" for cid, text in reasons.items()]
