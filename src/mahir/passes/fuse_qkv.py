"""Fuse query, key and value: one matmul a layer where a BERT-style encoder's attention has three.

The three projections read the same input. As three `nn.Linear`s they are three matmuls with a
768-wide output each (BERT-base), and under fp8 with static scales three casts of that one
input to fp8, each a full pass over a 32,768 x 768 activation at 256x128. As one `nn.Linear` of
the three weights stacked (`mahir/fused_qkv.py`), the input is read and cast once and the matmul
is 2,304 wide. The answers are the same up to float summation order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from mahir.errors import Unsupported
from mahir.passes.prune import torch_copy
from mahir.types import Artifact, ArtifactFormat

if TYPE_CHECKING:
    from mahir.passes import PassContext


@dataclass(frozen=True, slots=True)
class FuseQKV:
    """Query, key and value of each encoder self-attention as one `nn.Linear`."""

    version: int = 1
    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ("torch",)


def fuse_qkv(artifact: Artifact, config: FuseQKV, ctx: PassContext) -> Artifact:
    from mahir.fused_qkv import SELF_ATTENTION, FusedSelfAttention, fusable

    module = torch_copy(artifact, "FuseQKV")
    fused = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if fusable(child):
                setattr(parent, name, FusedSelfAttention(child))
                fused += 1
    if fused == 0:
        raise Unsupported(
            f"{ctx.model.name} has no encoder self-attention to fuse (mahir fuses "
            f"{', '.join(sorted(SELF_ATTENTION))})"
        )
    return artifact.derive(module=module, fused_qkv=fused)
