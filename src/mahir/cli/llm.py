"""`mahir bench --llm`: the decoder-LLM side of `mahir bench` (parse, call the API, print)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mahir.cli.common import console, parse_range, progress_bar, write_json
from mahir.errors import BadInput

if TYPE_CHECKING:
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
    given = [flag for flag, value in encoder_only.items() if value and value != [1]]
    if given:
        raise BadInput(f"{' and '.join(given)} are not for LLMs (batch 1 only, for now)")
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
    data: Path | None,
    tokens: str | None,
    new_tokens: str | None,
    prompts: int | None,
    seconds: float | None,
    threads: int | None,
    device: str,
) -> LlmBenchConfig:
    from mahir.families.prompts import NEW_TOKENS, PROMPT_TOKENS
    from mahir.search.llm_bench import LlmBenchConfig
    from mahir.types import Device, RuntimeOptions

    if data is not None and (tokens or prompts):
        raise BadInput("--data gives the prompts: leave out --tokens and --prompts")
    try:
        return LlmBenchConfig(
            variants=tuple(engines),
            prompts=8 if prompts is None else prompts,
            prompt_tokens=parse_range(tokens) if tokens else PROMPT_TOKENS,
            new_tokens=parse_range(new_tokens, "--new-tokens") if new_tokens else NEW_TOKENS,
            prompts_file=data,
            min_time_s=seconds or 0.0,
            options=RuntimeOptions(threads=threads, device=Device.parse(device)),
        )
    except ValueError as err:  # the configs' own checks
        raise BadInput(str(err)) from err
