"""Weight-only quantization: weights stored in 4 or 8 bits with a scale per block of input
channels, activations left in float. It shrinks the file and the memory traffic of large matrix
products (the bottleneck of LLM decoding and of small batches); compute stays float, so fidelity
is better than full int8 and the speedup smaller and workload-dependent.

`OrtWeightOnly` rewrites an ONNX graph's MatMuls with constant weights into ONNX Runtime's
MatMulNBits (round-to-nearest, blockwise). `NncfWeightCompression` compresses an OpenVINO IR's
weights, embedding tables included, with NNCF (data-free). Both read a fresh copy of the input
and write a new file into `ctx.workdir`.

Passes sit above runtimes and export; this room knows nothing of search or serving.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from mahir.errors import BadInput, Unsupported, first_line
from mahir.passes.nncf import read_ir, save_ir
from mahir.silence import silenced
from mahir.types import Artifact, ArtifactFormat

if TYPE_CHECKING:
    import openvino as ov

    from mahir.passes import PassContext

_QUANTIZER_MODULE = "onnxruntime.quantization.matmul_nbits_quantizer"


@dataclass(frozen=True, slots=True)
class OrtWeightOnly:
    """MatMul weights in 4 or 8 bits as ONNX Runtime MatMulNBits (round to nearest, one scale per
    block of input channels); other ops (the embedding table, Gemm, Conv) stay float. Documented
    fidelity on all-MiniLM-L6-v2 (batches of 1-8 sentences of 3-128 tokens), tests assert it:
    sentence-embedding cosine mean >= 0.94, worst >= 0.90 at 4 bits (measured 0.960 and 0.931:
    too lossy for most budgets on a model this small; symmetric=False measured 0.968, 0.951);
    mean >= 0.999, worst >= 0.998 at 8 bits (measured 0.9998, 0.9997). The file shrinks to 0.61
    (4 bits) or 0.66 (8 bits) of fp32: the fp32 embedding table is half of it."""

    bits: Literal[4, 8] = 4
    """Bits per weight."""
    block_size: int = 32
    """Input channels sharing one scale (and zero point): smaller is closer, larger is smaller.
    A power of two >= 16, as MatMulNBits requires."""
    symmetric: bool = True
    """Scales only; False adds a zero point per block (asymmetric ranges fit better)."""
    version: int = 1
    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ("onnx",)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(
                f"block_size must be a power of two >= 16 (MatMulNBits), got {self.block_size}"
            )


@dataclass(frozen=True, slots=True)
class NncfWeightCompression:
    """Weights of an OpenVINO IR compressed by NNCF, data-free: int8 (asymmetric, one scale per
    output channel) or int4 (symmetric, one scale per group). In int4 mode the embedding tables
    and the last layer stay int8, as NNCF does for accuracy. Documented fidelity on
    all-MiniLM-L6-v2 (batches of 1-8 sentences of 3-128 tokens), tests assert it:
    sentence-embedding cosine mean >= 0.998, worst >= 0.995 in int8 (measured 0.9992, 0.9987);
    mean >= 0.92, worst >= 0.88 in int4 (measured 0.942, 0.921; ratio=0.5 measured 0.984,
    0.973). The .bin shrinks to 0.25 (int8) or 0.20 (int4) of fp32."""

    mode: Literal["int8", "int4"] = "int8"
    """Primary precision of the weights."""
    group_size: int = 128
    """int4 only: input channels sharing one scale; -1 for one scale per output channel.
    Every compressed layer's input channels must be a multiple of it."""
    ratio: float = 1.0
    """int4 only: share of layers in int4; the rest, the most sensitive by NNCF's data-free
    criterion, stay int8."""
    version: int = 1
    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ("openvino",)

    def __post_init__(self) -> None:
        if self.mode not in ("int8", "int4"):
            raise ValueError(f"mode must be 'int8' or 'int4', got {self.mode!r}")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(
                f"group_size must be >= 1, or -1 for per channel, got {self.group_size}"
            )
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.mode == "int8" and self.ratio != 1.0:
            raise ValueError(f"ratio {self.ratio} applies to mode='int4' only; int8 is all layers")


