"""`mahir loadtest` against an LLM server: streamed completions in a closed loop, timed per token.

Each of `concurrency` clients sends a streamed `/v1/completions` request and, when its stream
ends, the next. Prompts are generated words of a length drawn uniformly from `prompt_words`, or
lines of a file. Per request it reads the time to first token (TTFT: queueing and prefill), the
gaps between streamed chunks (inter-token latency, ITL), the tokens generated (the usage chunk,
`stream_options.include_usage`) and from them the time per output token after the first (TPOT:
from the first text to the last over the tokens between). A chunk may carry several tokens, and
a busy client reads several chunks at once: ITL's median is then the short gap inside a burst,
while TPOT stays each request's own rate. Goodput counts the requests a user would call good:
TTFT within `ttft_ms` and TPOT within `itl_ms`.
Works against any OpenAI-compatible server (mahir's, vLLM, llama.cpp's). Shares `LoadConfig`'s
url, duration, request cap, model, key and error allowance with the encoder load.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from mahir.errors import BadInput, refuse_below
from mahir.families.text import WORDS
from mahir.serve.loadtest import LoadConfig, LoadResult

MS_COLUMNS = {
    "TTFT p50": "ttft_p50_ms",
    "TTFT p99": "ttft_p99_ms",
    "ITL p50": "itl_p50_ms",
    "ITL p99": "itl_p99_ms",
    "TPOT p50": "tpot_p50_ms",
}
"""The table's columns in milliseconds: heading -> the summary's figure."""


@dataclass(frozen=True, slots=True)
class LlmLoad:
    """What an LLM load adds to `LoadConfig`."""

    max_tokens: int = 64
    prompt_words: tuple[int, int] = (16, 128)
    prompts_file: Path | None = None
    """One prompt per line; drawn in turn instead of generated words."""
    ttft_ms: float = 1000.0
    itl_ms: float = 100.0

    def __post_init__(self) -> None:
        refuse_below(1, {"--max-tokens": self.max_tokens})
        refuse_below(0, {"--ttft-ms": self.ttft_ms, "--itl-ms": self.itl_ms}, above=True)


@dataclass
class LlmLoadResult(LoadResult):
    ttft_ms: list[float] = field(default_factory=list)
    itl_ms: list[float] = field(default_factory=list)
    tpot_ms: list[float] = field(default_factory=list)
    """Each request's time per output token after the first (those of two tokens or more)."""
    output_tokens: int = 0
    good: int = 0
    """Requests within both the TTFT and the time-per-token bounds."""

    def summary(self) -> dict[str, Any]:
        def pct(values: list[float], q: float) -> float:
            return float(np.percentile(values, q)) if values else float("nan")

        elapsed = self.elapsed_s or float("nan")
        return {
            **super().summary(),
            "ttft_p50_ms": pct(self.ttft_ms, 50),
            "ttft_p99_ms": pct(self.ttft_ms, 99),
            "itl_p50_ms": pct(self.itl_ms, 50),
            "itl_p99_ms": pct(self.itl_ms, 99),
            "tpot_p50_ms": pct(self.tpot_ms, 50),
            "tpot_p99_ms": pct(self.tpot_ms, 99),
            "output_tokens_per_s": self.output_tokens / elapsed,
            "goodput": self.good / elapsed,
        }

    def __rich__(self) -> Table:
        s = self.summary()
        table = Table(
            title=f"closed-loop LLM load on {self.config.url}, concurrency {s['concurrency']}"
        )
        for column in ("requests", "ok", *MS_COLUMNS, "tokens/s", "goodput/s", "statuses"):
            table.add_column(column, justify="right")
        table.add_row(
            str(s["requests"]),
            str(s["ok"]),
            *(f"{s[k]:.1f} ms" for k in MS_COLUMNS.values()),
            f"{s['output_tokens_per_s']:.1f}",
            f"{s['goodput']:.2f}",
            ", ".join(f"{k}: {v}" for k, v in sorted(s["statuses"].items())),
        )
        return table


def prompt_source(load: LlmLoad, seed: int) -> Callable[[], str]:
    if load.prompts_file is not None:
        try:
            lines = [x for x in load.prompts_file.read_text().splitlines() if x.strip()]
        except OSError as err:
            raise BadInput(f"cannot read --prompts {load.prompts_file}: {err.strerror}") from err
        if not lines:
            raise BadInput(f"--prompts {load.prompts_file} holds no prompt")
        turn = iter(range(1 << 62))
        return lambda: lines[next(turn) % len(lines)]
    low, high = load.prompt_words
    rng = np.random.default_rng(seed)
    return lambda: " ".join(
        WORDS[i] for i in rng.integers(len(WORDS), size=rng.integers(low, high + 1))
    )


async def run_llm_load(
    config: LoadConfig, load: LlmLoad, *, on_progress: Callable[[LoadResult], None] | None = None
) -> LlmLoadResult:
    """Send the load; never raises on server errors (they are counted)."""
    import asyncio

    import aiohttp

    if config.concurrency is None:
        raise BadInput("an LLM load runs a closed loop: give --concurrency, not --rate")
    result = LlmLoadResult(config)
    prompt = prompt_source(load, config.seed)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    started = time.perf_counter()
    stop_at, sent = started + config.duration_s, 0

    async with aiohttp.ClientSession(
        config.url,
        connector=aiohttp.TCPConnector(limit=config.concurrency),
        timeout=aiohttp.ClientTimeout(total=600),
        headers=headers,
    ) as session:

        async def one() -> None:
            body = {
                "prompt": prompt(),
                "max_tokens": load.max_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
                **({"model": config.model} if config.model else {}),
            }
            begun = time.perf_counter()
            try:
                async with session.post("/v1/completions", json=body) as response:
                    status = str(response.status)
                    times, tokens = (
                        await _read_stream(response.content) if status == "200" else ([], 0)
                    )
            except (aiohttp.ClientError, TimeoutError) as err:
                status, times, tokens = type(err).__name__, [], 0
            result.statuses[status] += 1
            result.output_tokens += tokens
            if status == "200" and times:
                _record(result, load, begun, times, tokens)
            if on_progress is not None:
                on_progress(result)

        async def client() -> None:
            nonlocal sent
            while (config.max_requests is None or sent < config.max_requests) and (
                time.perf_counter() < stop_at
            ):
                sent += 1
                await one()

        await asyncio.gather(*(client() for _ in range(config.concurrency)))
    result.elapsed_s = time.perf_counter() - started
    return result


async def _read_stream(content: Any) -> tuple[list[float], int]:
    """The arrival time of each chunk that carries text, and the tokens the usage chunk counts."""
    times, tokens = [], 0
    async for raw in content:
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = int(chunk["usage"]["completion_tokens"])
        if any(c.get("text") for c in chunk.get("choices", ())):
            times.append(time.perf_counter())
    return times, tokens


def _record(
    result: LlmLoadResult, load: LlmLoad, begun: float, times: Sequence[float], tokens: int
) -> None:
    """One finished request: `times` its text chunks' arrivals, `tokens` what it generated
    (per the usage chunk; 0 where the server sent none, and then each chunk counts as one)."""
    ttft = (times[0] - begun) * 1e3
    result.ttft_ms.append(ttft)
    result.itl_ms += list(np.diff(times) * 1e3)
    result.latencies_ms.append((times[-1] - begun) * 1e3)
    after_first = max(tokens, len(times)) - 1
    per_token = (times[-1] - times[0]) * 1e3 / after_first if after_first else 0.0
    if after_first:
        result.tpot_ms.append(per_token)
    result.good += ttft <= load.ttft_ms and per_token <= load.itl_ms
