"""PyTorch int8 through torchao, for the torch runtimes ("torch" and "torch-compile").

Two routes. `TorchaoInt8` swaps the weight of every nn.Linear in a copy of the module for
torchao's int8 tensor subclass (`quantize_`). With dynamic activations each call quantizes the
activations per token and multiplies int8 x int8 (`torch._int_mm`, fast with VNNI or AMX). It
pays under torch-compile, where inductor fuses the quantization around the matmuls; eager, those
small ops cost more than the int8 matmuls save. Weight-only keeps float matmuls on weights
dequantized each call: a memory saving, rarely faster on a CPU. torch 2.13
warns once, on the first compile, that torchao 0.18's Int8Tensor has no stable cache hash; the
compile goes on with a default hash.

`Pt2eInt8` goes through PT2E: `torch.export` the module with its dynamic axes kept dynamic,
let the X86 inductor quantizer place quantize/dequantize pairs around the linears, calibrate
on traffic-shaped batches, convert. The result is a graph of q/dq ops around float ops. Eager
runs it as reference math (slower than fp32); inductor swaps the q/dq + linear patterns for
oneDNN int8 kernels, but only while it freezes the weights (`torch._inductor.config.freezing`
or TORCHINDUCTOR_FREEZING=1, in effect when the module is first called): compiled without
freezing, the linears run in float.

torchao's own inductor tuning (`set_inductor_config`) is process-wide state; it stays off.
PyTorch-core PT2E quantizers are gone (DESIGN.md): the quantizer comes from torchao.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from mahir.errors import Unsupported, first_line
from mahir.passes.quantize import choose_reduce_range
from mahir.silence import silenced
from mahir.types import Artifact, ArtifactFormat

if TYPE_CHECKING:
    from mahir.passes import PassContext

INSTALL = "pip install torchao==0.18.0"


@dataclass(frozen=True, slots=True)
class TorchaoInt8:
    """int8 weights for every nn.Linear through torchao's `quantize_`. Documented fidelity on
    all-MiniLM-L6-v2, sentence-embedding cosine: dynamic activations mean >= 0.993, worst
    >= 0.985 (>= 0.985 / 0.965 on CPUs without VNNI, whose 7-bit ranges cost MiniLM fidelity but
    keep a small MLP's compiled kernels from saturating); weight-only mean >= 0.998, worst
    >= 0.997 (tests assert it)."""

    weight_only: bool = False
    """Keep activations in float: the matmul runs in fp32 on dequantized weights, so it saves
    memory but is rarely faster on a CPU. Default: int8 x int8, per-token dynamic activations."""
    reduce_range: bool | None = None
    """7-bit activations and weights, against u8*s8 overflow on CPUs without VNNI; None: on
    when the CPU has no int8 dot-product instructions. Only for dynamic activations."""
    version: int = 1
    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ("torch",)

    def __post_init__(self) -> None:
        if self.weight_only and self.reduce_range:
            raise ValueError(
                "reduce_range protects int8 x int8 products; weight-only int8 multiplies in "
                "float: drop reduce_range or weight_only"
            )


@dataclass(frozen=True, slots=True)
class Pt2eInt8:
    """int8 through torch.export + torchao's PT2E X86 inductor quantizer: int8 weights per
    channel, activations per tensor with ranges calibrated on `ctx.calibration` (or computed per
    call with `dynamic`). Runs int8 kernels under torch-compile with inductor freezing.
    Documented fidelity on all-MiniLM-L6-v2, sentence-embedding cosine mean >= 0.985, worst
    >= 0.975, static or dynamic (>= 0.96 / 0.925 on CPUs without VNNI, with 7-bit ranges; tests
    assert it for static)."""

    dynamic: bool = False
    """Activation ranges computed on each call instead of calibrated: no calibration needed."""
    reduce_range: bool | None = None
    """7-bit activations, against u8*s8 overflow on CPUs without VNNI; None: on when the CPU has
    no int8 dot-product instructions."""
    calibration_batches: int = 32
    """At most this many batches of `ctx.calibration` go through the observers."""
    version: int = 1
    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ("torch",)

    def __post_init__(self) -> None:
        if self.calibration_batches < 1:
            raise ValueError(f"calibration_batches must be >= 1, got {self.calibration_batches}")


def torchao_int8(artifact: Artifact, config: TorchaoInt8, ctx: PassContext) -> Artifact:
    reduce_range = not config.weight_only and choose_reduce_range(config.reduce_range, True, ctx)
    return quantize_linears(artifact, config, reduce_range=reduce_range, name=ctx.model.name)


def quantize_linears(
    artifact: Artifact, config: TorchaoInt8, *, reduce_range: bool = False, name: str = "the model"
) -> Artifact:
    """`TorchaoInt8` on a copy of any torch module's nn.Linear layers, without a pass context:
    what a decoder LLM's artifact takes (weight-only int8 needs no calibration and no CPU
    check). `reduce_range` is `torchao_int8`'s choice, for dynamic activations only."""
    import_torchao()
    import torch
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    module = _copy(artifact)
    linears = sum(isinstance(m, torch.nn.Linear) for m in module.modules())
    if linears == 0:
        raise Unsupported(f"{name} has no nn.Linear layer for torchao int8 to quantize")
    recipe: Any = (
        Int8WeightOnlyConfig(set_inductor_config=False)
        if config.weight_only
        else Int8DynamicActivationInt8WeightConfig(
            reduce_range=reduce_range, set_inductor_config=False
        )
    )
    try:
        quantize_(module, recipe)
    except Exception as err:  # torchao raises plain exceptions for layers it cannot handle
        raise Unsupported(f"torchao int8 failed: {first_line(err)}") from err
    return artifact.derive(
        module=module,
        format="torch",
        quantized="torchao-int8-weight-only" if config.weight_only else "torchao-int8-dynamic",
        int8_layers=linears,
        reduce_range=reduce_range,
    )


