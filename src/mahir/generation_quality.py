"""Fidelity for generation: how close an engine's answers are to the fp32 reference's.

Two views, both on text that no prompt workload or calibration uses (`data/llm_held_out.txt`):
- teacher-forced, over whole passages: at every position both models read the same true prefix,
  so each position judges one next-token distribution on its own: top-1 agreement (the greedy
  choice), mean KL(reference || candidate) (the whole distribution, where sampling lives), and
  each model's perplexity on the true text (a candidate can disagree with the reference and
  still model text as well);
- free-running, from prompts: greedy continuations of both, and how many tokens agree before
  the first divergence. One different choice changes everything after it, so this is what a user
  sees, and the only view that runs the engine's own decode path (its KV cache, its compiled
  step).

The budget (`GenerationBudget`): mean KL <= 0.02 nats and top-1 agreement >= 0.93, chosen by
measuring what separates usable from broken on the default model (SmolLM2-135M-Instruct, fp32
reference from its Q4_1 GGUF; 8 passages x 128 tokens = 1,016 positions; `benchmarks/llm_budget.py`
on an AMD EPYC Zen 4, recorded in `benchmarks/README.md`):

    variant                          top-1   mean KL   perplexity (reference 19.02)
    bf16                             0.965   0.0014    19.05
    int8 weight-only (torchao)       0.955   0.0049    19.25
    int8 round-to-nearest per row    0.958   0.0045    19.22
    noise of 2% of each weight's std 0.908   0.0224    19.50   marginal
    noise of 5%                      0.770   0.150     22.39   broken
    int4 round-to-nearest, groups 32 0.630   0.465     28.41   broken
    int4 per row, no groups          0.366   1.281     60.93   broken

KL is the sharp measure: usable variants sit 4x under 0.02, broken ones 7-64x over it, and the
marginal one (perplexity +2.5%) just over. Top-1 is blunt on a small model: its next-token
distributions on prose are flat (perplexity 19), so near-ties flip even in bf16 (0.965), and
1,016 positions carry a sampling error of about 0.007. The 0.95 first proposed would pass int8
by 0.005, less than one sampling error; 0.93 keeps every usable variant 3-5 errors clear and
still fails the marginal and broken ones. Greedy agreement is reported, not budgeted: one
near-tie changes every token after it (bf16 keeps 54% of 32-token continuations, int8 44-68%).

Imports numpy, the standard library and mahir.generation: engines arrive as `Generator`s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mahir.generation import Generator, Sampling

if TYPE_CHECKING:
    from mahir.families.decoder import Decoder


@dataclass(frozen=True, slots=True)
class Judging:
    """How much held-out text judges an engine."""

    passages: int = 8
    """Teacher-forced passages."""
    tokens: int = 128
    """Tokens of each passage (fewer if the model's context is shorter)."""
    prompts: int = 6
    """Greedy continuations: the opening tokens of this many passages."""
    prompt_tokens: int = 24
    greedy_tokens: int = 32
    """New tokens each greedy continuation runs for (stop tokens do not end it)."""


@dataclass(frozen=True, slots=True)
class GenerationQuality:
    """An engine's answers against the reference's, on held-out text."""

    top1_agreement: float
    """Share of teacher-forced positions where both pick the same most likely next token."""
    kl_mean: float
    """Mean over positions of KL(reference || candidate), in nats."""
    kl_max: float
    perplexity: float
    """The candidate's perplexity on the held-out text."""
    reference_perplexity: float
    greedy_agreed: tuple[int, ...]
    """Per prompt: new tokens that agree before the first divergence (greedy_tokens: none)."""
    greedy_tokens: int
    positions: int
    """Teacher-forced positions judged."""

    @property
    def greedy_agreement(self) -> float:
        """Mean share of each greedy continuation that agrees before the first divergence."""
        return float(np.mean(self.greedy_agreed)) / self.greedy_tokens

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "greedy_agreement": self.greedy_agreement}


@dataclass(frozen=True, slots=True)
class GenerationBudget:
    """What a candidate must keep (see the module's docstring for how the defaults were chosen)."""

    min_top1: float = 0.93
    max_kl: float = 0.02

    def failures(self, quality: GenerationQuality) -> list[str]:
        """Why `quality` misses the budget, one phrase per measure; empty when it is met."""
        missed = []
        if not quality.top1_agreement >= self.min_top1:  # NaN misses too
            missed.append(f"top-1 agreement {quality.top1_agreement:.3f} < {self.min_top1}")
        if not quality.kl_mean <= self.max_kl:
            missed.append(f"mean KL {quality.kl_mean:.4f} > {self.max_kl}")
        return missed


