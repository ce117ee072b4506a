"""`mahir apply` for an LLM recipe: rebuild the winner of `mahir optimize --llm` from its source.

An LLM recipe (what `llm_output.winner_recipe` saves) names an engine as its runtime, at most one
weight step (`llm_bench.WEIGHT_STEPS`) and the engine's options (threads, device). Replaying it
makes the variant's artifact again from the source (the GGUF written and quantized, the IR
exported, the int8 copy), judges it against the fp32 reference on the same held-out text the
search judged on, and hands back what `llm_output.save_llm_applied` writes. Only variants the
search knows are rebuilt (`VARIANTS`): an engine with weights it never pairs is refused in one
line, before the model loads. A recipe is an LLM's when the model it builds from is a decoder
source (a .gguf file or a causal-LM folder): engine names and encoder runtime names overlap
("torch", "openvino").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mahir.errors import BadInput
from mahir.families.decoder import LanguageModel
from mahir.generation_quality import (
    GenerationBudget,
    GenerationQuality,
    Judging,
    held_out_answers,
    judge,
)
from mahir.hardware import detect
from mahir.recipe import Recipe
from mahir.runtimes.engines import REFERENCE_ENGINE, open_engine
from mahir.search.llm_variants import VARIANTS, Variant, cannot_run, variant_artifact
from mahir.types import Artifact

BUDGET, JUDGING = GenerationBudget(), Judging()
"""What `mahir optimize --llm` judges with by default."""


@dataclass(frozen=True, slots=True)
class LlmApplied:
    """The artifact an LLM recipe rebuilt and how it answers against the reference."""

    artifact: Artifact
    recipe: Recipe
    variant: str
    """The `VARIANTS` name of the recipe's engine and weights."""
    quality: GenerationQuality
    failures: tuple[str, ...]
    """How it misses the budget; empty when it is met."""
    settings: dict[str, Any]
    """What the engine says it ran with (`Generator.describe`)."""


def recipe_variant(recipe: Recipe) -> str:
    """The `VARIANTS` name of `recipe`'s engine and weight step; refused in one line when the
    search has no such variant."""
    if len(recipe.steps) > 1:
        raise BadInput(
            f"an LLM recipe has at most one weight step, this one has {len(recipe.steps)}: keep "
            "the one mahir optimize --llm wrote"
        )
    wanted = Variant(recipe.runtime, recipe.steps[0] if recipe.steps else None)
    for name, variant in VARIANTS.items():
        if variant == wanted:
            return name
    raise BadInput(
        f"no LLM variant runs {recipe.runtime} with {wanted.weights_label} weights: write the "
        "recipe again with mahir optimize --llm"
    )


def apply_llm_recipe(
    model: LanguageModel,
    recipe: Recipe,
    *,
    budget: GenerationBudget = BUDGET,
    judging: Judging = JUDGING,
    on_step: Callable[[str], None] = lambda _step: None,
) -> LlmApplied:
    """Rebuild `recipe`'s variant of `model`, open it on its engine and judge it against the
    fp32 reference."""
    name = recipe_variant(recipe)
    machine = detect(gpus=recipe.options.device.kind == "cuda")
    why = cannot_run(name, recipe.options.device, machine, model)
    if why is not None:
        raise BadInput(f"this recipe cannot run here: {why}")
    artifact = variant_artifact(VARIANTS[name], model, recipe.options, on_step)
    on_step("the reference's answers on held-out text")
    reference = open_engine(REFERENCE_ENGINE, model.original(), recipe.options)
    answers = held_out_answers(reference, model.family, judging)
    on_step(f"judging {name} against the reference")
    generator = open_engine(VARIANTS[name].engine, artifact, recipe.options)
    with contextlib.closing(generator):
        quality = judge(generator, answers)
        settings = generator.describe()
    failures = tuple(budget.failures(quality))
    return LlmApplied(artifact, recipe, name, quality, failures, settings)
