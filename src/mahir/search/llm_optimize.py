"""`mahir optimize --llm`: search a decoder LLM's variants x thread counts, keep the fastest that
still answers like the fp32 reference.

The order of work is the encoder search's (halving.py states its invariant): the reference
(PyTorch eager fp32 on the original) answers the held-out inputs once; each candidate is opened
and judged against it (`generation_quality.judge`), and one outside `GenerationBudget` is
rejected with the failing measure before any timing; then successive halving over the
survivors: every survivor generates the same prompts interleaved with the baseline for a short
while (`llm_bench.time_interleaved`), the better half on the objective twice as long, and so on
until one contender is left or the time budget ends. A candidate's speedup is always a ratio of
two numbers from one round. Latency is the median decode ms per token at batch 1, throughput
output tokens/s over whole generations: at batch 1, or with `concurrency` requests at once (each
engine runs them its own way: a batch, concurrent streams, or in turn), which engines that batch
win.

Candidates come from `VARIANTS` (llm_variants.py) and the reasons it gives for those this machine
cannot run, never from names written here. Sits beside llm_bench in search; knows nothing of
files or the terminal beyond the result's table (`llm_output.py` writes the directory).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mahir.errors import BadInput, first_line, refuse_below
from mahir.families.decoder import LanguageModel
from mahir.families.prompts import Prompt, PromptWorkload, check_range
from mahir.generation import Generator
from mahir.generation_quality import (
    GenerationBudget,
    GenerationQuality,
    Judging,
    Reference,
    held_out_answers,
    judge,
)
from mahir.hardware import Machine, detect, physical_cores
from mahir.measure import MachineLoad
from mahir.runtimes.engines import REFERENCE_ENGINE, get_engine, open_engine
from mahir.search.candidates import Objective
from mahir.search.halving import Events, Status, first_rung_seconds
from mahir.search.llm_bench import LlmBenchConfig, prompt_workload
from mahir.search.llm_timing import time_at_once, time_interleaved
from mahir.search.llm_variants import VARIANTS, cannot_run, variant_artifact
from mahir.search.optimize_config import TIMING_SHARE
from mahir.types import CPU, Artifact, Device, RuntimeOptions


def thread_counts(cores: int) -> tuple[int, ...]:
    """Thread counts worth timing on `cores` physical cores, most first. All of them, since a
    decode step is one matmul per layer split across threads; where there are more than two,
    one fewer (the core left free keeps the OS, the tokenizer and a server's event loop off the
    matmul threads, whose stalls cost a whole step) and half (batch-1 decoding reads every
    weight once per token, so memory bandwidth often saturates before the cores do). No more:
    each count multiplies the candidates to judge and time."""
    counts = [cores] if cores <= 2 else [cores, cores - 1, cores // 2]
    return tuple(sorted(set(counts), reverse=True))


@dataclass(frozen=True, slots=True)
class LlmCandidate:
    """A variant (`VARIANTS`: engine x weights) at a thread count."""

    variant: str
    threads: int

    @property
    def id(self) -> str:
        return f"{self.variant}/{self.threads}t"

    def options(self, config: LlmOptimizeConfig) -> RuntimeOptions:
        """What its engine opens with: its threads, and for `config.concurrency` requests at
        once as many slots where the engine batches by slots (`Engine.options_for`)."""
        plain = RuntimeOptions(threads=self.threads, device=config.device)
        return get_engine(VARIANTS[self.variant].engine).options_for(plain, config.concurrency)


@dataclass(frozen=True, slots=True)
class LlmOptimizeConfig:
    """What `optimize_llm` searches, judged how, timed on what, for how long."""

    objective: Objective = "latency"
    variants: tuple[str, ...] = ()
    """Names from `VARIANTS`; empty: every one this machine can run (the others are skipped
    with the reason)."""
    threads: tuple[int, ...] = ()
    """Thread counts; empty: `thread_counts` of this machine's physical cores."""
    time_budget_s: float | None = None
    """Seconds for the whole search; None: no limit."""
    prompts: int = 4
    prompt_tokens: tuple[int, int] = (32, 256)
    new_tokens: tuple[int, int] = (32, 64)
    prompts_file: Path | None = None
    """The user's prompts (.txt lines or .jsonl); generated ones when None."""
    judging: Judging = field(default_factory=Judging)
    budget: GenerationBudget = field(default_factory=GenerationBudget)
    device: Device = CPU
    seed: int = 0
    concurrency: int = 1
    """Requests in flight together when the objective is throughput: above 1, each round times
    output tokens/s with that many at once (`llm_bench.time_at_once`: one batch, concurrent
    streams or one after another, as each engine can), so engines that batch can win."""

    def __post_init__(self) -> None:
        if self.objective not in ("latency", "throughput"):
            raise BadInput(f"--objective is latency or throughput, got {self.objective!r}")
        if self.concurrency < 1:
            raise BadInput(f"requests at once must be >= 1, got {self.concurrency}")
        check_range("--tokens", self.prompt_tokens)
        check_range("--new-tokens", self.new_tokens)
        refuse_below(1, {"--prompts": self.prompts})
        if self.concurrency > 1 and self.objective != "throughput":
            raise BadInput(
                f"{self.concurrency} requests at once are timed for --objective throughput: "
                "add it, or leave out -b (latency is per token at batch 1)"
            )
        unknown = [name for name in self.variants if name not in VARIANTS]
        if unknown:
            raise BadInput(f"unknown LLM engine {unknown[0]!r}: choose from {', '.join(VARIANTS)}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise BadInput(f"--time-budget must be above 0 minutes, got {self.time_budget_s / 60}")
        if any(t < 1 for t in self.threads):
            raise BadInput(f"threads must be >= 1, got {min(self.threads)}")

    def bench_config(self, context_length: int) -> LlmBenchConfig:
        """The bench's config for the same prompts (`llm_bench.prompt_workload`), prompts
        shortened where they and their new tokens would overflow the model's context."""
        high = max(1, min(self.prompt_tokens[1], context_length - self.new_tokens[1]))
        return LlmBenchConfig(
            prompts=self.prompts,
            prompt_tokens=(min(self.prompt_tokens[0], high), high),
            new_tokens=self.new_tokens,
            prompts_file=self.prompts_file,
            seed=self.seed,
        )


@dataclass(frozen=True, slots=True)
class Round:
    """One candidate's numbers in one halving round, beside the baseline's in the same round."""

    seconds: float
    """Timed seconds asked of each entrant (at least one pass over the prompts)."""
    decode_ms: tuple[float, ...]
    """One per generation: its decode time per token after the first (`llm_timing.py`)."""
    ttft_ms: tuple[float, ...]
    tokens: int
    wall_s: float
    speedup: float
    """The baseline's objective value in this round over this candidate's (either way round,
    so that above 1 is better)."""

    @property
    def decode_p50_ms(self) -> float:
        return float(np.median(self.decode_ms)) if self.decode_ms else math.nan

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else math.nan

    def value(self, objective: Objective) -> float:
        return self.decode_p50_ms if objective == "latency" else self.tokens_per_s

    def to_json(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "decode_ms": {
                "p50": self.decode_p50_ms,
                "p90": float(np.percentile(self.decode_ms, 90)) if self.decode_ms else None,
            },
            "ttft_ms_p50": float(np.median(self.ttft_ms)) if self.ttft_ms else None,
            "decode_tokens_per_s": 1e3 / self.decode_p50_ms if self.decode_ms else None,
            "output_tokens_per_s": self.tokens_per_s,
            "tokens": self.tokens,
            "generations": len(self.ttft_ms),
            "speedup": self.speedup,
        }


@dataclass
class LlmOutcome:
    """What became of one candidate."""

    candidate: LlmCandidate
    status: Status
    reason: str | None = None
    quality: GenerationQuality | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    open_s: float = 0.0
    size_mb: float | None = None
    rounds: list[Round] = field(default_factory=list)

    def value(self, objective: Objective) -> float | None:
        """The objective in the last round it was timed in."""
        return self.rounds[-1].value(objective) if self.rounds else None


@dataclass
class LlmSearched:
    """Every outcome, the winner (with the artifact its engine opens), and how the run went."""

    model: LanguageModel
    machine: Machine
    config: LlmOptimizeConfig
    workload: PromptWorkload
    outcomes: list[LlmOutcome]
    baseline: str
    best: LlmOutcome | None
    artifact: Artifact | None
    """What the winner's engine opened: the original, its int8 weight-only copy, a GGUF file or
    an OpenVINO IR."""
    complete: bool
    """False when Ctrl-C ended it; a time budget that stops it is a normal end."""
    other_load: float
    """Cores other processes kept busy while timing (`measure.MachineLoad`)."""
    elapsed_s: float
    date: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat())


