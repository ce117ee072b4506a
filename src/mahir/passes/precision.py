"""Lower float precision: fp16 ONNX graphs and bf16/fp16 torch modules.

fp16 halves the weights and pays on GPUs; on CPUs ONNX Runtime emulates most fp16 ops, so it is
rarely faster there and mostly a size win. bf16 pays on CPUs with avx512_bf16 or AMX. OpenVINO's
bf16/f16 is a runtime setting (`OpenVinoOptions.precision`), not a pass: the IR stays
fp32 and the plugin converts at compile time.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from mahir.errors import Unsupported, first_line
from mahir.types import Artifact, ArtifactFormat

if TYPE_CHECKING:
    from mahir.passes import PassContext


@dataclass(frozen=True, slots=True)
class Float16:
    """fp16 weights and compute in an ONNX graph; inputs and outputs stay fp32.
    Documented fidelity on all-MiniLM-L6-v2: embedding cosine > 0.9999."""

    keep_io_types: bool = True
    """Keep the model's inputs and outputs fp32, so callers do not change."""
    version: int = 1
    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ("onnx",)


@dataclass(frozen=True, slots=True)
class TorchLowPrecision:
    """A copy of the torch module in bf16 or fp16, its fp32 contract kept by casts at the edges.
    Documented fidelity on all-MiniLM-L6-v2 in bf16: embedding cosine mean > 0.999."""

    dtype: Literal["bfloat16", "float16"] = "bfloat16"
    version: int = 1
    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ("torch",)


def float16(artifact: Artifact, config: Float16, ctx: PassContext) -> Artifact:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(artifact.path))
    try:
        converted = convert_float_to_float16(model, keep_io_types=config.keep_io_types)
    except Exception as err:  # the converter raises plain exceptions for graphs it cannot handle
        raise Unsupported(f"fp16 conversion failed: {first_line(err)}") from err
    out = ctx.workdir / "model.onnx"
    onnx.save(converted, str(out))
    return artifact.derive(out, precision="fp16")


def torch_low_precision(
    artifact: Artifact, config: TorchLowPrecision, ctx: PassContext
) -> Artifact:
    import torch

    from mahir.modules import LowPrecision

    if config.dtype == "bfloat16" and not (
        ctx.machine.has("avx512_bf16") or ctx.machine.has("amx_bf16") or ctx.machine.gpus
    ):
        raise Unsupported("bf16 needs avx512_bf16, AMX or a GPU; this CPU would emulate it slowly")
    dtype = getattr(torch, config.dtype)
    module = LowPrecision(copy.deepcopy(artifact.module), dtype).eval()
    return artifact.derive(module=module, precision=config.dtype)
