"""`mahir bench --llm`: one decoder LLM on several engines, measured in one run, at batch 1.

The order of work is the encoder bench's: one prompt workload for every engine; the reference
(PyTorch eager fp32 on the original) answers the held-out inputs once; each engine is opened
(the memory it adds, its compile time), judged against the reference (`generation_quality`),
then timed interleaved (`llm_timing.py`: every engine in turn on each prompt, the clock read at
each streamed token, stop tokens ignored as vLLM's benchmarks do with ignore_eos): time to first
token is the prefill plus the first choice, decode latency each generation's time per token
after the first; `-b N` adds N requests at once. Output tokens/s is tokens over the
wall time of whole generations, prefill included; "GB/s" is the weights read once per decoded
token, the number that bounds batch-1 decoding (gpt-fast's "bandwidth achieved").

A row is a variant (`llm_variants.py`: an engine and how its weights are made); each engine is
closed when the run ends.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.table import Table

from mahir.errors import BadInput, Unsupported, refuse_below
from mahir.families.decoder import LanguageModel
from mahir.families.prompts import (
    NEW_TOKENS,
    PROMPT_TOKENS,
    Prompt,
    PromptWorkload,
    check_range,
    generate_prompts,
    read_prompts,
)
from mahir.generation import Generator
from mahir.generation_quality import (
    GenerationBudget,
    GenerationQuality,
    Judging,
    held_out_answers,
    judge,
)
from mahir.hardware import Machine, detect
from mahir.measure import BUSY_CORES, MachineLoad, memory_added, own_seconds
from mahir.runtimes.engines import REFERENCE_ENGINE, get_engine, open_engine
from mahir.search.llm_timing import AtOnce, generate_timed, time_at_once, time_interleaved
from mahir.search.llm_variants import DEFAULT_VARIANTS, VARIANTS, cannot_run, variant_artifact
from mahir.types import Artifact, RuntimeOptions, module_mb


@dataclass(frozen=True, slots=True)
class LlmBenchConfig:
    """What `benchmark_llm` measures, on which prompts."""

    variants: tuple[str, ...] = ()
    """Names from `VARIANTS`; empty: `DEFAULT_VARIANTS` that this machine can run."""
    prompts: int = 8
    prompt_tokens: tuple[int, int] = PROMPT_TOKENS
    new_tokens: tuple[int, int] = NEW_TOKENS
    prompts_file: Path | None = None
    """The user's prompts (.txt lines or .jsonl); generated ones when None."""
    min_time_s: float = 0.0
    """Prompts are cycled until each variant has generated this long (one pass at least)."""
    at_once: tuple[int, ...] = ()
    """Requests in flight together, beyond batch 1: output tokens/s with that many prompts at
    once, each engine serving them its way (`_serving`, `llm_timing.time_at_once`)."""
    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    judging: Judging = field(default_factory=Judging)
    budget: GenerationBudget = field(default_factory=GenerationBudget)
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [name for name in self.variants if name not in VARIANTS]
        if unknown:
            raise BadInput(f"unknown LLM engine {unknown[0]!r}: choose from {', '.join(VARIANTS)}")
        check_range("--tokens", self.prompt_tokens)
        check_range("--new-tokens", self.new_tokens)
        refuse_below(1, {"--prompts": self.prompts})
        refuse_below(0, {"--seconds": self.min_time_s})
        if any(n < 2 for n in self.at_once):
            raise BadInput(
                f"requests at once must be >= 2 (batch 1 is always timed), got {self.at_once}"
            )


