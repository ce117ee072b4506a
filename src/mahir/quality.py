"""Fidelity: how close a candidate's outputs are to the fp32 reference, over a list of batches.

Per output: the largest absolute and relative error, the cosine of each sample to its reference
(mean and worst), and for the outputs the model declares logits how often the top-1 answer
agrees (a 2-column regressor or a pooled vector is not a classifier, whatever its shape).
Padded token positions are left out, since their values carry no meaning; for a sentence
encoder the pooled sentence embedding is measured too, because that is what its users get. A
NaN or inf is the worst possible answer, never a pass. This room sees only numpy arrays; it
imports numpy, the standard library and mahir's types, errors and pooling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mahir.errors import ExportMismatch
from mahir.pooling import Pooling, pool
from mahir.types import OutputFidelity, Outputs, Quality, Session

if TYPE_CHECKING:
    from mahir.model import Model
    from mahir.workload import Batch


def compare(
    outputs: Sequence[Outputs],
    reference: Sequence[Outputs],
    *,
    attention_masks: Sequence[np.ndarray] | None = None,
    pooling: Pooling | None = None,
    embedding_output: str | None = None,
    logits: frozenset[str] = frozenset(),
) -> Quality:
    """Fidelity of `outputs` to `reference`, batch by batch (same order, same inputs).

    Outputs named in `logits` are class scores: their top-1 agreement is measured too.

    `attention_masks` (one (batch, seq) mask per batch) excludes padded positions of token-level
    outputs. With `pooling`, the output named `embedding_output` is pooled on both sides and
    its fidelity is `Quality.embedding`.
    """
    if not reference or len(outputs) != len(reference):
        raise ValueError(
            f"compare needs one set of outputs per reference batch, got {len(outputs)} for "
            f"{len(reference)}"
        )
    if attention_masks is not None and len(attention_masks) != len(reference):
        raise ValueError(f"got {len(attention_masks)} attention masks for {len(reference)} batches")
    if (pooling is None) != (embedding_output is None):
        raise ValueError("pooling and embedding_output go together: give both or neither")
    if embedding_output is not None and embedding_output not in reference[0]:
        raise ValueError(f"no output {embedding_output!r} to pool; outputs: {sorted(reference[0])}")
    tallies: dict[str, _Tally] = {}
    embedding = _Tally()
    for i, (out, ref) in enumerate(zip(outputs, reference, strict=True)):
        _check_outputs(out, ref, i)
        mask = None if attention_masks is None else attention_masks[i]
        for name, expected in ref.items():
            tallies.setdefault(name, _Tally(logits=name in logits))
            tallies[name].add(out[name], expected, mask)
        if pooling is not None and embedding_output is not None:
            tokens = ref[embedding_output]
            # No mask: every position is a token, as sentence-transformers assumes then.
            sentence_mask = np.ones(tokens.shape[:2], np.int64) if mask is None else mask
            embedding.add(
                pool(out[embedding_output], sentence_mask, pooling),
                pool(tokens, sentence_mask, pooling),
                None,
            )
    return Quality(
        outputs={name: tally.fidelity() for name, tally in tallies.items()},
        embedding=None if pooling is None else embedding.fidelity(),
    )


def _check_outputs(out: Outputs, ref: Outputs, batch: int) -> None:
    missing, extra = sorted(set(ref) - set(out)), sorted(set(out) - set(ref))
    if missing or extra:
        raise ExportMismatch(
            f"batch {batch}: outputs missing {missing}, unexpected {extra}; the reference has "
            f"{sorted(ref)}: re-export the model"
        )
    for name, expected in ref.items():
        if out[name].shape != expected.shape:
            raise ExportMismatch(
                f"batch {batch}: output {name!r} has shape {out[name].shape}, the reference "
                f"{expected.shape}: re-export the model"
            )


@dataclass
class _Tally:
    """Running fidelity of one output over batches."""

    logits: bool = False
    cosines: list[np.ndarray] = field(default_factory=list)
    max_abs: float = 0.0
    max_ref: float = 0.0
    top1_hits: int = 0
    top1_total: int = 0

    def add(self, out: np.ndarray, ref: np.ndarray, mask: np.ndarray | None) -> None:
        n = ref.shape[0]
        a, b = out.astype(np.float64), ref.astype(np.float64)
        # Checked before masking: a NaN at a padded position still poisons anyone who
        # multiplies by the mask, as sentence-transformers' own pooling does.
        finite = _finite_rows(a) & _finite_rows(b)
        token_mask = _token_mask(mask, ref.shape)
        if self.logits:
            self._add_top1(a, b, token_mask, finite)
        if token_mask is not None:
            a, b = np.where(token_mask, a, 0.0), np.where(token_mask, b, 0.0)
        a, b = a.reshape(n, -1), b.reshape(n, -1)
        a[~finite], b[~finite] = 0.0, 0.0
        self.cosines.append(np.where(finite, _cosine(a, b), -1.0))
        worst = float(np.abs(a - b).max(initial=0.0)) if finite.all() else np.inf
        self.max_abs = max(self.max_abs, worst)
        self.max_ref = max(self.max_ref, float(np.abs(b).max(initial=0.0)))

    def _add_top1(
        self, a: np.ndarray, b: np.ndarray, token_mask: np.ndarray | None, finite: np.ndarray
    ) -> None:
        """Argmax over the last axis: per sample for (batch, classes), per real position for
        token-level logits; a (batch, seq) output ranks positions, so pads cannot win."""
        if token_mask is not None and a.ndim == 2:
            a, b = np.where(token_mask, a, -np.inf), np.where(token_mask, b, -np.inf)
            token_mask = None
        agree = a.argmax(axis=-1) == b.argmax(axis=-1)
        agree &= finite.reshape((-1,) + (1,) * (agree.ndim - 1))
        counted = np.ones(agree.shape, bool) if token_mask is None else token_mask[..., 0]
        self.top1_hits += int((agree & counted).sum())
        self.top1_total += int(counted.sum())

    def fidelity(self) -> OutputFidelity:
        cosines = np.concatenate(self.cosines)
        if self.max_ref > 0:
            relative = self.max_abs / self.max_ref
        else:
            relative = 0.0 if self.max_abs == 0 else np.inf
        return OutputFidelity(
            max_abs_err=self.max_abs,
            # Over the largest reference magnitude, not elementwise: elementwise relative error
            # explodes at values near zero, which every activation has plenty of.
            max_rel_err=float(relative),
            cosine_mean=float(cosines.mean()),
            cosine_min=float(cosines.min()),
            top1_agreement=self.top1_hits / self.top1_total
            if self.logits and self.top1_total
            else None,
        )


def _token_mask(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """The (batch, seq) mask broadcast over a token-level output, or None if it is not one."""
    if mask is None or len(shape) < 2 or mask.shape != shape[:2]:
        return None
    present: np.ndarray = mask != 0
    return present.reshape(mask.shape + (1,) * (len(shape) - 2))


def _finite_rows(x: np.ndarray) -> np.ndarray:
    """Per sample: whether every value in it is finite."""
    return np.asarray(np.isfinite(x).reshape(x.shape[0], -1).all(axis=1))


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine; two zero rows agree perfectly, a zero row and another do not at all."""
    norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both = (norm_a > 0) & (norm_b > 0)
    unit_a = a / np.where(both, norm_a, 1.0)[:, None]
    unit_b = b / np.where(both, norm_b, 1.0)[:, None]
    dot = np.einsum("ij,ij->i", unit_a, unit_b)
    neither = (norm_a == 0) & (norm_b == 0)
    return np.clip(np.where(both, dot, np.where(neither, 1.0, 0.0)), -1.0, 1.0)


