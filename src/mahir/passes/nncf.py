"""OpenVINO int8 through NNCF post-training quantization: weights and activations in int8, with
activation ranges calibrated on traffic-shaped inputs (`ctx.calibration`).

`NncfInt8` quantizes every layer NNCF's patterns allow. `NncfAccuracyControl` checks that
result against the fp32 original (the sentence embedding, or the first output) and, when it
falls by more than `max_drop`, lets NNCF revert the most sensitive layers to float: the speed
of int8 where it is harmless, float where it is not. Both read a fresh copy of the input IR
(NNCF may change the model object it is given) and write a new IR into `ctx.workdir`; weights
are stored in int8, activations carry FakeQuantize nodes that the CPU plugin runs in int8.
On a CPU without int8 dot-product instructions (VNNI or AMX) the plugin multiplies u8 x s8 in
pairs summed into int16, which saturates: there NNCF's overflow fix (weights in 7 bits) is on for
every layer, not just the first (MLP cosine 0.975 -> 0.999 on an AVX2-only AMD EPYC).

NNCF is slow to import, so it is imported inside the functions. Passes sit above runtimes and
export; this room knows nothing of search or serving.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from mahir.errors import BadInput, Unsupported, first_line
from mahir.silence import silenced
from mahir.types import Artifact, ArtifactFormat, Outputs
from mahir.workload import Batch

if TYPE_CHECKING:
    import openvino as ov

    from mahir.passes import PassContext

# Layers whose arithmetic NNCF moves to int8; with constant weights they are what `meta` counts.
COMPUTE_OPS = frozenset({"MatMul", "Convolution", "GroupConvolution", "ConvolutionBackpropData"})


@dataclass(frozen=True, slots=True)
class NncfInt8:
    """Post-training int8 quantization with NNCF, for OpenVINO. Documented fidelity on
    all-MiniLM-L6-v2 (OpenVINO f32 hint, batches of 1-8 sentences of 3-128 tokens), tests
    assert it: sentence-embedding cosine mean >= 0.985, worst >= 0.96 (measured 0.995 and
    0.981). The .bin is 0.25 of fp32: the weights, the embedding tables too, are stored int8."""

    preset: Literal["performance", "mixed"] = "mixed"
    """"performance": symmetric activations (fastest); "mixed": asymmetric activations, which
    fit the one-sided ranges after GELU and softmax better."""
    transformer: bool | None = None
    """Use NNCF's transformer patterns (attention kept whole, SmoothQuant); None: on for text
    models."""
    subset_size: int = 300
    """Calibration batches NNCF reads at most (it uses all of `ctx.calibration` if fewer)."""
    fast_bias_correction: bool = True
    """The quick bias correction; False runs the full one, slower and sometimes closer."""
    version: int = 1
    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ("openvino",)

    def __post_init__(self) -> None:
        _check_subset_size(self.subset_size)


@dataclass(frozen=True, slots=True)
class NncfAccuracyControl:
    """NNCF int8 that keeps the most sensitive layers in float, so that the mean cosine of the
    pooled sentence embedding (or of the first output) to the fp32 original, on
    `ctx.calibration`, falls at most `max_drop`; `meta["float_layers"]` names them. Plain
    `NncfInt8` first; when that loses too much, NNCF's accuracy control on a quantization
    without SmoothQuant ranks the layers and reverts the worst, one validation run per step.
    Raises `Unsupported` when no mix of int8 and float layers gets there.

    Documented fidelity on all-MiniLM-L6-v2 (batches of 1-8 sentences of 3-128 tokens): with
    the default max_drop, that of `NncfInt8` (no layer float; tests assert mean >= 0.985, worst
    >= 0.96). With max_drop=0.003: 8 of 36 layers float, cosine mean 0.9965, worst 0.994,
    in 53 s on 2 cores (`max_steps` bounds the time)."""

    max_drop: float = 0.01
    """Largest fall of the mean cosine from the fp32 model's (~1.0) that is accepted."""
    preset: Literal["performance", "mixed"] = "mixed"
    """As in `NncfInt8`."""
    transformer: bool | None = None
    """As in `NncfInt8`; None: on for text models."""
    subset_size: int = 300
    """Calibration batches NNCF reads at most, and batches used to rank layers."""
    max_steps: int | None = None
    """Revert at most this many times (each step reverts the layers that share a quantizer, and
    costs a validation run); None: until `max_drop` is met or every layer is float."""
    version: int = 1
    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ("openvino",)

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_drop < 1.0:
            raise ValueError(f"max_drop must be in [0, 1) (a fall in cosine), got {self.max_drop}")
        _check_subset_size(self.subset_size)
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None (no limit), got {self.max_steps}")


def nncf_int8(artifact: Artifact, config: NncfInt8, ctx: PassContext) -> Artifact:
    calibration = _calibration(ctx, "NNCF int8")
    model = read_ir(artifact)
    before = _count(model, "FakeQuantize")
    quantized = _quantize(model, calibration, config, ctx)
    inserted = _count(quantized, "FakeQuantize") - before
    if inserted == 0:
        raise Unsupported("NNCF found no layer to quantize in int8")
    out = save_ir(quantized, artifact, ctx)
    return artifact.derive(
        out,
        quantized="nncf-int8",
        preset=config.preset,
        overflow_fix=_overflow_fix(ctx).value,
        transformer=_is_transformer(config.transformer, ctx),
        fake_quantize=inserted,
        **_layer_counts(quantized),
    )