@dataclass(frozen=True, slots=True)
class LlmBenchRow:
    """One variant: its timings at batch 1, its fidelity, and what it ran with."""

    name: str
    ttft_ms: tuple[float, ...]
    """One per generation: prefill plus the first token."""
    decode_ms: tuple[float, ...]
    """One per generation: its time from the first token to the last over the tokens after the
    first (`llm_timing.py` says why not the gaps between tokens)."""
    tokens: int
    seconds: float
    """Wall time of the timed generations, prefills included."""
    quality: GenerationQuality
    failures: tuple[str, ...]
    """How the variant misses the budget; empty when it is met."""
    settings: dict[str, Any]
    memory_mb: float
    size_mb: float
    open_s: float
    at_once: dict[int, AtOnce] = field(default_factory=dict)
    """Output tokens/s with several requests in flight, by their number."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def ms(self, which: str, percentile: float) -> float:
        values = self.ttft_ms if which == "ttft" else self.decode_ms
        return float(np.percentile(values, percentile)) if values else float("nan")

    @property
    def bandwidth_gb_s(self) -> float:
        """Weight bytes read per decoded token over the median decode latency."""
        return self.size_mb * 2**20 / 1e9 / (self.ms("decode", 50) / 1e3)

    def to_json(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "ttft_ms": {"p50": self.ms("ttft", 50), "p90": self.ms("ttft", 90)},
            "decode_ms": {"p50": self.ms("decode", 50), "p90": self.ms("decode", 90)},
            "decode_tokens_per_s": 1e3 / self.ms("decode", 50),
            "output_tokens_per_s": self.tokens_per_s,
            "tokens": self.tokens,
            "generations": len(self.ttft_ms),
            "bandwidth_gb_s": self.bandwidth_gb_s,
            "memory_mb": self.memory_mb,
            "size_mb": self.size_mb,
            "open_s": self.open_s,
            "at_once": {str(n): run.to_json() for n, run in self.at_once.items()},
            "settings": self.settings,
            "quality": self.quality.to_dict(),
            "within_budget": not self.failures,
            "budget_failures": list(self.failures),
        }


@dataclass
class LlmBenchResult:
    """Every row of one run, with the machine, model and prompts that produced them."""

    machine: Machine
    model: LanguageModel
    workload: PromptWorkload
    rows: list[LlmBenchRow]
    budget: GenerationBudget
    other_load: float
    """Cores other processes kept busy while timing (`measure.MachineLoad`)."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Default variants this machine cannot run, with the reason."""
    date: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat())

    def speedup(self, row: LlmBenchRow) -> float | None:
        """The reference's median decode latency over this row's."""
        base = next((r for r in self.rows if r.name == REFERENCE_ENGINE), None)
        return None if base is None else base.ms("decode", 50) / row.ms("decode", 50)

    def to_json(self) -> dict[str, Any]:
        return {
            "date": self.date,
            "machine": self.machine.to_dict(),
            "model": self.model.summary(),
            "workload": self.workload.describe(),
            "batch_size": 1,
            "budget": {"min_top1": self.budget.min_top1, "max_kl": self.budget.max_kl},
            "machine_load": {"other_cores": self.other_load, "busy": self._busy},
            "skipped": self.skipped,
            "results": [{**r.to_json(), "speedup": self.speedup(r)} for r in self.rows],
        }

    @property
    def _levels(self) -> list[int]:
        """The numbers of requests at once any row was timed with."""
        return sorted({n for row in self.rows for n in row.at_once})

    @property
    def _busy(self) -> bool:
        return self.other_load > BUSY_CORES

    def __rich__(self) -> Table:
        table = Table(  # no vertical rules: fifteen columns fit 120 characters
            title=f"{self.model.name} on {self.machine.summary()}, batch 1",
            caption=self._caption(),
            box=box.SIMPLE_HEAD,
            padding=(0, 1, 0, 0),
            pad_edge=False,
        )
        table.add_column("engine", no_wrap=True)
        columns = (
            "TTFT", "ms/tok", "p90", "tok/s", "speedup", "GB/s", "MB", "mem", "top-1", "KL",
            "ppl", "greedy", "budget",
        )  # fmt: skip
        levels = self._levels
        for column in (*columns[:4], *(f"tok/s@{n}" for n in levels), *columns[4:]):
            table.add_column(column, justify="right", no_wrap=True)
        for row in self.rows:
            quality, speedup = row.quality, self.speedup(row)
            table.add_row(
                row.name,
                f"{row.ms('ttft', 50):.0f}",
                f"{row.ms('decode', 50):.1f}",
                f"{row.ms('decode', 90):.1f}",
                f"{row.tokens_per_s:.1f}",
                *(_at_once_cell(row.at_once.get(n)) for n in levels),
                "" if speedup is None else f"{speedup:.2f}x",
                f"{row.bandwidth_gb_s:.2g}",
                f"{row.size_mb:.0f}",
                f"{row.memory_mb:.0f}",
                f"{quality.top1_agreement:.3f}",
                f"{quality.kl_mean:.4f}",
                f"{quality.perplexity:.4g}",
                f"{quality.greedy_agreement:.0%}",
                "ok" if not row.failures else "[red]miss[/red]",
            )
        return table

    def _caption(self) -> str:
        described = self.workload.describe()
        prompt, new = described["prompt_tokens"], described["new_tokens"]
        quality = self.rows[0].quality if self.rows else None
        lines = [
            f"{described['prompts']} prompts ({described['origin']}) of {prompt['min']}-"
            f"{prompt['max']} tokens (median {prompt['median']:.0f}), {new['min']}-{new['max']} "
            "new tokens each, greedy, stop tokens ignored while timed",
            "TTFT: p50 ms to the first token; ms/tok, p90: decode ms per token, by generation; "
            "tok/s: output tokens over whole generations; speedup: decode p50 vs "
            f"{REFERENCE_ENGINE}; GB/s: weights read per decoded token; MB: weights",
        ]
        if quality is not None:
            lines.append(
                f"top-1, KL (nats), ppl: teacher-forced on {quality.positions} held-out tokens vs "
                f"the fp32 reference (its ppl {quality.reference_perplexity:.2f}); greedy: share "
                f"of {quality.greedy_tokens}-token continuations agreeing before the first "
                f"divergence; budget: top-1 >= {self.budget.min_top1}, KL <= "
                f"{self.budget.max_kl}"
            )
        if self._levels:
            lines.append(
                "tok/s@N: output tokens/s with N requests at once, as each engine serves them: "
                "a continuous batch, mahir's of N slots (PyTorch eager, llama.cpp) or the "
                "engine's own (vLLM, OpenVINO GenAI paged); one padded batch (compiled PyTorch, "
                "OpenVINO GenAI stateful); or one after another (marked 1x1)"
            )
        lines.append(
            "mem: MB of resident memory added when opened and run (with an engine's worker "
            "process, vLLM's); torch runs the reference's own weights, so its figure leaves "
            "them out"
        )
        lines += [f"{name}: left out, {why}" for name, why in self.skipped.items()]
        if self._busy:
            lines.append(
                f"[bold red]the machine was busy: other processes kept {self.other_load:.2f} "
                "cores busy while timing; PyTorch's threads stall first[/bold red]"
            )
        return "\n".join(lines)