@dataclass(frozen=True)
class Reference:
    """The reference engine's answers on the held-out inputs, computed once per run."""

    sequences: tuple[tuple[int, ...], ...]
    logprobs: tuple[np.ndarray, ...]
    prompts: tuple[tuple[int, ...], ...]
    continuations: tuple[tuple[int, ...], ...]


def held_out_answers(
    reference: Generator, family: Decoder, judging: Judging = Judging()
) -> Reference:
    """The reference's answers on the family's held-out text, as `judging` asks for them: the
    teacher-forced passages and the greedy continuations of their openings."""
    sequences = family.held_out(judging.passages, judging.tokens)
    openings = family.held_out(judging.prompts, judging.prompt_tokens)
    return reference_answers(reference, sequences, openings, judging.greedy_tokens)


def reference_answers(
    reference: Generator,
    sequences: Sequence[Sequence[int]],
    prompts: Sequence[Sequence[int]],
    greedy_tokens: int = 32,
) -> Reference:
    return Reference(
        sequences=tuple(tuple(s) for s in sequences),
        logprobs=tuple(reference.logprobs(s) for s in sequences),
        prompts=tuple(tuple(p) for p in prompts),
        continuations=tuple(_greedy(reference, p, greedy_tokens) for p in prompts),
    )


def judge(candidate: Generator, reference: Reference) -> GenerationQuality:
    """`candidate` against the reference's answers, on the same inputs."""
    forced = teacher_forced(
        [candidate.logprobs(s) for s in reference.sequences],
        reference.logprobs,
        reference.sequences,
    )
    tokens = len(reference.continuations[0]) if reference.continuations else 0
    agreed = tuple(
        agreed_prefix(_greedy(candidate, prompt, tokens), expected)
        for prompt, expected in zip(reference.prompts, reference.continuations, strict=True)
    )
    return GenerationQuality(**forced, greedy_agreed=agreed, greedy_tokens=tokens)


def teacher_forced(
    candidate: Sequence[np.ndarray],
    reference: Sequence[np.ndarray],
    sequences: Sequence[Sequence[int]],
) -> dict[str, Any]:
    """Top-1 agreement, KL(reference || candidate) mean and max, and both perplexities over
    the positions that have a true next token. A non-finite candidate row counts as a
    disagreement at infinite KL: never a pass."""
    hits, kls, nll, ref_nll = 0, [], [], []
    for cand, ref, tokens in zip(candidate, reference, sequences, strict=True):
        n = len(tokens) - 1
        if cand.shape != ref.shape or len(ref) != len(tokens):
            raise ValueError(f"log-probabilities of shape {cand.shape} for {ref.shape}")
        c, r = cand[:n].astype(np.float64), ref[:n].astype(np.float64)
        finite = np.isfinite(c).all(axis=1)
        hits += int(((c.argmax(axis=1) == r.argmax(axis=1)) & finite).sum())
        with np.errstate(invalid="ignore", over="ignore"):  # 0 * inf: a term that is 0
            p = np.exp(r)
            terms = np.where(p > 0, p * (r - c), 0.0)
            kls.append(np.where(finite, np.maximum(terms.sum(axis=1), 0.0), np.inf))
        following = np.asarray(tokens[1:])
        nll.append(-c[np.arange(n), following])
        ref_nll.append(-r[np.arange(n), following])
    kl = np.concatenate(kls)
    return {
        "top1_agreement": hits / len(kl),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "perplexity": float(np.exp(np.concatenate(nll).mean())),
        "reference_perplexity": float(np.exp(np.concatenate(ref_nll).mean())),
        "positions": len(kl),
    }


def agreed_prefix(candidate: Sequence[int], reference: Sequence[int]) -> int:
    """Tokens the two agree on before the first difference."""
    for i, (a, b) in enumerate(zip(candidate, reference, strict=False)):
        if a != b:
            return i
    return min(len(candidate), len(reference))


def _greedy(generator: Generator, prompt: Sequence[int], tokens: int) -> tuple[int, ...]:
    return tuple(generator.stream(prompt, Sampling(max_new_tokens=tokens)))