def nncf_accuracy_control(
    artifact: Artifact, config: NncfAccuracyControl, ctx: PassContext
) -> Artifact:
    calibration = _calibration(ctx, "NNCF accuracy control")
    score = _Scorer(ctx, calibration)
    plain = NncfInt8(config.preset, config.transformer, config.subset_size)
    quantized = _quantize(read_ir(artifact), calibration, plain, ctx)
    cosine = score.mean(quantized)
    smooth_quant = True
    if 1.0 - cosine > config.max_drop:
        # Reverting layers of a SmoothQuant-ed model made the drop larger, not smaller (MiniLM:
        # 0.004 -> 0.027 in six steps), so layers are reverted in a quantization without it.
        quantized = _restore_accuracy(read_ir(artifact), calibration, score, config, ctx)
        cosine = score.mean(quantized)
        smooth_quant = False
    # NNCF measures the drop from the fp32 IR, which is itself ~1e-6 from the original.
    if 1.0 - cosine > config.max_drop + 1e-5:
        raise Unsupported(
            f"int8 with accuracy control reaches cosine {cosine:.4f}, a drop of "
            f"{1.0 - cosine:.4f} > max_drop {config.max_drop}: allow a larger drop or more steps"
        )
    out = save_ir(quantized, artifact, ctx)
    return artifact.derive(
        out,
        quantized="nncf-int8-accuracy-control",
        preset=config.preset,
        transformer=_is_transformer(config.transformer, ctx),
        smooth_quant=smooth_quant and _is_transformer(config.transformer, ctx),
        max_drop=config.max_drop,
        validation_cosine=round(cosine, 6),
        fake_quantize=_count(quantized, "FakeQuantize"),
        **_layer_counts(quantized),
    )


def _quantize(
    model: ov.Model, calibration: Sequence[Batch], config: NncfInt8, ctx: PassContext
) -> ov.Model:
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    with silenced(("nncf",)):  # NNCF logs steps, draws progress bars
        try:
            return nncf.quantize(
                model,
                nncf.Dataset(calibration),
                preset=_preset(config.preset),
                model_type=_model_type(config.transformer, ctx),
                subset_size=min(config.subset_size, len(calibration)),
                fast_bias_correction=config.fast_bias_correction,
                advanced_parameters=AdvancedQuantizationParameters(overflow_fix=_overflow_fix(ctx)),
            )
        except Exception as err:  # nncf raises its own errors, RuntimeError, ValueError, ...
            raise Unsupported(f"NNCF int8 quantization failed: {first_line(err)}") from err


def _restore_accuracy(
    model: ov.Model,
    calibration: Sequence[Batch],
    score: _Scorer,
    config: NncfAccuracyControl,
    ctx: PassContext,
) -> ov.Model:
    """NNCF's accuracy control on a quantization without SmoothQuant: it ranks the quantized
    layers by their effect on `score` and reverts the worst until the drop is within bounds."""
    import nncf
    from nncf.quantization.advanced_parameters import (
        AdvancedAccuracyRestorerParameters,
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
    )

    # Items carry their index so the validation function finds each batch's reference.
    dataset = nncf.Dataset(list(enumerate(calibration)), _batch_of)
    steps = {} if config.max_steps is None else {"max_num_iterations": config.max_steps}
    with silenced(("nncf",)):  # NNCF logs steps, draws progress bars
        try:
            restored = nncf.quantize_with_accuracy_control(
                model,
                dataset,
                dataset,
                score.validate,
                max_drop=config.max_drop,
                preset=_preset(config.preset),
                model_type=_model_type(config.transformer, ctx),
                subset_size=min(config.subset_size, len(calibration)),
                advanced_quantization_parameters=AdvancedQuantizationParameters(
                    overflow_fix=_overflow_fix(ctx),
                    smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1),
                ),
                advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(**steps),
            )
        except Exception as err:  # nncf raises its own errors, RuntimeError, ValueError, ...
            raise Unsupported(f"NNCF accuracy control failed: {first_line(err)}") from err
    if _count(restored, "FakeQuantize") == 0:
        raise Unsupported(f"every layer had to stay float to lose less than {config.max_drop}")
    return restored


def _overflow_fix(ctx: PassContext) -> Any:
    """Every layer's weights in 7 bits where the CPU lacks int8 dot products (its u8 x s8
    pair sums saturate), else NNCF's default (the first layer only)."""
    from nncf.quantization.advanced_parameters import OverflowFix

    return OverflowFix.FIRST_LAYER if ctx.machine.int8_dot_product else OverflowFix.ENABLE


