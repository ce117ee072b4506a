"""The slots tuner: how many sequences an LLM's engine decodes together, and how many prompt
tokens a step feeds, chosen by measurement under a bound on the p99 time between streamed tokens.

More slots put more rows in each decode step: more output tokens/s for the server, and a longer
wait between each stream's tokens, since a step over many rows takes longer than a step over
one. A joining prompt goes in chunks of at most `step_tokens` beside the decoding rows: a large
chunk fills the machine, and is a long gap for every stream in that step. Which setting is best
depends on the engine, the model and the machine, so each is measured: the output directory's
engine opened with it (`open_llm_output`), the same closed-loop load driven through the real
`Scheduler` (`concurrency` clients, each streaming one generated prompt after another, stop
tokens ignored so every setting does the same work), the clock read at every token. Settings
are timed one after another, each on its own engine (opening an engine per round would cost
more than the drift it cancels), after one untimed request per client. The winner is the most
output tokens/s whose p99 between tokens is within the bound; its `slots` and `step_tokens` go
into `mahir.json`'s options, which `mahir serve` (and each Ray replica) opens the engine with,
and `batching` keeps what was measured.

Knows the scheduler, the generator contract and the output directory; nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from mahir.errors import BadInput
from mahir.families.decoder import Decoder
from mahir.families.prompts import Prompt, generate_prompts
from mahir.generation import Sampling
from mahir.hardware import detect
from mahir.llm_outdir import open_llm_output
from mahir.outdir import read_manifest, update_manifest
from mahir.runtimes.engines import get_engine
from mahir.serve.llm_scheduler import Scheduler, SchedulerConfig
from mahir.types import RuntimeOptions

SLOTS = (1, 2, 4, 8, 16, 32)
"""The counts tried, up to the load's concurrency (more slots than clients never fill)."""
STEP_TOKENS = (256, 32)
"""Prompt tokens a step feeds at most, tried for each count above 1: the engines' default, and
chunks small enough that a step carrying one stays near a decode step's time."""
WARM_TOKENS = 4
"""New tokens of each client's untimed first request."""


@dataclass(frozen=True, slots=True)
class LlmTuneConfig:
    itl_p99_ms: float
    """The bound: a count whose p99 between tokens exceeds it is not chosen."""
    concurrency: int = 32
    """Clients in the closed loop, each streaming one prompt after another."""
    seconds: float = 2.0
    """Timed seconds per slot count."""
    slots: tuple[int, ...] = SLOTS
    step_tokens: tuple[int, ...] = STEP_TOKENS
    prompt_tokens: tuple[int, int] = (32, 256)
    new_tokens: tuple[int, int] = (32, 64)

    def __post_init__(self) -> None:
        if self.itl_p99_ms <= 0:
            raise BadInput(f"--p99-ms must be > 0, got {self.itl_p99_ms}")
        if self.concurrency < 1 or self.seconds <= 0:
            raise BadInput("--tune-concurrency must be >= 1 and --tune-seconds > 0")

    def settings(self) -> list[tuple[int, int | None]]:
        """(slots, step_tokens) pairs tried: one slot once (it runs no batch), each larger
        count with every chunk it can hold (llama.cpp feeds its decode tokens in the chunk)."""
        counts = [n for n in self.slots if n <= self.concurrency] or [self.concurrency]
        single: list[tuple[int, int | None]] = [(1, None)] if 1 in counts else []
        return single + [(n, s) for n in counts if n > 1 for s in self.step_tokens if s >= n]


