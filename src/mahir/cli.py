"""The `mahir` command: parses, calls the API, prints. Nothing else lives here.

Errors mahir raises on purpose become one line on stderr and an exit code (`errors.EXIT_CODES`);
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from mahir.errors import BadInput, MahirError, exit_code

app = typer.Typer(
    help="mahir: make a trained model run faster and cheaper without changing its answers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Tables are wider than the 80 columns rich assumes when output goes to a file or a pipe.
console = Console(width=None if sys.stdout.isatty() else 120)
errors = Console(stderr=True)
T = TypeVar("T")

ModelArg = Annotated[
    str | None,
    typer.Argument(
        help="A Hugging Face model folder, an .onnx file, or path/to/file.py:factory "
        "(default: the bundled all-MiniLM-L6-v2).",
        show_default=False,
    ),
]


@app.callback()
def _options(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    ctx.obj = {"debug": debug}


@app.command()
def bench(
    ctx: typer.Context,
    model: ModelArg = None,
    runtime: Annotated[
        list[str] | None,
        typer.Option("--runtime", "-r", help="Runtime to measure; repeat for several."),
    ] = None,
    batch_size: Annotated[
        list[int] | None, typer.Option("--batch-size", "-b", help="Repeat for several.")
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the results (and the workload) here.")
    ] = None,
    data: Annotated[
        Path | None, typer.Option("--data", help="Sentences, one per line (text models).")
    ] = None,
    tokens: Annotated[
        str | None,
        typer.Option("--tokens", help="Generated sentences' token counts, MIN-MAX (e.g. 64-128)."),
    ] = None,
    seconds: Annotated[
        float, typer.Option("--seconds", help="Timed seconds per runtime and batch size.")
    ] = 2.0,
    threads: Annotated[
        int | None, typer.Option("--threads", help="Threads per runtime (default: cores).")
    ] = None,
    workdir: Annotated[
        Path | None,
        typer.Option("--workdir", help="Keep exported artifacts here (default: a temp folder)."),
    ] = None,
) -> None:
    """Measure the model on each runtime and batch size: latency, throughput, fidelity."""
    from mahir.bench import DEFAULT_RUNTIMES, BenchConfig

    def configure() -> BenchConfig:
        from mahir.measure import MeasureConfig
        from mahir.types import RuntimeOptions
        from mahir.workload import read_sentences

        try:
            return BenchConfig(
                runtimes=tuple(runtime or DEFAULT_RUNTIMES),
                batch_sizes=tuple(batch_size or (1, 32)),
                measure=MeasureConfig(min_time_s=seconds),
                options=RuntimeOptions(threads=threads),
                sentences=tuple(read_sentences(data)) if data else (),
                token_range=parse_range(tokens) if tokens else None,
            )
        except ValueError as err:  # the configs' own checks
            raise BadInput(str(err)) from err

    config = _guard(ctx, configure)
    _guard(ctx, lambda: _run_bench(model, config, json_path, workdir))


def _run_bench(
    source: str | None, config: Any, json_path: Path | None, workdir: Path | None
) -> None:
    from mahir.bench import benchmark
    from mahir.model import load_model

    with _progress() as progress:
        step = progress.add_task("loading the model", total=None)
        timing = progress.add_task("timing", total=1.0, visible=False)
        model = load_model(source)

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


@app.command()
def apply(
    ctx: typer.Context,
    recipe: Annotated[Path, typer.Argument(help="A recipe.yaml (see README: Recipes).")],
    model: ModelArg = None,
    out: Annotated[Path, typer.Option("--out", help="Output directory.")] = Path("mahir-out"),
    data: Annotated[
        Path | None, typer.Option("--data", help="Calibration sentences, one per line.")
    ] = None,
) -> None:
    """Build an artifact from a recipe, check its fidelity, write it to an output directory."""
    _guard(ctx, lambda: _run_apply(recipe, model, out, data))


def _run_apply(recipe_path: Path, source: str | None, out: Path, data: Path | None) -> None:
    from mahir.apply import apply_recipe, write_output_dir
    from mahir.model import load_model
    from mahir.passes import STEP_TYPES
    from mahir.recipe import load_recipe
    from mahir.workload import build_workload, read_sentences

    recipe = load_recipe(recipe_path, STEP_TYPES)
    with _progress() as progress:
        progress.add_task("loading the model", total=None)
        model = load_model(source)
        sentences = read_sentences(data) if data else None
        calibration = build_workload(model, [8], sentences=sentences, batches_per_size=8, seed=1)
        evaluation = build_workload(model, [8], sentences=sentences, batches_per_size=4, seed=2)
        progress.add_task(f"applying {len(recipe.steps)} steps", total=None)
        with tempfile.TemporaryDirectory(prefix="mahir-apply-") as tmp:
            applied = apply_recipe(
                model,
                recipe,
                Path(tmp),
                calibration=calibration.batches[8],
                evaluation=evaluation.batches[8],
            )
            write_output_dir(model, applied, out)
    headline = applied.quality.headline
    what = "sentence embedding" if applied.quality.embedding is not None else "outputs"
    console.print(
        f"wrote {out} ({applied.artifact.format}, runs on {recipe.runtime}); {what} cosine vs "
        f"the original: mean {headline.cosine_mean:.5f}, worst {headline.cosine_min:.5f}",
        soft_wrap=True,
    )


@app.command()
def optimize(
    ctx: typer.Context,
    model: ModelArg = None,
    out: Annotated[Path, typer.Option("--out", help="Output directory.")] = Path("mahir-out"),
    objective: Annotated[
        str, typer.Option("--objective", help="latency (batch-1 p50) or throughput.")
    ] = "latency",
    batch_size: Annotated[
        list[int] | None,
        typer.Option(
            "--batch-size",
            "-b",
            help="Batch sizes timed (default 1; 8 and 32 for throughput). Repeat for several.",
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
        typer.Option("--tokens", help="Generated sentences' token counts, MIN-MAX (e.g. 64-128)."),
    ] = None,
    only: Annotated[
        list[str] | None, typer.Option("--only", help="Try only this candidate; repeat.")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Reuse what an earlier run with --out measured.")
    ] = False,
) -> None:
    """Search techniques x runtimes x settings; keep the fastest within the quality budget."""

    def configure() -> OptimizeConfig:
        from mahir.workload import read_sentences

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
        )

    from mahir.optimize import OptimizeConfig

    config = _guard(ctx, configure)
    _guard(ctx, lambda: _run_optimize(model, config, out, resume))


def _run_optimize(source: str | None, config: Any, out: Path, resume: bool) -> None:
    from mahir.model import load_model
    from mahir.optimize import cache_path, optimize

    def on_event(candidate: str, text: str) -> None:
        errors.print(f"[dim]{candidate:>24}[/dim]  {text}", highlight=False, soft_wrap=True)

    model = load_model(source)
    with tempfile.TemporaryDirectory(prefix="mahir-optimize-") as tmp:
        result = optimize(
            model, config, Path(tmp), cache_path=cache_path(out), resume=resume, on_event=on_event
        )
        written = result.save(out)
    console.print(result)
    for line in _why_lines(result.report()):
        console.print(line, soft_wrap=True, highlight=False)
    console.print(f"report: {written / 'report.html'}", soft_wrap=True)
    if result.best is not None:
        console.print(f"use it: session = mahir.load({str(written)!r})", soft_wrap=True)
    if not result.complete:
        errors.print("the search was cut short: the report holds what was measured")
        raise typer.Exit(130)
    if result.best is None:
        errors.print("no candidate met the quality budget: the report says how close each came")
        raise typer.Exit(1)


@app.command()
def serve(
    ctx: typer.Context,
    source: Annotated[
        str | None,
        typer.Argument(
            help="An output directory of mahir optimize/apply, or any model mahir can load "
            "(served fp32 on ONNX Runtime).",
            show_default=False,
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Interface to bind; other than loopback only if asked.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_batch_size: Annotated[int, typer.Option(help="Items per batch at most.")] = 32,
    max_batch_tokens: Annotated[int, typer.Option(help="Padded tokens per batch at most.")] = 8192,
    max_delay_ms: Annotated[
        float,
        typer.Option(help="Longest wait for a batch to fill (0: run when the worker is free)."),
    ] = 0.0,
    max_padding: Annotated[
        float, typer.Option(help="Padded tokens per real token a batch may add at most.")
    ] = 0.5,
    max_queue: Annotated[int, typer.Option(help="Waiting requests at most; then 503.")] = 1024,
    timeout_ms: Annotated[
        float, typer.Option(help="A request not started by then gets 504.")
    ] = 30_000.0,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body; then 413.")] = 8.0,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="MAHIR_API_KEY", help="Require Authorization: Bearer KEY.", show_default=False
        ),
    ] = None,
) -> None:
    """Serve a model over HTTP (KServe v2, OpenAI-style embeddings) with dynamic batching."""
    from mahir.serve.app import ServeConfig
    from mahir.serve.batcher import BatcherConfig

    def configure() -> ServeConfig:
        try:
            batcher = BatcherConfig(
                max_batch_size=max_batch_size,
                max_batch_tokens=max_batch_tokens,
                max_delay_ms=max_delay_ms,
                max_padding=max_padding,
                max_queue=max_queue,
                timeout_ms=timeout_ms,
            )
        except ValueError as err:
            raise BadInput(str(err)) from err
        return ServeConfig(
            host=host,
            port=port,
            api_key=api_key,
            max_body_bytes=int(max_body_mb * 2**20),
            batcher=batcher,
        )

    config = _guard(ctx, configure)
    _guard(ctx, lambda: _run_serve(source, config))


def _run_serve(source: str | None, config: Any) -> None:
    from mahir.outdir import MANIFEST, open_output_dir
    from mahir.serve.app import run_server

    folder = Path(source) if source else None
    if folder is not None and (folder / MANIFEST).is_file():
        opened = open_output_dir(folder)
    else:
        with tempfile.TemporaryDirectory(prefix="mahir-serve-") as tmp:
            out = Path(tmp) / "out"
            _write_plain(source, out)
            opened = open_output_dir(out)
    errors.print(f"serving {opened.name} on http://{config.host}:{config.port}", highlight=False)
    run_server(opened, config)


def _write_plain(source: str | None, out: Path) -> None:
    """A model that is no output directory yet: its fp32 ONNX export, checked, as one."""
    from mahir.apply import apply_recipe, write_output_dir
    from mahir.model import load_model
    from mahir.recipe import Recipe

    model = load_model(source)
    applied = apply_recipe(
        model, Recipe((), "onnxruntime"), out.parent / "work", calibration=(), evaluation=()
    )
    write_output_dir(model, applied, out)


@app.command()
def loadtest(
    ctx: typer.Context,
    url: Annotated[str, typer.Argument(help="The server, e.g. http://127.0.0.1:8000")],
    concurrency: Annotated[
        int | None, typer.Option(help="Closed loop: clients, each waiting for its answer.")
    ] = None,
    rate: Annotated[
        float | None, typer.Option(help="Open loop: requests per second, whatever happens.")
    ] = None,
    duration: Annotated[float, typer.Option(help="Seconds of load.")] = 10.0,
    requests: Annotated[int | None, typer.Option(help="Stop after this many requests.")] = None,
    endpoint: Annotated[str, typer.Option(help="embeddings (OpenAI) or infer (KServe v2).")] = (
        "embeddings"
    ),
    model: Annotated[str, typer.Option(help="Model name the requests carry.")] = "model",
    sentences: Annotated[int, typer.Option(help="Sentences per request.")] = 1,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the summary here.")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="MAHIR_API_KEY", help="Bearer token.", show_default=False)
    ] = None,
) -> None:
    """Load an inference server and report throughput, p50/p90/p99 and errors by status."""
    from mahir.serve.loadtest import LoadConfig

    config = _guard(
        ctx,
        lambda: LoadConfig(
            url=url,
            concurrency=concurrency,
            rate=rate,
            duration_s=duration,
            max_requests=requests,
            endpoint=endpoint,  # type: ignore[arg-type]
            model=model,
            sentences_per_request=sentences,
            api_key=api_key,
        ),
    )
    _guard(ctx, lambda: _run_loadtest(config, json_path))


def _run_loadtest(config: Any, json_path: Path | None) -> None:
    import asyncio

    from mahir.serve.loadtest import run_load

    with _progress() as progress:
        task = progress.add_task("sending", total=config.duration_s)
        started = time.perf_counter()

        def on_progress(result: Any) -> None:
            done = sum(result.statuses.values())
            progress.update(
                task,
                completed=min(config.duration_s, time.perf_counter() - started),
                description=f"{done} requests, {len(result.latencies_ms)} ok",
            )

        result = asyncio.run(run_load(config, on_progress=on_progress))
    console.print(result)
    if json_path is not None:
        write_json(json_path, result.summary())


def _why_lines(report: dict[str, Any]) -> list[str]:
    from mahir.verdicts import explain

    reasons = explain(report)
    best = report["best"]
    return [f"{'*' if cid == best else '-'} {cid}: {text}" for cid, text in reasons.items()]


def _progress() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=errors,
        transient=True,
    )


def parse_range(text: str) -> tuple[int, int]:
    """'64-128' -> (64, 128)."""
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    if not match:
        raise BadInput(f"--tokens takes MIN-MAX such as 64-128, got {text!r}")
    return int(match[1]), int(match[2])


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def _guard(ctx: typer.Context, fn: Callable[[], T]) -> T:
    """Run `fn`; a MahirError becomes one line and an exit code, unless --debug asked for the
    traceback."""
    try:
        return fn()
    except MahirError as err:
        if ctx.obj and ctx.obj.get("debug"):
            raise
        errors.print(f"[bold red]error:[/] {err}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(exit_code(err)) from None


def main() -> None:
    app(prog_name="mahir")


if __name__ == "__main__":
    main()