def ort_weight_only(artifact: Artifact, config: OrtWeightOnly, ctx: PassContext) -> Artifact:
    import onnx

    if artifact.path is None or not Path(artifact.path).is_file():
        raise BadInput(f"no ONNX file at {artifact.path}; export the model first")
    model = onnx.load(str(artifact.path))  # a fresh copy: the quantizer rewrites it in place
    initializers = {init.name for init in model.graph.initializer}
    if not any(n.op_type == "MatMul" and n.input[1] in initializers for n in model.graph.node):
        ops = Counter(n.op_type for n in model.graph.node)
        raise Unsupported(
            "no MatMul with constant weights to turn into MatMulNBits (the graph has "
            f"{', '.join(f'{op} x{k}' for op, k in ops.most_common(4))})"
        )
    quantizer_module = _import_quantizer()
    algo = quantizer_module.DefaultWeightOnlyQuantConfig(
        block_size=config.block_size,
        is_symmetric=config.symmetric,
        bits=config.bits,
        op_types_to_quantize=("MatMul",),
    )
    quantizer = quantizer_module.MatMulNBitsQuantizer(
        model,
        bits=config.bits,
        block_size=config.block_size,
        is_symmetric=config.symmetric,
        algo_config=algo,
    )
    out = ctx.workdir / "model.onnx"
    if out.resolve() == Path(artifact.path).resolve():
        raise BadInput(f"the pass would write over its input {out}: give it a workdir of its own")
    with _quiet_ort():
        try:
            quantizer.process()
            quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
        except Exception as err:  # the quantizer raises plain exceptions and assertions
            raise Unsupported(f"MatMulNBits quantization failed: {first_line(err)}") from err
    graph = onnx.load(str(out), load_external_data=False).graph
    count = sum(n.op_type == "MatMulNBits" for n in graph.node)
    if count == 0:
        raise Unsupported("no MatMul weight could be quantized (weights must be 2-D constants)")
    return artifact.derive(
        out,
        quantized=f"ort-weight-only-int{config.bits}",
        bits=config.bits,
        block_size=config.block_size,
        symmetric=config.symmetric,
        matmul_nbits=count,
    )


def nncf_weight_compression(
    artifact: Artifact, config: NncfWeightCompression, ctx: PassContext
) -> Artifact:
    import nncf

    model = read_ir(artifact)
    options: dict[str, Any] = {"mode": nncf.CompressWeightsMode.INT8_ASYM}
    if config.mode == "int4":
        options = {
            "mode": nncf.CompressWeightsMode.INT4_SYM,
            "group_size": config.group_size,
            "ratio": config.ratio,
        }
    with silenced(("nncf",)):
        try:
            compressed = nncf.compress_weights(model, **options)
        except Exception as err:  # nncf raises its own errors, RuntimeError, ValueError, ...
            raise Unsupported(
                f"NNCF {config.mode} weight compression failed: {first_line(err)}"
            ) from err
    weights = compressed_weights(compressed)
    if not weights:
        raise Unsupported("NNCF found no weights to compress")
    if config.mode == "int4" and not weights.keys() & {"i4", "u4"}:
        raise Unsupported(
            "NNCF kept every weight in int8 (it puts only MatMuls other than the last in int4): "
            "use mode='int8'"
        )
    out = save_ir(compressed, artifact, ctx)
    return artifact.derive(
        out,
        quantized=f"nncf-weights-{config.mode}",
        group_size=config.group_size if config.mode == "int4" else None,
        ratio=config.ratio,
        weights=dict(sorted(weights.items())),
    )


def compressed_weights(model: ov.Model) -> Counter[str]:
    """Weight tensors stored as integers, by element type ("i4", "u8", ...): an integer
    constant converted to float on its way into the dequantizing Subtract/Multiply (zero
    points, which also are integer constants, enter those ops second)."""
    counts: Counter[str] = Counter()
    for op in model.get_ops():
        if op.get_type_name() != "Convert":
            continue
        source = op.input_value(0).get_node()
        if source.get_type_name() != "Constant" or source.get_output_element_type(0).is_real():
            continue
        if any(target.get_index() == 0 for target in op.output(0).get_target_inputs()):
            counts[source.get_output_element_type(0).get_type_name()] += 1
    return counts


def _import_quantizer() -> Any:
    """ONNX Runtime's MatMulNBits module, whose import calls `logging.basicConfig(INFO)`: the
    root logger's level and handlers are put back, so the process does not start logging."""
    import importlib
    import sys

    if _QUANTIZER_MODULE in sys.modules:
        return sys.modules[_QUANTIZER_MODULE]
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        return importlib.import_module(_QUANTIZER_MODULE)
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers


@contextlib.contextmanager
def _quiet_ort() -> Iterator[None]:
    """The quantizer logs a line per node at INFO."""
    logger = logging.getLogger(_QUANTIZER_MODULE)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