def pt2e_int8(artifact: Artifact, config: Pt2eInt8, ctx: PassContext) -> Artifact:
    import_torchao()
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    if not config.dynamic and not ctx.calibration:
        raise Unsupported(
            "static PT2E int8 needs calibration inputs; give sample data or a workload, "
            "or use Pt2eInt8(dynamic=True)"
        )
    graph = _export(artifact, ctx)
    if not any(node.target == torch.ops.aten.linear.default for node in graph.graph.nodes):
        raise Unsupported(f"{ctx.model.name} has no linear layer for PT2E int8 to quantize")
    reduce_range = choose_reduce_range(config.reduce_range, True, ctx)
    quantizer = x86.X86InductorQuantizer().set_global(
        x86.get_default_x86_inductor_quantization_config(
            is_dynamic=config.dynamic, reduce_range=reduce_range
        )
    )
    # Weight observers see the weights only in a forward pass: dynamic int8 needs one too.
    batches = ctx.calibration[: config.calibration_batches] or (ctx.model.example_inputs,)
    names = artifact.spec.input_names
    try:
        prepared = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for batch in batches:
                prepared(*(torch.from_numpy(batch[name]) for name in names))
        converted = convert_pt2e(prepared)
    except Exception as err:  # torchao raises plain exceptions for graphs it cannot handle
        raise Unsupported(f"PT2E int8 failed: {first_line(err)}") from err
    _drop_unused_parameters(converted)
    return artifact.derive(
        module=_inference_module(converted, names),
        format="torch",
        quantized="pt2e-int8-dynamic" if config.dynamic else "pt2e-int8-static",
        int8_layers=sum(b.dtype == torch.int8 for b in converted.buffers()),
        reduce_range=reduce_range,
    )


def _export(artifact: Artifact, ctx: PassContext) -> Any:
    """A copy of the module as an ATen graph, every named axis dynamic (a size the model fixes
    raises here, not later at another shape). Dead nodes go: an unused output such as BERT's pooler
    leaves a Linear -> Tanh pair with no output, which the X86 quantizer cannot annotate."""
    import torch

    from mahir.modules import PositionalInputs

    names = artifact.spec.input_names
    example = ctx.calibration[0] if ctx.calibration else ctx.model.example_inputs
    args = tuple(torch.from_numpy(example[name]) for name in names)
    dynamic = torch.export.Dim.DYNAMIC
    axes = (tuple(dict.fromkeys(t.dynamic_axes, dynamic) for t in artifact.spec.inputs),)
    adapter = PositionalInputs(_copy(artifact), names).eval()
    with silenced(("torch.export", "torch._export")):
        try:
            graph = torch.export.export(adapter, args, dynamic_shapes=axes).module()
        except Exception as err:  # torch.export raises many types; all mean "cannot export"
            raise Unsupported(
                f"PT2E int8 cannot export {ctx.model.name}: {first_line(err)}"
            ) from err
    graph.graph.eliminate_dead_code()
    graph.recompile()
    return graph


def _copy(artifact: Artifact) -> Any:
    """A copy of the live module in eval mode: the input artifact stays as it was."""
    if artifact.module is None:
        raise Unsupported(f"int8 through torchao needs a live torch module, not {artifact.path}")
    return copy.deepcopy(artifact.module).eval()


def _drop_unused_parameters(graph: Any) -> None:
    """convert_pt2e folds each quantized weight into an int8 constant but leaves the fp32
    original attached to the graph module, unused: half again the memory of the fp32 model."""
    used = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    for name, _ in list(graph.named_parameters()):
        if name not in used:
            owner, _, attribute = name.rpartition(".")
            delattr(graph.get_submodule(owner), attribute)


def _inference_module(converted: Any, names: tuple[str, ...]) -> Any:
    """The converted graph called by keyword. An exported graph module says training=True though
    it was traced in eval mode, and torchao forbids `.eval()` on it: the graph is fixed, so only
    the flags are set, for the runtime's training-mode check."""
    from mahir.modules import KeywordInputs

    module = KeywordInputs(converted, names)
    for sub in module.modules():
        sub.training = False
    return module


def import_torchao() -> None:
    """torchao logs a line for each C++ extension it cannot load (CUDA and MX kernels a CPU
    build has no use for), and torch logs a deprecation line for each enum torchao registers
    with pytree: both at import, both noise, so the import runs silenced. And torch warns, at
    the first compile of a model holding torchao's weight tensors, that they bring no hash for
    its compile cache (the cache is then keyed otherwise): one message about torchao's own
    classes, filtered by its text, which no warning of the user's matches."""
    warnings.filterwarnings("ignore", message=r".* does not implement _stable_hash_for_caching")
    try:
        with silenced(("torchao", "torch.utils._pytree")):
            import torchao.quantization  # noqa: F401
    except ImportError as err:
        raise Unsupported(f"torchao int8 needs torchao: {INSTALL}") from err