def _at_once_cell(run: AtOnce | None) -> str:
    if run is None:
        return ""
    return f"{run.tokens_per_s:.0f}" + (" 1x1" if run.how == "queue" else "")


def prompt_workload(model: LanguageModel, config: LlmBenchConfig) -> PromptWorkload:
    if config.prompts_file is not None:
        return read_prompts(
            model.family, config.prompts_file, new_tokens=config.new_tokens, seed=config.seed
        )
    return generate_prompts(
        model.family,
        config.prompts,
        prompt_tokens=config.prompt_tokens,
        new_tokens=config.new_tokens,
        seed=config.seed,
    )


def benchmark_llm(
    model: LanguageModel,
    config: LlmBenchConfig,
    *,
    on_step: Callable[[str], None] = lambda _: None,
    on_measure: Callable[[str, float], None] | None = None,
) -> LlmBenchResult:
    """Open each variant, judge it against the fp32 reference, time them interleaved."""
    on_step("reading the machine")
    machine = detect(gpus=config.options.device.kind == "cuda")
    names, skipped = _runnable(config, machine, model)
    workload = prompt_workload(model, config)
    on_step("the reference's answers on held-out text")
    original = model.original()
    reference = open_engine(REFERENCE_ENGINE, original, config.options)
    answers = held_out_answers(reference, model.family, config.judging)
    longest = max(workload.prompts, key=lambda p: len(p.ids))
    with contextlib.ExitStack() as running:
        opened: dict[str, tuple[Generator, float, float, float]] = {}
        artifacts: dict[str, Artifact] = {}  # what each opened: the same again with slots
        for name in names:
            on_step(f"opening {name}")
            started = time.perf_counter()
            with memory_added(config.options.device) as added:
                generator, artifacts[name], size_mb = _open(
                    name, model, config.options, reference, on_step
                )
                running.callback(generator.close)  # a worker process stops when the run ends
                generate_timed(generator, Prompt(longest.ids, 2))
            # an engine in a worker process (vLLM) says what that process holds
            memory = added[0] + generator.describe().get("worker_memory_mb", 0.0)
            opened[name] = (generator, memory, size_mb, time.perf_counter() - started)
        qualities = {}
        for name, (generator, *_) in opened.items():
            on_step(f"judging {name} against the reference")
            qualities[name] = judge(generator, answers)
        on_step("timing")
        load = MachineLoad(own_seconds=lambda: own_seconds(children=True))  # vLLM's worker
        generators = {n: g for n, (g, *_) in opened.items()}
        timings = time_interleaved(generators, workload.prompts, config.min_time_s, on_measure)
        at_once: dict[str, dict[int, AtOnce]] = {name: {} for name in generators}
        for requests in config.at_once:
            on_step(f"timing {requests} requests at once")
            context = model.family.context_length
            with contextlib.ExitStack() as slotted:
                serving = {
                    name: _serving(
                        name, generator, artifacts[name], requests, config.options, slotted
                    )
                    for name, generator in generators.items()
                }
                for name, run in time_at_once(serving, workload.prompts, requests, context).items():
                    at_once[name][requests] = run
        other_load = load.other_cores()  # read while the workers it counts as ours still run
        rows = [
            LlmBenchRow(
                name=name,
                **timings[name],
                quality=qualities[name],
                failures=tuple(config.budget.failures(qualities[name])),
                settings={**generator.describe(), "weights": VARIANTS[name].weights_label},
                memory_mb=memory,
                size_mb=size,
                open_s=open_s,
                at_once=at_once[name],
            )
            for name, (generator, memory, size, open_s) in opened.items()
        ]
    return LlmBenchResult(machine, model, workload, rows, config.budget, other_load, skipped)