class _Scorer:
    """The accuracy-control metric: per batch, the mean cosine of the pooled sentence embedding
    (or of the first output) to the fp32 original's; higher is better, 1.0 is exact."""

    def __init__(self, ctx: PassContext, batches: Sequence[Batch]) -> None:
        from mahir.runtimes import reference_outputs

        self._model = ctx.model
        self._batches = batches
        self._reference = reference_outputs(ctx.model, batches)

    def validate(
        self, compiled: ov.CompiledModel, items: Iterable[tuple[int, Batch]]
    ) -> tuple[float, list[float]]:
        """NNCF's validation function: the metric over `items` and the value of each item.
        (NNCF takes an exception here as a sign to compare raw outputs instead: keep it total.)"""
        ports = {name: port for port in compiled.outputs for name in port.get_names()}
        wanted = {name: ports[name] for name in self._model.spec.outputs}
        values = [self._score(i, _run(compiled, wanted, batch)) for i, batch in items]
        return float(np.mean(values)), values

    def mean(self, model: ov.Model) -> float:
        """The metric of a quantized model over every batch, compiled in f32 as NNCF does."""
        import openvino as ov

        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return self.validate(compiled, enumerate(self._batches))[0]

    def _score(self, index: int, outputs: Outputs) -> float:
        model, batch = self._model, self._batches[index]
        quality = model.family.compare([outputs], [self._reference[index]], [batch], frozenset())
        fidelity = quality.embedding or quality.outputs[model.spec.outputs[0]]
        return fidelity.cosine_mean


def _run(compiled: ov.CompiledModel, ports: dict[str, Any], batch: Batch) -> Outputs:
    results = compiled(dict(batch))
    return {name: np.asarray(results[port]) for name, port in ports.items()}


def _batch_of(item: tuple[int, Batch]) -> Batch:
    return item[1]


# --- shared by both passes ---------------------------------------------------------------------


def _check_subset_size(subset_size: int) -> None:
    if subset_size < 1:
        raise ValueError(f"subset_size must be >= 1 calibration batch, got {subset_size}")


def _calibration(ctx: PassContext, what: str) -> tuple[Batch, ...]:
    if not ctx.calibration:
        raise Unsupported(f"{what} needs calibration inputs; give sample data or a workload")
    return ctx.calibration


def read_ir(artifact: Artifact) -> ov.Model:
    """A fresh model object from the IR, so nothing NNCF does to it reaches the input."""
    import openvino as ov

    if artifact.path is None or not Path(artifact.path).is_file():
        raise BadInput(f"no OpenVINO IR at {artifact.path}; convert the model first")
    return ov.Core().read_model(str(artifact.path))


def save_ir(model: ov.Model, artifact: Artifact, ctx: PassContext) -> Path:
    """Write the IR as `model.xml` in the workdir, never over the input (whose .bin the input
    model may still map)."""
    import openvino as ov

    out = ctx.workdir / "model.xml"
    if artifact.path is not None and out.resolve() == Path(artifact.path).resolve():
        raise BadInput(f"the pass would write over its input {out}: give it a workdir of its own")
    ov.save_model(model, str(out), compress_to_fp16=False)
    return out


def _preset(name: str) -> Any:
    import nncf

    return {
        "performance": nncf.QuantizationPreset.PERFORMANCE,
        "mixed": nncf.QuantizationPreset.MIXED,
    }[name]


def _is_transformer(asked: bool | None, ctx: PassContext) -> bool:
    return ctx.model.family.transformer if asked is None else asked


def _model_type(asked: bool | None, ctx: PassContext) -> Any:
    import nncf

    return nncf.ModelType.TRANSFORMER if _is_transformer(asked, ctx) else None


def _count(model: ov.Model, op_type: str) -> int:
    return sum(op.get_type_name() == op_type for op in model.get_ops())


def _weight_layers(model: ov.Model) -> dict[str, bool]:
    """Each layer with constant weights (a MatMul or convolution), by name: whether its weights
    are int8. NNCF stores quantized weights as an integer constant that is converted and scaled
    on the way in; a layer it left (or reverted to) float reads a float constant."""
    layers = {}
    for op in model.get_ops():
        if op.get_type_name() in COMPUTE_OPS and op.get_input_size() > 1:
            weight = _weight_source(op.input_value(1).get_node())
            if weight is not None:
                layers[op.get_friendly_name()] = weight
    return layers


def _weight_source(node: Any) -> bool | None:
    """Walk back from a weight input through fake quantization, conversion, dequantization and
    layout ops: True at an integer constant or a fake-quantized one, False at a float constant,
    None at an activation."""
    quantized = False
    for _ in range(8):
        kind = node.get_type_name()
        if kind == "Constant":
            return quantized or not node.get_output_element_type(0).is_real()
        if kind == "FakeQuantize":
            quantized = True
        elif kind not in _WEIGHT_PATH:
            return None
        node = node.input_value(0).get_node()
    return None


_WEIGHT_PATH = frozenset({"Convert", "Subtract", "Multiply", "Reshape", "Transpose", "Unsqueeze"})


def _layer_counts(model: ov.Model) -> dict[str, Any]:
    """How many layers with weights are int8, and the names of those left in float."""
    layers = _weight_layers(model)
    return {
        "int8_layers": sum(layers.values()),
        "float_layers": sorted(name for name, int8 in layers.items() if not int8),
    }
