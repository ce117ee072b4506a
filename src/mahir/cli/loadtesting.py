"""`mahir loadtest`: closed- or open-loop load against a running server (an encoder's or an
LLM's, found by asking it), its latency percentiles, throughput and goodput."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from mahir.cli.common import console, guard, progress_bar, refuse_unwritable, write_json
from mahir.errors import BadInput


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
    model: Annotated[
        str | None,
        typer.Option(
            help="Model name the requests carry (needed for infer; embeddings send none without "
            "it).",
            show_default=False,
        ),
    ] = None,
    sentences: Annotated[int, typer.Option(help="Sentences per request.")] = 1,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the summary here.")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="MAHIR_API_KEY", help="Bearer token.", show_default=False)
    ] = None,
    max_error_rate: Annotated[
        float,
        typer.Option(help="Share of failed requests (not 200) above which the command fails."),
    ] = 0.01,
    llm: Annotated[
        bool,
        typer.Option(
            "--llm",
            help="Streamed /v1/completions (found by itself when /v1/models reports an LLM).",
        ),
    ] = False,
    max_tokens: Annotated[int, typer.Option(help="LLM: tokens asked per request.")] = 64,
    prompt_words: Annotated[
        str, typer.Option(help="LLM: prompt length in words, drawn uniformly from MIN-MAX.")
    ] = "16-128",
    prompts: Annotated[
        Path | None,
        typer.Option(help="LLM: prompts from this file, one a line.", show_default=False),
    ] = None,
    ttft_ms: Annotated[float, typer.Option(help="LLM goodput: time to first token bound.")] = 1000,
    itl_ms: Annotated[float, typer.Option(help="LLM goodput: time per output token bound.")] = 100,
) -> None:
    """Load an inference server and report throughput, p50/p90/p99 and errors by status (an
    LLM's: time to first token, inter-token latency, tokens/s, goodput); exit 1 when more than
    --max-error-rate of the requests failed."""
    from mahir.serve.llm_loadtest import LlmLoad
    from mahir.serve.loadtest import LoadConfig

    guard(ctx, lambda: refuse_unwritable({"--json": json_path}))
    config = guard(
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
            max_error_rate=max_error_rate,
        ),
    )
    load = guard(
        ctx,
        lambda: (
            LlmLoad(max_tokens, _span(prompt_words), prompts, ttft_ms, itl_ms)
            if llm or (endpoint == "embeddings" and _serves_llm(url, api_key))
            else None
        ),
    )
    guard(ctx, lambda: _run_loadtest(config, json_path, load))


def _span(text: str) -> tuple[int, int]:
    """'16-128' -> (16, 128)."""
    try:
        low, high = (int(part) for part in text.split("-"))
    except ValueError:
        raise BadInput(f"--prompt-words takes MIN-MAX, e.g. 16-128, got {text!r}") from None
    if not 1 <= low <= high:
        raise BadInput(f"--prompt-words needs 1 <= MIN <= MAX, got {text!r}")
    return low, high


def _serves_llm(url: str, api_key: str | None) -> bool:
    """Whether /v1/models reports an LLM (a context length, as mahir's and vLLM's do)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        models = httpx.get(f"{url}/v1/models", headers=headers, timeout=10).json()
        return any("max_model_len" in m for m in models.get("data", []))
    except (httpx.HTTPError, ValueError, AttributeError, TypeError):
        return False  # no such endpoint: an encoder server


def _run_loadtest(config: Any, json_path: Path | None, load: Any = None) -> None:
    import asyncio

    from mahir.serve.llm_loadtest import run_llm_load
    from mahir.serve.loadtest import run_load

    with progress_bar() as progress:
        task = progress.add_task("sending", total=config.duration_s)
        started = time.perf_counter()

        def on_progress(result: Any) -> None:
            done = sum(result.statuses.values())
            progress.update(
                task,
                completed=min(config.duration_s, time.perf_counter() - started),
                description=f"{done} requests, {len(result.latencies_ms)} ok",
            )

        if load is None:
            result = asyncio.run(run_load(config, on_progress=on_progress))
        else:
            result = asyncio.run(run_llm_load(config, load, on_progress=on_progress))
    console.print(result)
    if json_path is not None:
        write_json(json_path, result.summary())
    result.check()
