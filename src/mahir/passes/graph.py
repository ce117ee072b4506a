"""Graph optimization of ONNX models: ONNX Runtime's own optimizer saved offline, transformer
fusions (attention, layer norm, GELU, embedding) where the architecture is known, and onnxslim
simplification (constant folding, dead and duplicate node removal).

Offline optimization moves the work out of session start and lets later passes (quantization)
see the fused graph. Levels above "basic" emit ONNX Runtime-only ops, so such a file runs on
ONNX Runtime alone; "all" also bakes in this CPU's memory layouts.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from mahir.errors import Unsupported, first_line
from mahir.types import Artifact, ArtifactFormat

if TYPE_CHECKING:
    from mahir.passes import PassContext

# transformers' model_type -> onnxruntime.transformers optimizer's model type.
FUSION_MODEL_TYPES = {
    "bert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "distilbert": "bert",
    "mpnet": "bert",
    "electra": "bert",
    "bart": "bart",
    "gpt2": "gpt2",
    "t5": "t5",
    "vit": "vit",
    "clip": "clip",
}


@dataclass(frozen=True, slots=True)
class OrtOptimize:
    """ONNX Runtime graph optimization, applied once and saved."""

    level: Literal["basic", "extended", "all"] = "extended"
    """basic: constant folding and redundant-node removal, portable; extended: ORT fusions
    (ORT-only ops); all: also this CPU's layouts (not portable to other machines)."""
    version: int = 1
    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ("onnx",)


@dataclass(frozen=True, slots=True)
class TransformerFusion:
    """onnxruntime.transformers fusions for a known transformer architecture."""

    model_type: str | None = None
    """Optimizer model type (bert, gpt2, t5, vit...); None: from the model's config."""
    version: int = 1
    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ("onnx",)


@dataclass(frozen=True, slots=True)
class Simplify:
    """onnxslim: constant folding, dead-code and duplicate removal, shape simplification."""

    version: int = 1
    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ("onnx",)


def ort_optimize(artifact: Artifact, config: OrtOptimize, ctx: PassContext) -> Artifact:
    import onnxruntime as ort

    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    out = ctx.workdir / "model.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[config.level]
    options.optimized_model_filepath = str(out)
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(artifact.path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # ONNX Runtime's own error types
        raise Unsupported(f"ONNX Runtime cannot optimize this graph: {first_line(err)}") from err
    return artifact.derive(out, optimized=config.level)


def fuse_transformer(artifact: Artifact, config: TransformerFusion, ctx: PassContext) -> Artifact:
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = config.model_type or _fusion_model_type(ctx)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the optimizer warns about every pattern it skips
        optimized = optimize_model(
            str(artifact.path), model_type=model_type, num_heads=0, hidden_size=0, opt_level=0
        )
    fused = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
    if not fused:
        raise Unsupported(f"no {model_type} transformer subgraph matched a fusion pattern")
    out = ctx.workdir / "model.onnx"
    optimized.save_model_to_file(str(out))
    return artifact.derive(out, fused=fused)


def simplify(artifact: Artifact, config: Simplify, ctx: PassContext) -> Artifact:
    import onnx
    import onnxslim

    before = onnx.load(str(artifact.path))
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            slim = onnxslim.slim(before)
        except Exception as err:  # onnxslim raises plain exceptions for graphs it cannot handle
            raise Unsupported(f"onnxslim cannot simplify this graph: {first_line(err)}") from err
    out = ctx.workdir / "model.onnx"
    onnx.save(slim, str(out))
    nodes = {"before": len(before.graph.node), "after": len(slim.graph.node)}
    return artifact.derive(out, simplified=nodes)


def _fusion_model_type(ctx: PassContext) -> str:
    config = getattr(getattr(ctx.model.module, "model", None), "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FUSION_MODEL_TYPES:
        raise Unsupported(
            f"transformer fusion needs a known architecture; {ctx.model.name} is "
            f"{model_type or 'not a transformers model'}"
        )
    return FUSION_MODEL_TYPES[model_type]
