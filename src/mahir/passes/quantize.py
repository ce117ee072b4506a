"""ONNX Runtime int8 quantization: dynamic (weights int8 offline, activations per call) and
static QDQ (activations too, with ranges calibrated on traffic-shaped inputs).

Dynamic int8 is the safe first try for transformers on CPUs with int8 dot products (VNNI, AMX).
Without VNNI the u8*s8 products can saturate in 16 bits, so weights use 7 bits there
(`reduce_range`, decided from the machine unless set). Graphs fused by the transformer optimizer
carry ops that ONNX Runtime's symbolic shape inference does not know; `DefaultTensorType` FLOAT
gets quantization past the "Unable to find data type for weight_name" failure (DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from mahir.errors import Unsupported, first_line
from mahir.silence import silenced
from mahir.types import BATCH, Artifact, ArtifactFormat

if TYPE_CHECKING:
    from mahir.passes import PassContext


@dataclass(frozen=True, slots=True)
class DynamicInt8:
    """int8 weights, activations quantized on the fly. Documented fidelity on all-MiniLM-L6-v2:
    sentence-embedding cosine mean >= 0.98, worst >= 0.95 (tests assert it)."""

    per_channel: bool = False
    """One scale per output channel instead of per tensor: better fidelity, a little slower."""
    reduce_range: bool | None = None
    """7-bit weights; None: on for per-channel scales where the CPU has no int8 dot-product
    instructions (see `choose_reduce_range`)."""
    op_types: tuple[str, ...] = ("MatMul", "Gemm")
    """Ops to quantize; the rest stay float."""
    version: int = 1
    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ("onnx",)

    def __post_init__(self) -> None:
        if not self.op_types:
            raise ValueError("op_types is empty: name at least one op type to quantize")


@dataclass(frozen=True, slots=True)
class StaticInt8:
    """int8 weights and activations as QDQ pairs, ranges calibrated on `ctx.calibration`."""

    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    """How activation ranges are chosen from the calibration data."""
    percentile: float = 99.999
    """For calibration="percentile": the share of values the range must cover."""
    per_channel: bool = True
    reduce_range: bool | None = None
    """7-bit weights; None: on for per-channel scales where the CPU has no int8 dot-product
    instructions (see `choose_reduce_range`)."""
    op_types: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
    version: int = 1
    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ("onnx",)

    def __post_init__(self) -> None:
        if not 90.0 <= self.percentile < 100.0:
            raise ValueError(f"percentile must be in [90, 100), got {self.percentile}")
        if not self.op_types:
            raise ValueError("op_types is empty: name at least one op type to quantize")


def dynamic_int8(artifact: Artifact, config: DynamicInt8, ctx: PassContext) -> Artifact:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = ctx.workdir / "model.onnx"
    reduce_range = choose_reduce_range(config.reduce_range, config.per_channel, ctx)
    with silenced():  # onnxruntime.quantization logs a line per skipped node
        try:
            quantize_dynamic(
                str(artifact.path),
                str(out),
                weight_type=QuantType.QInt8,
                per_channel=config.per_channel,
                reduce_range=reduce_range,
                op_types_to_quantize=list(config.op_types),
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
        except Exception as err:  # onnxruntime.quantization raises plain exceptions
            raise Unsupported(f"dynamic int8 quantization failed: {first_line(err)}") from err
    count = _count_ops(out, ("MatMulInteger", "DynamicQuantizeLinear", "QGemm", "ConvInteger"))
    if count == 0:
        raise Unsupported(f"no {', '.join(config.op_types)} op was quantized")
    return artifact.derive(out, quantized="dynamic-int8", int8_ops=count, reduce_range=reduce_range)


def static_int8(artifact: Artifact, config: StaticInt8, ctx: PassContext) -> Artifact:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if not ctx.calibration:
        raise Unsupported("static int8 needs calibration inputs; give sample data or a workload")

    # Histogram calibrators stack every batch's activations into one array: same shapes needed.
    batches = ctx.calibration if config.calibration == "minmax" else pad_to_common_shape(ctx)

    class Batches(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._batches = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    extra: dict[str, Any] = {"DefaultTensorType": 1}  # onnx.TensorProto.FLOAT
    if config.calibration == "percentile":
        extra["CalibPercentile"] = config.percentile
    out = ctx.workdir / "model.onnx"
    reduce_range = choose_reduce_range(config.reduce_range, config.per_channel, ctx)
    with silenced():  # onnxruntime.quantization logs a line per skipped node
        try:
            quantize_static(
                str(artifact.path),
                str(out),
                Batches(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=config.per_channel,
                reduce_range=reduce_range,
                op_types_to_quantize=list(config.op_types),
                calibrate_method=methods[config.calibration],
                extra_options=extra,
            )
        except Exception as err:  # onnxruntime.quantization raises plain exceptions
            raise Unsupported(f"static int8 quantization failed: {first_line(err)}") from err
    count = _count_ops(out, ("QuantizeLinear",))
    if count == 0:
        raise Unsupported(f"no {', '.join(config.op_types)} op was quantized")
    return artifact.derive(
        out,
        quantized=f"static-int8-{config.calibration}",
        qdq_pairs=count,
        reduce_range=reduce_range,
    )


def pad_to_common_shape(ctx: PassContext) -> tuple[dict[str, np.ndarray], ...]:
    """Calibration batches zero-padded along their dynamic non-batch axes to the largest size.
    Zero is padding for token inputs (the attention mask hides it); other models with more than
    a batch axis dynamic cannot be padded safely (the family says whether padding is masked)."""
    spec = ctx.model.spec
    axes = {t.name: [a for a, d in t.dynamic_axes.items() if d != BATCH] for t in spec.inputs}
    masked = ctx.model.family.token_lengths(ctx.calibration[0]) is not None
    if any(axes.values()) and not masked:
        raise Unsupported("histogram calibration needs equal shapes; use calibration='minmax'")
    sizes = {
        (name, axis): max(b[name].shape[axis] for b in ctx.calibration)
        for name, dims in axes.items()
        for axis in dims
    }
    padded = []
    for batch in ctx.calibration:
        out = {}
        for name, array in batch.items():
            widths = [(0, sizes.get((name, a), n) - n) for a, n in enumerate(array.shape)]
            out[name] = np.pad(array, widths)
        padded.append(out)
    return tuple(padded)


def choose_reduce_range(asked: bool | None, per_channel: bool, ctx: PassContext) -> bool:
    """7-bit weights if asked, else for per-channel scales on a CPU without int8 dot products
    (no VNNI or AMX), where u8*s8 products can saturate in 16 bits. Per tensor, the lost bit
    costs more than saturation does: MiniLM dynamic int8 on an AVX2-only AMD EPYC, sentence
    cosine mean 0.950 with 8 bits, 0.859 with 7 (per channel 0.988 either way)."""
    if asked is not None:
        return asked
    return per_channel and not ctx.machine.int8_dot_product


def _count_ops(path: Any, op_types: tuple[str, ...]) -> int:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(node.op_type in op_types for node in graph.node)
