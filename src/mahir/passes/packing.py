"""Pack sequences: a sentence encoder runs each batch as one row of real tokens, no padding.

Text is ragged: in batches of 256 generated sentences (median ~20 tokens) a padded batch
computes ~5x the real tokens in arrival order and ~1.6x even sorted by length; packed, BERT-base
fp16 on an H200 runs 66k sentences/s against 15.7k padded (issue notes). The module answers
with the sentence embedding, pooled per sentence inside (`mahir/varlen.py`), and its session
packs padded batches on the host (`runtimes/packing.py`), so callers, the batcher and the
fidelity check see the usual contract. Attention runs per sentence through PyTorch's varlen
flash attention on a GPU; on a CPU a masked fallback keeps it correct but slow, so only the
GPU candidates propose it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

from mahir.errors import Unsupported
from mahir.families.text import Text
from mahir.pooling import EMBEDDING
from mahir.types import Artifact, ArtifactFormat

if TYPE_CHECKING:
    from mahir.passes import PassContext

DEFAULT_MAX_LENGTH = 512
"""Longest sentence the attention kernel is sized for when the model does not say."""


@dataclass(frozen=True, slots=True)
class PackSequences:
    """Padding-free execution of a sentence encoder, pooled inside (replaces `PoolInModel`).
    Exact up to float summation order against the padded model."""

    version: int = 1
    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ("torch",)


def pack_sequences(artifact: Artifact, config: PackSequences, ctx: PassContext) -> Artifact:
    from mahir.varlen import MODEL_TYPES, PackedEncoder, encoder_inside

    family, name = ctx.model.family, ctx.model.name
    if not isinstance(family, Text) or family.pooling is None:
        raise Unsupported(f"{name} is not a sentence encoder: packing pools inside the model")
    spec = artifact.spec
    if spec.packed or spec.outputs == (EMBEDDING,):
        raise Unsupported(f"{name} is already pooled or packed: pack the token model")
    if "attention_mask" not in spec.input_names or spec.sequence_inputs != set(spec.input_names):
        raise Unsupported(f"{name} does not take (batch, sequence) token inputs with a mask")
    encoder = encoder_inside(artifact.module)
    model_type = getattr(getattr(encoder, "config", None), "model_type", None)
    if model_type not in MODEL_TYPES:
        raise Unsupported(
            f"packing knows {', '.join(sorted(MODEL_TYPES))} encoders, not {model_type or 'this'}"
        )
    pooling = family.pooling
    length = spec.max_sequence or DEFAULT_MAX_LENGTH
    module = PackedEncoder(encoder, pooling.mode, pooling.normalize, length).eval()
    packed = replace(spec, outputs=(EMBEDDING,), packed=True)
    return artifact.derive(module=module, spec=packed, packed=pooling.mode)
