"""fp8 matmuls on a GPU through torchao: e4m3 weights, activations quantized per row each call.

A big batch of an encoder is bound by its matmuls (BERT-base at 256x128 in bf16 reaches ~60%
of an H200's measured bf16 matmul peak), and fp8 tensor cores (compute capability 8.9: Ada,
Hopper) double that peak. torchao's `Float8DynamicActivationFloat8WeightConfig` swaps every
nn.Linear's weight for an fp8 tensor with one scale per output row; each call scales each
activation row to fp8 and multiplies with `torch._scaled_mm`, accumulating in fp32. Small
matmuls (batch 1) gain nothing and pay the quantization: the search measures which wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from mahir.errors import Unsupported, first_line
from mahir.passes.prune import torch_copy
from mahir.passes.torchao import import_torchao
from mahir.types import Artifact, ArtifactFormat

if TYPE_CHECKING:
    from mahir.passes import PassContext

FP8_COMPUTE_CAPABILITY = (8, 9)


@dataclass(frozen=True, slots=True)
class TorchaoFloat8:
    """fp8 (e4m3) weights and per-row dynamic fp8 activations for every nn.Linear whose sizes
    fp8 kernels take (multiples of 16). Apply after bf16 (`TorchLowPrecision("bfloat16")`)."""

    version: int = 1
    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ("torch",)


def torchao_float8(artifact: Artifact, config: TorchaoFloat8, ctx: PassContext) -> Artifact:
    import_torchao()
    import torch
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    module = torch_copy(artifact, "TorchaoFloat8")

    def fits(layer: Any, _: str) -> bool:
        return isinstance(layer, torch.nn.Linear) and all(
            size % 16 == 0 for size in layer.weight.shape
        )

    layers = sum(fits(m, "") for m in module.modules())
    if layers == 0:
        raise Unsupported(f"{ctx.model.name} has no nn.Linear layer fp8 kernels can take")
    recipe = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    try:
        quantize_(module, recipe, filter_fn=fits)
    except Exception as err:  # torchao raises plain exceptions for layers it cannot handle
        raise Unsupported(f"torchao float8 failed: {first_line(err)}") from err
    return artifact.derive(
        module=module, format="torch", quantized="torchao-float8", fp8_layers=layers
    )