def quality_to_dict(quality: Quality) -> dict[str, Any]:
    return {
        "embedding": None if quality.embedding is None else dataclasses.asdict(quality.embedding),
        "outputs": {name: dataclasses.asdict(f) for name, f in quality.outputs.items()},
    }


def quality_from_dict(data: dict[str, Any]) -> Quality:
    embedding = data["embedding"]
    return Quality(
        outputs={name: OutputFidelity(**f) for name, f in data["outputs"].items()},
        embedding=None if embedding is None else OutputFidelity(**embedding),
    )


@dataclass(frozen=True, slots=True)
class Tolerance:
    """Elementwise bound |out - ref| <= atol + rtol * |ref|, as numpy.allclose."""

    atol: float = 1e-4
    rtol: float = 1e-3


FP32 = Tolerance()


def fidelity(
    model: Model, session: Session, batches: Sequence[Batch], reference: Sequence[Outputs]
) -> Quality:
    """How close `session` comes to `reference` on `batches`, by the model family's measure
    (a sentence encoder's pooled vector too): for candidates that are not meant to be exact."""
    outputs = [session.run(batch) for batch in batches]
    return model.family.compare(outputs, reference, batches, model.logits)


def check_close(out: Outputs, ref: Outputs, tolerance: Tolerance, *, where: str) -> None:
    """One line naming the first output that is missing, misshapen or out of tolerance."""
    for name, expected in ref.items():
        got = out.get(name)
        if got is None:
            raise ExportMismatch(f"{where}: output '{name}' is missing (got {sorted(out)})")
        if got.shape != expected.shape:
            raise ExportMismatch(
                f"{where}: output '{name}' has shape {got.shape}, expected {expected.shape}"
            )
        error = np.abs(got.astype(np.float64) - expected)
        bound = tolerance.atol + tolerance.rtol * np.abs(expected.astype(np.float64))
        if not np.all(error <= bound):  # also catches NaN
            raise ExportMismatch(
                f"{where}: output '{name}' differs from the original by up to "
                f"{float(error.max()):.3g} "
                f"(tolerance {tolerance.atol:g} + {tolerance.rtol:g}*|ref|); a shape or "
                "constant was probably fixed at export time"
            )
