"""Pool inside the model: a sentence encoder's torch artifact answers with its sentence
embedding instead of every token's vector.

The embedding is what a sentence encoder's users get (`pooling.py`), and pooling it where the
tokens were computed means only (batch, hidden) floats leave the device. On a GPU that is the
difference between copying and pooling 100 MB on the host per 256x128 batch of BERT-base and
copying 0.8 MB (benchmarks/README.md). The artifact's only output is "sentence_embedding", so
its fidelity is the embedding's (the text family compares it with the reference's pooled
tokens) and serving returns it as is.
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


@dataclass(frozen=True, slots=True)
class PoolInModel:
    """The sentence embedding computed inside the torch module (float32, as numpy pools it).
    Exact up to float summation order: embedding cosine > 0.99999 against host pooling."""

    version: int = 1
    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ("torch",)


def pool_in_model(artifact: Artifact, config: PoolInModel, ctx: PassContext) -> Artifact:
    from mahir.modules import PooledEmbedding

    family = ctx.model.family
    if not isinstance(family, Text) or family.pooling is None:
        raise Unsupported(f"{ctx.model.name} is not a sentence encoder: nothing to pool")
    if "attention_mask" not in artifact.spec.input_names:
        raise Unsupported(f"{ctx.model.name} takes no attention mask to pool with")
    pooling = family.pooling
    module = PooledEmbedding(artifact.module, pooling.mode, pooling.normalize).eval()
    spec = replace(artifact.spec, outputs=(EMBEDDING,))
    return artifact.derive(module=module, spec=spec, pooled=pooling.mode)
