"""fp8 matmuls on a GPU through torchao: e4m3 weights, activations scaled to fp8 each call.

A big batch of an encoder is bound by its matmuls (BERT-base at 256x128 in bf16 reaches ~60%
of an H200's measured bf16 matmul peak), and fp8 tensor cores (compute capability 8.9: Ada,
Hopper) double that peak. Every nn.Linear's weight becomes an fp8 tensor and each call
multiplies with `torch._scaled_mm`, accumulating in fp32. Two scalings of the activations:

- dynamic (`Float8DynamicActivationFloat8WeightConfig`, per row): each call finds each row's
  range first, one more pass over every activation before its matmul;
- static (torchao's prototype observer flow, per tensor): each layer's scale is observed once on
  the calibration inputs and fixed, so a call only casts. BERT-base at 256x128 on an H100:
  1.27-1.30x eager bf16 against 1.05x dynamic per row (`benchmarks/gpu_fp8.py`). A value beyond
  the observed range saturates at fp8's largest, which the search's fidelity check, on inputs
  the calibration did not see, would catch.

Small matmuls (batch 1) gain nothing and pay the quantization: the search measures which wins.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from mahir.errors import Unsupported, first_line
from mahir.passes.prune import torch_copy
from mahir.passes.torchao import import_torchao
from mahir.types import Artifact, ArtifactFormat

if TYPE_CHECKING:
    from mahir.passes import PassContext

FP8_COMPUTE_CAPABILITY = (8, 9)


@dataclass(frozen=True, slots=True)
class TorchaoFloat8:
    """fp8 (e4m3) weights and activations for every nn.Linear whose sizes fp8 kernels take
    (multiples of 16). Apply after bf16 (`TorchLowPrecision("bfloat16")`)."""

    scaling: Literal["dynamic", "static"] = "dynamic"
    """dynamic: each activation row scaled on each call; static: one scale per layer, observed
    on `ctx.calibration`."""
    calibration_batches: int = 8
    """static: at most this many calibration batches go through the observers."""
    version: int = 1
    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ("torch",)

    def __post_init__(self) -> None:
        if self.scaling not in ("dynamic", "static"):
            raise ValueError(f"scaling must be 'dynamic' or 'static', got {self.scaling!r}")
        if self.calibration_batches < 1:
            raise ValueError(f"calibration_batches must be >= 1, got {self.calibration_batches}")


def torchao_float8(artifact: Artifact, config: TorchaoFloat8, ctx: PassContext) -> Artifact:
    import_torchao()
    import torch
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    if config.scaling == "static" and not ctx.calibration:
        raise Unsupported("static fp8 needs calibration inputs; give sample data or a workload")
    module = torch_copy(artifact, "TorchaoFloat8")

    def fits(layer: Any, _: str) -> bool:
        return isinstance(layer, torch.nn.Linear) and all(
            size % 16 == 0 for size in layer.weight.shape
        )

    layers = sum(fits(m, "") for m in module.modules())
    if layers == 0:
        raise Unsupported(f"{ctx.model.name} has no nn.Linear layer fp8 kernels can take")
    try:
        if config.scaling == "static":
            _quantize_static(module, fits, config, ctx)
        else:
            recipe = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
            quantize_(module, recipe, filter_fn=fits)
    except Exception as err:  # torchao raises plain exceptions for layers it cannot handle
        raise Unsupported(f"torchao float8 failed: {first_line(err)}") from err
    return artifact.derive(
        module=module,
        format="torch",
        quantized=f"torchao-float8-{config.scaling}",
        fp8_layers=layers,
    )


def _quantize_static(
    module: Any, fits: Callable[[Any, str], bool], config: TorchaoFloat8, ctx: PassContext
) -> None:
    """Observers on the layers that `fits`, the calibration batches through them (each
    records its input's largest magnitude), then fp8 layers with those scales fixed."""
    import torch
    from torchao.prototype.quantization.quant_api import (
        Float8StaticActivationFloat8WeightConfig as Static,
    )
    from torchao.quantization import PerTensor, quantize_

    quantize_(module, Static(step="prepare", granularity=PerTensor()), filter_fn=fits)
    with torch.inference_mode():
        for batch in ctx.calibration[: config.calibration_batches]:
            module(**{name: torch.from_numpy(array) for name, array in batch.items()})
    quantize_(module, Static(step="convert", granularity=PerTensor()))
    module.eval()  # the converted layers are new modules, made in training mode
