"""The quality budget: which candidates are close enough to the original to be allowed to win.

One knob, `max_drop`, read in the units of whatever decides:
- by default, fidelity to the fp32 original's own outputs: for a sentence encoder the pooled
  embedding (cosine mean >= 1 - max_drop, worst sample >= 1 - 2 * max_drop); otherwise every
  output, each by its kind: the model's logits by top-1 agreement >= 1 - max_drop, any other
  output by the worst sample's cosine >= 1 - 2 * max_drop and the largest error within
  10 * max_drop of the largest reference value;
- with a user metric `fn(outputs, data) -> float` (higher is better), the metric may fall by at
  most `max_drop` below what the original scores on the same data.
A judge returns None for a pass, else one sentence with the numbers, which reports show as is.
It sits with quality.py: it sees sessions, arrays and `Quality`, never a runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mahir.errors import BadInput
from mahir.model import Model
from mahir.types import Outputs, Quality, Session
from mahir.workload import Batch

DEFAULT_MAX_DROP = 0.01

Metric = Callable[[dict[str, Any], Any], float]
"""A user's quality metric: all outputs on the user's data and the data itself -> higher is
better. Each output is one array over all samples (for sentence encoders also the pooled
"sentence_embedding"); token-level outputs of batches padded to different lengths come as a
list of per-batch arrays instead."""


@dataclass(frozen=True, slots=True)
class FidelityBudget:
    """Closeness to the original's outputs, the default when no user metric is given."""

    max_drop: float = DEFAULT_MAX_DROP

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_drop < 0.5:
            raise BadInput(f"--max-drop must be in [0, 0.5) for fidelity, got {self.max_drop}")

    def describe(self, quality_kind: str) -> str:
        low, worst = 1 - self.max_drop, 1 - 2 * self.max_drop
        if quality_kind == "embedding":
            return f"sentence-embedding cosine mean >= {low:g} and worst >= {worst:g}"
        top1 = f"top-1 agreement with the original >= {low:.1%}"
        others = f"worst cosine >= {worst:g}, max error <= {10 * self.max_drop:g} x |ref|"
        if quality_kind == "logits":
            return top1
        if quality_kind == "mixed":
            return f"logits: {top1}; other outputs: {others}"
        return f"every output: {others}"

    def bounds(self, quality_kind: str) -> dict[str, float]:
        """The numeric floors on the quality keys reports plot (top-1 has none there)."""
        worst = 1 - 2 * self.max_drop
        if quality_kind == "embedding":
            return {"cosine_mean": 1 - self.max_drop, "cosine_min": worst}
        return {"cosine_min": worst} if quality_kind == "outputs" else {}

    def judge(self, quality: Quality) -> str | None:
        """None when `quality` is within budget, else why not, with the numbers."""
        low, worst = 1 - self.max_drop, 1 - 2 * self.max_drop
        head = quality.headline
        if quality.embedding is not None:
            if head.cosine_mean < low:
                return f"mean cosine {head.cosine_mean:.4f} < {low:g}"
            if head.cosine_min < worst:
                return f"worst cosine {head.cosine_min:.4f} < {worst:g}"
            return None
        for name, f in quality.outputs.items():
            if f.top1_agreement is not None:
                if f.top1_agreement < low:
                    return f"{name}: top-1 agreement {f.top1_agreement:.2%} < {low:.1%}"
            elif f.cosine_min < worst:
                return f"{name}: worst cosine {f.cosine_min:.4f} < {worst:g}"
            elif f.max_rel_err > 10 * self.max_drop:
                return f"{name}: max error {f.max_rel_err:.3g} x |ref| > {10 * self.max_drop:g}"
        return None


def quality_kind(quality: Quality) -> str:
    """What the fidelity budget looks at: "embedding", "logits" (every output is logits),
    "mixed" (logits and other outputs) or "outputs" (no logits)."""
    if quality.embedding is not None:
        return "embedding"
    logits = [f.top1_agreement is not None for f in quality.outputs.values()]
    if all(logits):
        return "logits"
    return "mixed" if any(logits) else "outputs"


@dataclass(frozen=True, slots=True)
class MetricBudget:
    """The user's metric on the user's data may fall at most `max_drop` below the original's."""

    metric: Metric
    name: str
    """How the user named it (module:fn), for reports."""
    data: Any
    """What `metric` receives as its second argument."""
    baseline: float
    """The original's score on `data`."""
    max_drop: float = DEFAULT_MAX_DROP

    def __post_init__(self) -> None:
        if self.max_drop < 0:
            raise BadInput(f"--max-drop must be >= 0, got {self.max_drop}")

    def describe(self) -> str:
        return f"{self.name} >= {self.baseline - self.max_drop:.4g} (original {self.baseline:.4g})"

    def judge(self, score: float) -> str | None:
        floor = self.baseline - self.max_drop
        if not np.isfinite(score) or score < floor:
            return f"{self.name} {score:.4g} < {floor:.4g} (original {self.baseline:.4g})"
        return None


def metric_outputs(model: Model, session: Session, batches: Sequence[Batch]) -> list[Outputs]:
    """The session's outputs on the user's batches, with what the model's users really get
    added (a sentence encoder's pooled "sentence_embedding"), since that is what they score."""
    return [model.family.scored(session.run(batch), batch) for batch in batches]


def score(metric: Metric, name: str, outputs: Sequence[Outputs], data: Any) -> float:
    """The metric on outputs gathered over batches; a metric that fails is the user's error."""
    joined = {key: _join([o[key] for o in outputs]) for key in outputs[0]}
    try:
        value = float(metric(joined, data))
    except Exception as err:  # the user's code: any failure is reported, not crashed on
        raise BadInput(f"metric {name} raised {type(err).__name__}: {err}") from err
    return value


def _join(arrays: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    if len({a.shape[1:] for a in arrays}) == 1:
        return np.concatenate(arrays)
    return arrays