def better(objective: Objective, a: float, b: float) -> bool:
    """Whether objective value `a` beats `b` (fewer ms per token, or more tokens/s)."""
    return a < b if objective == "latency" else a > b


def rank(outcomes: Sequence[LlmOutcome], objective: Objective) -> list[LlmOutcome]:
    """Timed candidates, best first: most rounds, then the objective in their last round."""
    timed = [o for o in outcomes if o.status == "ok" and o.rounds]
    sign = 1.0 if objective == "latency" else -1.0
    return sorted(timed, key=lambda o: (-len(o.rounds), sign * (o.value(objective) or 0.0)))


@dataclass
class _Search:
    """One run's state: the reference's answers, the deadlines, the generators kept open."""

    model: LanguageModel
    config: LlmOptimizeConfig
    reference: Reference
    prompts: Sequence[Prompt]
    deadline: float | None
    open_deadline: float | None
    on_event: Events
    generators: dict[str, Generator] = field(default_factory=dict)
    artifacts: dict[str, Artifact] = field(default_factory=dict)

    def check(self, candidate: LlmCandidate) -> LlmOutcome:
        """Open the candidate and judge it; keep its generator open when it meets the budget."""
        started = time.monotonic()
        self.on_event(candidate.id, "opening and judging against the reference")
        options = candidate.options(self.config)
        try:
            variant = VARIANTS[candidate.variant]
            artifact = variant_artifact(
                variant, self.model, options, lambda step: self.on_event(candidate.id, step)
            )
            generator = open_engine(variant.engine, artifact, options)
            quality = judge(generator, self.reference)
            outcome = LlmOutcome(candidate, "ok", quality=quality, settings=generator.describe())
            outcome.settings["weights"] = variant.weights_label
            outcome.size_mb = float(outcome.settings.get("weights_mb") or artifact.size_mb())
        except Exception as err:  # a candidate that crashes fails alone; the search goes on
            outcome = LlmOutcome(
                candidate, "failed", reason=f"{type(err).__name__}: {first_line(err)}"
            )
        outcome.open_s = time.monotonic() - started
        if outcome.quality is not None and (missed := self.config.budget.failures(outcome.quality)):
            outcome.status, outcome.reason = "rejected", "; ".join(missed)
        if outcome.status == "ok":
            self.generators[candidate.id] = generator
            self.artifacts[candidate.id] = artifact
        self.on_event(candidate.id, outcome.reason or "within the budget")
        return outcome

    def halve(self, baseline: LlmOutcome, contenders: list[LlmOutcome]) -> None:
        """Successive halving, the baseline in every round, until one contender is left or the
        next round would end past the deadline (the first round always runs)."""
        objective = self.config.objective
        left = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
        seconds = first_rung_seconds(left, len(contenders), 1)
        while True:
            entrants = [baseline, *contenders]
            started = time.monotonic()
            self._round(entrants, seconds)
            if len(contenders) <= 1:
                return
            contenders.sort(
                key=lambda o: o.rounds[-1].value(objective), reverse=objective != "latency"
            )
            contenders = contenders[: math.ceil(len(contenders) / 2)]
            # The next round: twice the time for each of fewer entrants.
            predicted = (time.monotonic() - started) * 2 * (len(contenders) + 1) / len(entrants)
            if self.deadline is not None and time.monotonic() + predicted > self.deadline:
                self.on_event(baseline.candidate.id, "time budget spent: the halving stops here")
                return
            seconds *= 2

    def _round(self, entrants: Sequence[LlmOutcome], seconds: float) -> None:
        ids = [o.candidate.id for o in entrants]
        self.on_event(ids[0], f"timing {len(ids)} for {seconds:.1f} s each: {', '.join(ids)}")
        generators = {i: self.generators[i] for i in ids}
        if self.config.concurrency > 1:
            timed = self._at_once(generators, seconds)
        else:
            timed = time_interleaved(generators, self.prompts, seconds)
        rounds = {
            i: Round(
                seconds,
                decode_ms=timed[i]["decode_ms"],
                ttft_ms=timed[i]["ttft_ms"],
                tokens=timed[i]["tokens"],
                wall_s=timed[i]["seconds"],
                speedup=1.0,
            )
            for i in ids
        }
        objective = self.config.objective
        base = rounds[ids[0]].value(objective)
        for outcome in entrants:
            own = rounds[outcome.candidate.id]
            ratio = base / own.value(objective)
            speedup = ratio if objective == "latency" else 1 / ratio
            outcome.rounds.append(dataclasses.replace(own, speedup=speedup))
            self.on_event(outcome.candidate.id, f"{speedup:.2f}x the baseline")

    def _at_once(self, generators: dict[str, Generator], seconds: float) -> dict[str, Any]:
        """`Round` fields from passes of `time_at_once` until each generator had `seconds`: output
        tokens and wall time only (tokens of concurrent requests have no one decode time)."""
        tokens, wall = dict.fromkeys(generators, 0), dict.fromkeys(generators, 0.0)
        context = self.model.family.context_length
        while min(wall.values()) < seconds or not all(tokens.values()):
            runs = time_at_once(generators, self.prompts, self.config.concurrency, context)
            for name, run in runs.items():
                tokens[name] += run.tokens
                wall[name] += run.seconds
        return {
            name: {"decode_ms": (), "ttft_ms": (), "tokens": tokens[name], "seconds": wall[name]}
            for name in generators
        }