def _runnable(
    config: LlmBenchConfig, machine: Machine, model: LanguageModel
) -> tuple[list[str], dict[str, str]]:
    """The variants to time: those asked (each refused in one line if it cannot run here), or
    the defaults this machine can run, with the reasons for the rest."""
    asked = config.variants or DEFAULT_VARIANTS
    device = config.options.device
    reasons = {name: why for name in asked if (why := cannot_run(name, device, machine, model))}
    if config.variants and reasons:
        raise BadInput("; ".join(reasons.values()))
    return [name for name in asked if name not in reasons], reasons


def _open(
    name: str,
    model: LanguageModel,
    options: RuntimeOptions,
    reference: Generator,
    on_step: Callable[[str], None],
) -> tuple[Generator, Artifact, float]:
    """The variant's generator (the reference itself for the reference engine), the artifact it
    opened, and the MiB of the weights it runs, as the engine reports them."""
    variant = VARIANTS[name]
    if name == REFERENCE_ENGINE:
        return reference, model.original(), module_mb(model.module)
    try:
        artifact = variant_artifact(variant, model, options, on_step)
        generator = open_engine(variant.engine, artifact, options)
    except Unsupported as err:
        raise BadInput(f"{name}: {err}") from err
    return generator, artifact, float(generator.describe().get("weights_mb") or artifact.size_mb())


def _serving(
    name: str,
    generator: Generator,
    artifact: Artifact,
    requests: int,
    options: RuntimeOptions,
    stack: contextlib.ExitStack,
) -> Generator:
    """The generator that serves `requests` at once as the variant would be served: the one
    timed at batch 1, or, for an engine that batches by slots, one opened on the same
    `artifact` with that many (closed when `stack` closes)."""
    variant = VARIANTS[name]
    engine = get_engine(variant.engine)
    if not engine.slotted:
        return generator
    slotted = open_engine(variant.engine, artifact, engine.options_for(options, requests))
    stack.callback(slotted.close)
    return slotted
