"""Optimization passes: each technique is a function `(artifact, config, ctx) -> artifact`.

A pass never mutates its input artifact: it writes a new one into `ctx.workdir`. When it does
not apply (wrong architecture, an op it cannot handle, a CPU without the instructions that make
it pay) it raises `Unsupported(reason)`, and the search records the reason and moves on. The
config's type picks the function, through the one dict `PASSES`, written out by hand; names such
as "ort-dynamic-int8" live only at the CLI and recipe edge. A step that needs another format
gets it converted first, by the route `export/conversions.py` finds (each conversion verified).

Passes sit above runtimes and export; they know nothing of search or serving.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mahir.errors import Unsupported
from mahir.export.conversions import convert
from mahir.hardware import Machine, detect
from mahir.model import Model
from mahir.passes.conversion import OpenVinoDirect, openvino_direct
from mahir.passes.fallback import AccuracyAwareInt8, accuracy_aware_int8
from mahir.passes.float8 import TorchaoFloat8, torchao_float8
from mahir.passes.fuse_qkv import FuseQKV, fuse_qkv
from mahir.passes.graph import (
    OrtOptimize,
    Simplify,
    TransformerFusion,
    fuse_transformer,
    ort_optimize,
    simplify,
)
from mahir.passes.nncf import NncfAccuracyControl, NncfInt8, nncf_accuracy_control, nncf_int8
from mahir.passes.packing import PackSequences, pack_sequences
from mahir.passes.pooling import PoolInModel, pool_in_model
from mahir.passes.precision import Float16, TorchLowPrecision, float16, torch_low_precision
from mahir.passes.prune import MagnitudePrune, StructuredPrune, magnitude_prune, structured_prune
from mahir.passes.prune_transformer import TransformerPrune, transformer_prune
from mahir.passes.quantize import DynamicInt8, StaticInt8, dynamic_int8, static_int8
from mahir.passes.torchao import Pt2eInt8, TorchaoInt8, pt2e_int8, torchao_int8
from mahir.passes.weights import (
    NncfWeightCompression,
    OrtWeightOnly,
    nncf_weight_compression,
    ort_weight_only,
)
from mahir.types import Artifact, ArtifactFormat
from mahir.workload import Batch

PassFn = Callable[[Artifact, Any, "PassContext"], Artifact]


@dataclass(frozen=True)
class PassContext:
    """What a pass may use besides its input: the fp32 original (spec, tokenizer, reference),
    a folder of its own to write into, calibration inputs shaped like traffic, the machine."""

    model: Model
    workdir: Path
    calibration: tuple[Batch, ...] = ()
    machine: Machine = field(default_factory=lambda: detect(gpus=False))


PASSES: dict[type[Any], PassFn] = {
    OrtOptimize: ort_optimize,
    TransformerFusion: fuse_transformer,
    Simplify: simplify,
    DynamicInt8: dynamic_int8,
    StaticInt8: static_int8,
    AccuracyAwareInt8: accuracy_aware_int8,
    Float16: float16,
    TorchLowPrecision: torch_low_precision,
    PoolInModel: pool_in_model,
    PackSequences: pack_sequences,
    TorchaoFloat8: torchao_float8,
    FuseQKV: fuse_qkv,
    TorchaoInt8: torchao_int8,
    Pt2eInt8: pt2e_int8,
    StructuredPrune: structured_prune,
    TransformerPrune: transformer_prune,
    MagnitudePrune: magnitude_prune,
    NncfInt8: nncf_int8,
    NncfAccuracyControl: nncf_accuracy_control,
    OrtWeightOnly: ort_weight_only,
    NncfWeightCompression: nncf_weight_compression,
    OpenVinoDirect: openvino_direct,
}

STEP_TYPES: dict[str, type[Any]] = {cls.__name__: cls for cls in PASSES}
"""The allow-list a recipe's `_type` names are resolved against."""


def run_pass(artifact: Artifact, config: Any, ctx: PassContext) -> Artifact:
    """Apply one step, converting the artifact first if the step needs another format."""
    fn = PASSES.get(type(config))
    if fn is None:
        raise Unsupported(f"no pass for {type(config).__name__}")
    needed: tuple[ArtifactFormat, ...] = config.input_formats
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    return fn(convert(ctx.model, artifact, needed, ctx.workdir / "input"), config, ctx)


def apply_steps(artifact: Artifact, steps: Sequence[Any], ctx: PassContext) -> Artifact:
    """Apply steps in order, each writing into its own numbered folder under `ctx.workdir`."""
    for index, step in enumerate(steps):
        folder = ctx.workdir / f"{index:02d}-{type(step).__name__.lower()}"
        artifact = run_pass(artifact, step, dataclasses.replace(ctx, workdir=folder))
    return artifact