def optimize_llm(
    model: LanguageModel,
    config: LlmOptimizeConfig = LlmOptimizeConfig(),
    *,
    on_event: Events = lambda _id, _text: None,
) -> LlmSearched:
    """Judge every candidate this machine can run against the fp32 reference, then halve the
    survivors on the objective; Ctrl-C ends it early with what was measured."""
    started = time.monotonic()
    budget = config.time_budget_s
    deadline = None if budget is None else started + budget
    machine = detect(gpus=config.device.kind == "cuda")
    machine.require(config.device)
    candidates, skipped = _candidates(config, machine, model)
    workload = prompt_workload(model, config.bench_config(model.family.context_length))
    on_event(candidates[0].id, "the reference's answers on held-out text")
    reference = open_engine(
        REFERENCE_ENGINE, model.original(), RuntimeOptions(device=config.device)
    )
    answers = held_out_answers(reference, model.family, config.judging)
    search = _Search(
        model, config, answers, workload.prompts, deadline,
        None if budget is None else started + budget * (1 - TIMING_SHARE), on_event,
    )  # fmt: skip
    complete, load, checked = True, MachineLoad(), list[LlmOutcome]()
    try:
        for candidate in candidates:
            late = search.open_deadline is not None and time.monotonic() > search.open_deadline
            if late and candidate is not candidates[0]:
                reason = "time budget spent before it was opened"
                checked.append(LlmOutcome(candidate, "skipped", reason=reason))
                on_event(candidate.id, reason)
                continue
            checked.append(search.check(candidate))
        baseline = checked[0]
        if baseline.status != "ok":
            raise BadInput(
                f"the baseline, {baseline.candidate.id}, cannot run this model ({baseline.reason})"
                ": nothing can be timed against it"
            )
        load = MachineLoad()
        contenders = [o for o in checked if o.status == "ok" and o is not baseline]
        search.halve(baseline, contenders)
    except KeyboardInterrupt:
        complete = False
        on_event(candidates[0].id, "interrupted: keeping what was measured")
    reached = {o.candidate for o in checked}
    checked += [LlmOutcome(c, "skipped", "interrupted") for c in candidates if c not in reached]
    outcomes = [*checked, *skipped]
    ranked = rank(outcomes, config.objective)
    best = ranked[0] if ranked else None
    return LlmSearched(
        model=model,
        machine=machine,
        config=config,
        workload=workload,
        outcomes=outcomes,
        baseline=candidates[0].id,
        best=best,
        artifact=None if best is None else search.artifacts[best.candidate.id],
        complete=complete,
        other_load=load.other_cores(),
        elapsed_s=time.monotonic() - started,
    )


def _candidates(
    config: LlmOptimizeConfig, machine: Machine, model: LanguageModel
) -> tuple[list[LlmCandidate], list[LlmOutcome]]:
    """The candidates to open, the baseline (the reference engine at the most threads) first,
    and the skipped ones: variants this machine cannot run, with the reason."""
    threads = config.threads or thread_counts(physical_cores())
    asked = config.variants or tuple(VARIANTS)
    names = [REFERENCE_ENGINE, *(n for n in asked if n != REFERENCE_ENGINE)]
    why = cannot_run(REFERENCE_ENGINE, config.device, machine, model)
    if why is not None:
        raise BadInput(f"the reference engine cannot run here: {why}")
    candidates, skipped = [], []
    for name in names:
        why = cannot_run(name, config.device, machine, model)
        for count in sorted(threads, reverse=True):
            candidate = LlmCandidate(name, count)
            if why is None:
                candidates.append(candidate)
            else:
                skipped.append(LlmOutcome(candidate, "skipped", reason=why))
    return candidates, skipped
