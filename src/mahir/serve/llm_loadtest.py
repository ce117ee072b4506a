"""`mahir loadtest` against an LLM server: streamed completions in a closed loop, timed per token.

Each of `concurrency` clients sends a streamed `/v1/completions` request and, when its stream
ends, the next. Prompts are generated words of a length drawn uniformly from `prompt_words`, or
lines of a file. Per request it reads the time to first token (TTFT: queueing and prefill), the
gaps between streamed chunks (inter-token latency, ITL), and the tokens generated (the usage
chunk, `stream_options.include_usage`). Goodput counts the requests a user would call good:
TTFT within `ttft_ms` and mean time per output token (after the first) within `itl_ms`.
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

from mahir.errors import BadInput
from mahir.families.text import WORDS
from mahir.serve.loadtest import LoadConfig, LoadResult


@dataclass(frozen=True, slots=True)
class LlmLoad:
    """What an LLM load adds to `LoadConfig`."""

    max_tokens: int = 64
    prompt_words: tuple[int, int] = (16, 128)
    prompts_file: Path | None = None
    """One prompt per line; drawn in turn instead of generated words."""
    ttft_ms: float = 1000.0
    itl_ms: float = 100.0


@dataclass
class LlmLoadResult(LoadResult):
    ttft_ms: list[float] = field(default_factory=list)
    itl_ms: list[float] = field(default_factory=list)
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
            "output_tokens_per_s": self.output_tokens / elapsed,
            "goodput": self.good / elapsed,
        }

    def __rich__(self) -> Table:
        s = self.summary()
        table = Table(
            title=f"closed-loop LLM load on {self.config.url}, concurrency {s['concurrency']}"
        )
        columns = ("requests", "ok", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "tokens/s")
        for column in (*columns, "goodput/s", "statuses"):
            table.add_column(column, justify="right")
        table.add_row(
            str(s["requests"]),
            str(s["ok"]),
            *(f"{s[k]:.1f} ms" for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")),
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
                    times = await _read_stream(response.content, result) if status == "200" else []
            except (aiohttp.ClientError, TimeoutError) as err:
                status, times = type(err).__name__, []
            result.statuses[status] += 1
            if status == "200" and times:
                _record(result, load, begun, times)
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


async def _read_stream(content: Any, result: LlmLoadResult) -> list[float]:
    """The arrival time of each chunk that carries text; the usage chunk's tokens are added."""
    times = []
    async for raw in content:
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            result.output_tokens += int(chunk["usage"]["completion_tokens"])
        if any(c.get("text") for c in chunk.get("choices", ())):
            times.append(time.perf_counter())
    return times


def _record(result: LlmLoadResult, load: LlmLoad, begun: float, times: Sequence[float]) -> None:
    ttft = (times[0] - begun) * 1e3
    gaps = list(np.diff(times) * 1e3)
    result.ttft_ms.append(ttft)
    result.itl_ms += gaps
    result.latencies_ms.append((times[-1] - begun) * 1e3)
    per_token = float(np.mean(gaps)) if gaps else 0.0
    result.good += ttft <= load.ttft_ms and per_token <= load.itl_ms
