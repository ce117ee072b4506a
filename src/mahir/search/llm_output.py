"""What `mahir optimize --llm` leaves behind: the output directory, the report, the table.

The directory is written whole or not at all (`files.staged`, as `mahir optimize` writes
encoders'): `model/` (what the winner's engine opens, in its format: `llm_outdir.save_llm_model`),
`mahir.json` (format, engine, threads, source, fidelity, and the family's chat template and stop
tokens a server needs), `recipe.yaml` (source path and content hash, the weight steps and the
engine: a replay rebuilds the winner from the source), `report.json` (every candidate with its
status, reason, fidelity and numbers per halving round, the machine, the budget) and
`report.html` (`report/llm_html.py`). With no winner only the reports are written, and never
over an earlier run's model: then into `<out>-report` beside it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rich.table import Table

from mahir.families.decoder import LanguageModel
from mahir.files import staged
from mahir.generation_quality import GenerationQuality
from mahir.llm_outdir import MODEL_FOLDER, save_llm_model
from mahir.measure import BUSY_CORES
from mahir.outdir import MANIFEST
from mahir.passes.torchao import TorchaoInt8
from mahir.recipe import ModelSource, Recipe
from mahir.report.llm_html import render_llm_html
from mahir.search.apply import check_output_dir
from mahir.search.candidates import Objective
from mahir.search.llm_apply import LlmApplied
from mahir.search.llm_optimize import LlmOutcome, LlmSearched
from mahir.search.llm_variants import VARIANTS
from mahir.types import Artifact

UNITS = {"latency": "ms/token", "throughput": "tokens/s"}


def winner_recipe(searched: LlmSearched) -> Recipe | None:
    """The winner as a replayable recipe: its weight steps, engine and threads, from the source
    (path and content hash)."""
    if searched.best is None:
        return None
    candidate = searched.best.candidate
    variant = VARIANTS[candidate.variant]
    steps = () if variant.weights is None else (variant.weights,)
    options = candidate.options(searched.config)
    return Recipe(steps, variant.engine, options, ModelSource.of(searched.model.source))


def verdicts(searched: LlmSearched) -> dict[str, str]:
    """One sentence per candidate: why it won, lost, missed the budget or was not tried."""
    objective, best = searched.config.objective, searched.best
    unit = UNITS[objective]
    said = {}
    for o in searched.outcomes:
        if o.status != "ok" or not o.rounds:
            said[o.candidate.id] = f"{o.status}: {o.reason or 'not timed'}"
        elif o is best:
            speedup = o.rounds[-1].speedup
            said[o.candidate.id] = (
                f"won: {_value(o, objective)} {unit} in the final round, {speedup:.2f}x the "
                "baseline beside it, within the budget"
            )
        elif best is not None and len(best.rounds) >= len(o.rounds):
            r = len(o.rounds)
            mine, theirs = o.rounds[-1].value(objective), best.rounds[r - 1].value(objective)
            said[o.candidate.id] = (
                f"lost in round {r}: {mine:.3g} {unit} against the winner's {theirs:.3g} in "
                f"that round"
            )
        else:  # no winner, or one not timed beside it (a forced one): its own numbers only
            said[o.candidate.id] = f"timed: {_value(o, objective)} {unit}, not the winner"
    return said


def llm_report(searched: LlmSearched) -> dict[str, Any]:
    """report.json: every candidate and how it fared, and what the numbers were measured on."""
    config, why = searched.config, verdicts(searched)
    return {
        "kind": "llm",
        "date": searched.date,
        "complete": searched.complete,
        "elapsed_s": searched.elapsed_s,
        "objective": config.objective,
        "time_budget_s": config.time_budget_s,
        "machine": searched.machine.to_dict(),
        "machine_load": {
            "other_cores": searched.other_load,
            "busy": searched.other_load > BUSY_CORES,
        },
        "model": searched.model.summary(),
        "workload": searched.workload.describe(),
        "batch_size": 1,
        "concurrency": config.concurrency,
        "budget": {"min_top1": config.budget.min_top1, "max_kl": config.budget.max_kl},
        "judging": {
            "passages": config.judging.passages,
            "tokens": config.judging.tokens,
            "prompts": config.judging.prompts,
            "greedy_tokens": config.judging.greedy_tokens,
        },
        "baseline": searched.baseline,
        "best": None if searched.best is None else searched.best.candidate.id,
        "candidates": [_record(o, why.get(o.candidate.id, "")) for o in searched.outcomes],
    }


def _record(o: LlmOutcome, why: str) -> dict[str, Any]:
    variant = VARIANTS[o.candidate.variant]
    return {
        "id": o.candidate.id,
        "variant": o.candidate.variant,
        "engine": variant.engine,
        "weights": variant.weights_label,
        "threads": o.candidate.threads,
        "status": o.status,
        "reason": o.reason,
        "why": why,
        "quality": None if o.quality is None else o.quality.to_dict(),
        "settings": o.settings,
        "open_s": o.open_s,
        "size_mb": o.size_mb,
        "rounds": [r.to_json() for r in o.rounds],
    }


def save_llm_output(searched: LlmSearched, out: str | os.PathLike[str]) -> Path:
    """Write the output directory atomically; where it went (`<out>-report` when there is no
    winner and `out` holds an earlier run's model)."""
    out = Path(out)
    check_output_dir(out)
    report = llm_report(searched)
    recipe, best = winner_recipe(searched), searched.best
    if best is None and (out / MANIFEST).is_file():
        out = out.with_name(f"{out.name}-report")
    with staged(out, folder=True) as staging:
        if best is not None and recipe is not None and searched.artifact is not None:
            _write_model(
                staging,
                searched.model,
                searched.artifact,
                recipe,
                variant=best.candidate.variant,
                quality=best.quality,
                settings=best.settings,
                objective=searched.config.objective,
                concurrency=searched.config.concurrency,
            )
        (staging / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (staging / "report.html").write_text(render_llm_html(report))
    return out


def save_llm_applied(
    applied: LlmApplied, model: LanguageModel, out: str | os.PathLike[str]
) -> Path:
    """Write what `mahir apply` rebuilt from an LLM recipe as an output directory (the model
    files, mahir.json, recipe.yaml: no search, so no report), atomically."""
    out = Path(out)
    check_output_dir(out)
    with staged(out, folder=True) as staging:
        _write_model(
            staging,
            model,
            applied.artifact,
            applied.recipe,
            variant=applied.variant,
            quality=applied.quality,
            settings=applied.settings,
            objective=None,
            concurrency=None,
        )
    return out


def _write_model(
    staging: Path,
    model: LanguageModel,
    artifact: Artifact,
    recipe: Recipe,
    *,
    variant: str,
    quality: GenerationQuality | None,
    settings: dict[str, Any],
    objective: Objective | None,
    concurrency: int | None,
) -> None:
    """model/, recipe.yaml and mahir.json (how `llm_outdir.open_llm_output` opens it)."""
    family = model.family
    name = save_llm_model(artifact, model.module, family.tokenizer, staging / MODEL_FOLDER)
    recipe.save(staging / "recipe.yaml")
    manifest = {
        "family": family.kind,
        "format": artifact.format,
        "model_file": f"{MODEL_FOLDER}/{name}",
        "variant": variant,
        "engine": recipe.runtime,
        "weights": VARIANTS[variant].weights_label,
        "torchao": any(isinstance(step, TorchaoInt8) for step in recipe.steps),
        "options": recipe.options.to_dict(),
        "recipe_hash": recipe.hash(),
        "source": {"name": model.name, "source": model.source},
        "objective": objective,
        "concurrency": concurrency,
        "fidelity": None if quality is None else quality.to_dict(),
        "settings": settings,
        **family.summary(),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")


def llm_table(searched: LlmSearched) -> Table:
    """The terminal's table: one row per candidate, the winner starred."""
    config, best = searched.config, searched.best
    objective, budget = config.objective, config.budget
    table = Table(
        title=f"{searched.model.name} on {searched.machine.summary()}, "
        + ("batch 1" if config.concurrency == 1 else f"{config.concurrency} requests at once"),
        caption=f"objective: {objective} ({UNITS[objective]}); budget: top-1 >= "
        f"{budget.min_top1}, KL <= {budget.max_kl}; numbers from each candidate's last round, "
        "speedup over the baseline timed beside it",
    )
    table.add_column("candidate", no_wrap=True)
    for column in ("status", "ms/tok", "tok/s", "speedup", "rounds", "top-1", "KL", "greedy"):
        table.add_column(column, justify="right", no_wrap=column != "status")
    for o in searched.outcomes:
        last, q = (o.rounds[-1] if o.rounds else None), o.quality
        table.add_row(
            f"[bold]{o.candidate.id} *[/bold]" if o is best else o.candidate.id,
            o.status if o.status == "ok" else f"{o.status}: {o.reason}",
            "" if last is None or not last.decode_ms else f"{last.decode_p50_ms:.1f}",
            "" if last is None else f"{last.tokens_per_s:.1f}",
            "" if last is None else f"{last.speedup:.2f}x",
            str(len(o.rounds) or ""),
            "" if q is None else f"{q.top1_agreement:.3f}",
            "" if q is None else f"{q.kl_mean:.4f}",
            "" if q is None else f"{q.greedy_agreement:.0%}",
        )
    return table


def _value(o: LlmOutcome, objective: Objective) -> str:
    return f"{o.value(objective):.3g}"