@dataclass(frozen=True, slots=True)
class SlotTrial:
    slots: int
    step_tokens: int | None
    seconds: float
    tokens: int
    gaps_ms: tuple[float, ...]
    """Between consecutive tokens of one stream, every stream pooled."""
    ttft_ms: tuple[float, ...]
    """From each request's start to its first token (waiting for a slot included)."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def gap(self, q: float) -> float:
        return float(np.percentile(self.gaps_ms, q)) if self.gaps_ms else float("inf")

    def ttft(self, q: float) -> float:
        return float(np.percentile(self.ttft_ms, q)) if self.ttft_ms else float("inf")


@dataclass(frozen=True, slots=True)
class LlmTuneResult:
    config: LlmTuneConfig
    trials: tuple[SlotTrial, ...]
    machine: str

    @property
    def best(self) -> SlotTrial | None:
        """The most output tokens/s among the counts within the bound."""
        within = [t for t in self.trials if t.gap(99) <= self.config.itl_p99_ms]
        return max(within, key=lambda t: t.tokens_per_s, default=None)

    def record(self, tuned_by: str = "serve") -> dict[str, Any]:
        """What `mahir.json` keeps under `batching`; refused in one line when no count meets
        the bound."""
        best = self.best
        if best is None:
            lowest = min(self.trials, key=lambda t: t.gap(99))
            raise BadInput(
                f"no slot count kept p99 between tokens under {self.config.itl_p99_ms:g} ms at "
                f"concurrency {self.config.concurrency} (lowest: {lowest.gap(99):.1f} ms with "
                f"{lowest.slots} slots): raise --p99-ms"
            )
        return {
            "slots": best.slots,
            "step_tokens": best.step_tokens,
            "itl_p99_bound_ms": self.config.itl_p99_ms,
            "concurrency": self.config.concurrency,
            "output_tokens_per_s": round(best.tokens_per_s, 1),
            "itl_p50_ms": round(best.gap(50), 2),
            "itl_p99_ms": round(best.gap(99), 2),
            "ttft_p50_ms": round(best.ttft(50), 1),
            "machine": self.machine,
            "tuned_by": tuned_by,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def __rich__(self) -> Table:
        best = self.best
        table = Table(title=f"slots at concurrency {self.config.concurrency}")
        columns = ("slots", "step tokens", "tok/s", "ITL p50 ms", "ITL p99 ms", "TTFT p50 ms")
        for column in (*columns, "TTFT p99 ms", ""):
            table.add_column(column, justify="right")
        for t in self.trials:
            over = t.gap(99) > self.config.itl_p99_ms
            verdict = "chosen" if t is best else ("ITL p99 over" if over else "")
            table.add_row(
                str(t.slots),
                "" if t.step_tokens is None else str(t.step_tokens),
                f"{t.tokens_per_s:.1f}",
                f"{t.gap(50):.1f}",
                f"{t.gap(99):.1f}",
                f"{t.ttft(50):.0f}",
                f"{t.ttft(99):.0f}",
                verdict,
            )
        table.caption = f"bound: p99 between tokens {self.config.itl_p99_ms:g} ms; {self.machine}"
        return table


def tune_slots(
    out: Path,
    config: LlmTuneConfig,
    *,
    on_trial: Callable[[int, int], None] = lambda done, total: None,
) -> LlmTuneResult:
    """Time every setting on `out`'s engine under the same load (see the module note)."""
    settings = config.settings()
    trials: list[SlotTrial] = []
    prompts: list[Prompt] = []
    for i, (slots, step) in enumerate(settings):
        generator, family = open_llm_output(out, slots=slots, step_tokens=step)
        try:
            prompts = prompts or _prompts(family, generator.context_length, config)
            scheduler = Scheduler(generator, SchedulerConfig(config.concurrency, 3600.0))
            trials.append(asyncio.run(_timed(scheduler, (slots, step), prompts, config)))
        finally:
            generator.close()
        on_trial(i + 1, len(settings))
    return LlmTuneResult(config, tuple(trials), detect(gpus=False).summary())


def tune_and_record(
    out: Path,
    config: LlmTuneConfig,
    *,
    on_trial: Callable[[int, int], None] = lambda done, total: None,
) -> tuple[LlmTuneResult, dict[str, Any]]:
    """Tune and record the choice in `out`'s mahir.json (options' slots and step_tokens, and
    `batching`), in one atomic write. An engine that schedules requests itself is refused
    before any work."""
    manifest = read_manifest(out)
    engine = str(manifest.get("engine"))
    if not get_engine(engine).slotted:
        raise BadInput(
            f"--tune chooses how many slots mahir's continuous batch has; the {engine} engine "
            "schedules requests itself: serve it without --tune"
        )
    recorded = RuntimeOptions.from_dict(manifest.get("options"))
    result = tune_slots(out, config, on_trial=on_trial)
    record = result.record()
    chosen = dataclasses.replace(recorded, slots=record["slots"], step_tokens=record["step_tokens"])
    update_manifest(out, {"options": chosen.to_dict(), "batching": record})
    return result, record


def _prompts(family: Decoder, context: int, config: LlmTuneConfig) -> list[Prompt]:
    """Generated prompts that fit the context with their new tokens."""
    new = (min(config.new_tokens[0], context // 4), min(config.new_tokens[1], context // 4))
    room = context - new[1] - 1
    tokens = (min(config.prompt_tokens[0], room // 2), min(config.prompt_tokens[1], room))
    count = 4 * config.concurrency
    return list(generate_prompts(family, count, prompt_tokens=tokens, new_tokens=new).prompts)


@dataclass
class _Load:
    """What the clients of one count measured."""

    gaps_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    tokens: int = 0


async def _timed(
    scheduler: Scheduler,
    setting: tuple[int, int | None],
    prompts: Sequence[Prompt],
    config: LlmTuneConfig,
) -> SlotTrial:
    """The closed loop: an untimed request per client, then `config.seconds` of requests."""
    clients = range(config.concurrency)
    warm = [Prompt(p.ids, WARM_TOKENS) for p in prompts]
    await asyncio.gather(*(_request(scheduler, warm[c % len(warm)], None) for c in clients))
    load = _Load()
    started = time.perf_counter()
    deadline = started + config.seconds

    async def client(index: int) -> None:
        i = index
        while time.perf_counter() < deadline:
            await _request(scheduler, prompts[i % len(prompts)], load)
            i += config.concurrency

    try:
        await asyncio.gather(*(client(c) for c in clients))
    finally:
        await scheduler.stop()
    elapsed = time.perf_counter() - started
    slots, step = setting
    return SlotTrial(slots, step, elapsed, load.tokens, tuple(load.gaps_ms), tuple(load.ttft_ms))


async def _request(scheduler: Scheduler, prompt: Prompt, load: _Load | None) -> None:
    """One streamed request, its times added to `load` (None: untimed)."""
    sent = time.perf_counter()
    stream = await scheduler.start(prompt.ids, Sampling(max_new_tokens=prompt.max_new_tokens))
    last = sent
    try:
        async for _ in stream:
            now = time.perf_counter()
            if load is not None:
                (load.ttft_ms if last == sent else load.gaps_ms).append((now - last) * 1e3)
                load.tokens += 1
            last = now
    finally:
        stream.cancel()
