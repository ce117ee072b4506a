"""PyTorch -> ONNX -> OpenVINO IR, each export verified before it is kept.

Exports go wrong silently in two known ways (DESIGN.md): a model left in training mode, and a
shape baked in at trace time that gives wrong answers at other shapes. So every export here is
checked against the fp32 original on at least three input shapes (batch sizes and sequence
lengths other than the ones traced with); a mismatch raises `ExportMismatch` naming the output,
the shape and the error, and nothing is left on disk. Files appear at their final path only
after they passed, so an interrupted export never leaves a half-written artifact.

Transformers models are exported to ONNX with eager attention (`_eager_attention`): their SDPA
path traces into guards and reshapes that neither ONNX Runtime nor OpenVINO fuse away, measured
1.1-1.3x slower on both after int8 (benchmarks/README.md); PyTorch itself keeps its own SDPA.
`mahir.openvino_direct` is the other way to OpenVINO, without ONNX.

Sits just above `runtimes/` (it runs what it exported); knows nothing of passes or search.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mahir.errors import BadInput, ExportMismatch, MahirError, Unsupported, first_line
from mahir.model import Model
from mahir.quality import compare
from mahir.runtimes import open_session
from mahir.silence import silenced
from mahir.types import BATCH, SEQUENCE, Artifact, Outputs, Quality, RuntimeOptions, Session
from mahir.workload import Batch, example_dims, generate_sentences, random_inputs, tokenize

# The exporter prints progress, logs missing torchvision ops and warns about renamed axes.
EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "transformers")


@dataclass(frozen=True, slots=True)
class Tolerance:
    """Elementwise bound |out - ref| <= atol + rtol * |ref|, as numpy.allclose."""

    atol: float = 1e-4
    rtol: float = 1e-3


FP32 = Tolerance()


def export_onnx(
    model: Model,
    path: str | os.PathLike[str],
    *,
    source: Artifact | None = None,
    opset: int | None = None,
) -> Artifact:
    """Export a torch artifact (default: the model's own module) to ONNX with its dynamic axes
    kept dynamic, verified against that torch artifact."""
    path = Path(path)
    import torch

    source = source or model.original()
    if source.format != "torch":
        raise Unsupported(f"{model.name}: only a torch module exports to ONNX, not {source.format}")
    module = source.module.eval()
    names = model.spec.input_names
    dynamic_shapes = _dynamic_shapes(model)
    from mahir.modules import PositionalInputs

    adapter = PositionalInputs(module, names).eval()
    args = tuple(torch.from_numpy(model.example_inputs[n]) for n in names)
    with staging(path) as staged, silenced(EXPORTER_LOGGERS, ignore_warnings=True):
        try:
            with switched_attention(module, "eager"):
                program = torch.onnx.export(
                    adapter,
                    args,
                    None,
                    input_names=list(names),
                    output_names=list(model.spec.outputs),
                    dynamic_shapes=dynamic_shapes,
                    opset_version=opset,
                    dynamo=True,
                    verbose=False,
                )
        except Exception as err:  # torch.export raises many types; all mean "cannot export"
            raise Unsupported(f"cannot export {model.name} to ONNX: {first_line(err)}") from err
        if program is None:
            raise Unsupported(f"cannot export {model.name} to ONNX: the exporter returned nothing")
        program.save(str(staged))
        _check_dynamic_axes(model, staged)
        # torch.onnx.export restores training flags it touched; answers must come from eval mode.
        module.eval()
        artifact = Artifact("onnx", model.spec, path=staged)
        verify(model, artifact, "onnxruntime", what="ONNX export", reference=source)
    return Artifact("onnx", model.spec, path=path, meta=source.meta)


@contextlib.contextmanager
def switched_attention(
    module: Any, implementation: str, *, only_from: tuple[str, ...] | None = None
) -> Iterator[None]:
    """Switch every transformers model inside `module` (those running one of `only_from`, if
    given) to the attention `implementation`, and back after. Models that cannot switch at
    run time (older transformers) keep their own; either way the export is verified against
    the module as it was."""
    switched = []
    for sub in module.modules():
        config = getattr(sub, "config", None)
        current = getattr(config, "_attn_implementation", None)
        wanted = only_from is None or current in only_from
        if (
            current not in (None, implementation)
            and wanted
            and hasattr(sub, "set_attn_implementation")
        ):
            sub.set_attn_implementation(implementation)
            switched.append((sub, current))
    try:
        yield
    finally:
        for sub, previous in reversed(switched):
            sub.set_attn_implementation(previous)


def _dynamic_shapes(model: Model) -> tuple[tuple[dict[int, Any], ...]]:
    """torch.export's dynamic shapes for the positional adapter: one Dim per named axis."""
    import torch

    dims = {name: torch.export.Dim(name) for name in sorted(model.spec.dynamic_dims)}
    return (tuple({a: dims[d] for a, d in t.dynamic_axes.items()} for t in model.spec.inputs),)


def export_program(model: Model, source: Artifact, path: Path) -> Artifact:
    """Save a torch artifact as a torch.export program (`.pt2`) that loads without the
    model's code, dynamic axes kept dynamic; verified against `source` after loading back."""
    import torch

    from mahir.modules import PositionalInputs

    names = model.spec.input_names
    adapter = PositionalInputs(source.module.eval(), names).eval()
    args = tuple(torch.from_numpy(model.example_inputs[n]) for n in names)
    with staging(path) as staged, silenced(EXPORTER_LOGGERS, ignore_warnings=True):
        try:
            program = torch.export.export(adapter, args, dynamic_shapes=_dynamic_shapes(model))
            torch.export.save(program, str(staged))
        except Exception as err:  # torch.export raises many types; all mean "cannot export"
            raise Unsupported(f"cannot save {model.name} as a program: {first_line(err)}") from err
        artifact = Artifact("torch", model.spec, path=staged)
        verify(model, artifact, "torch", what="saved program", reference=source)
    return Artifact("torch", model.spec, path=path, meta=source.meta)


def _check_dynamic_axes(model: Model, path: Path) -> None:
    """A dynamic axis the exporter fixed to a number means the model read that size as a
    Python int; the file would only ever work at the traced size."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dims = {i.name: i.type.tensor_type.shape.dim for i in graph.input}
    for tensor in model.spec.inputs:
        for axis, name in tensor.dynamic_axes.items():
            dim = dims[tensor.name][axis]
            if dim.HasField("dim_value"):
                raise ExportMismatch(
                    f"the ONNX export of {model.name} fixed axis {axis} ({name}) of input "
                    f"'{tensor.name}' at {dim.dim_value}: the model reads that size as a Python "
                    "number (int(), .item(), .tolist()); keep it a tensor so it stays dynamic"
                )


def export_openvino(
    model: Model, onnx_artifact: Artifact, path: str | os.PathLike[str]
) -> Artifact:
    """Convert an ONNX artifact to OpenVINO IR (`path` is the .xml; weights stay fp32)."""
    import openvino as ov

    path = Path(path)
    if path.suffix != ".xml":
        raise BadInput(f"an OpenVINO IR path ends in .xml, got {path}")
    with staging(path) as staged:
        try:
            ov_model = ov.convert_model(str(onnx_artifact.path))
            ov.save_model(ov_model, str(staged), compress_to_fp16=False)
        except Exception as err:  # OpenVINO raises RuntimeError/OpConversionFailure/...
            raise Unsupported(f"OpenVINO cannot convert {model.name}: {first_line(err)}") from err
        ir = Artifact("openvino", model.spec, path=staged)
        verify(model, ir, "openvino", what="IR", reference=onnx_artifact)
    return Artifact("openvino", model.spec, path=path, meta=onnx_artifact.meta)


def verify(
    model: Model,
    artifact: Artifact,
    runtime: str,
    *,
    what: str,
    tolerance: Tolerance = FP32,
    batches: Sequence[Batch] | None = None,
    reference: Artifact | None = None,
) -> None:
    """Raise `ExportMismatch` unless `artifact` on `runtime` gives the outputs of `reference`
    (default: the original) on every verification shape. OpenVINO is held to f32 here: this
    checks the conversion, not bf16."""
    batches = verification_batches(model) if batches is None else batches
    expected = reference_outputs(model, batches, reference)
    session = open_session(runtime, artifact, RuntimeOptions(openvino_precision="f32"))
    for batch, ref in zip(batches, expected, strict=True):
        shape = "x".join(str(d) for d in next(iter(batch.values())).shape)
        try:
            out = session.run(batch)
        except MahirError as err:
            raise ExportMismatch(
                f"{what} of {model.name} fails at input shape {shape}: {err}"
            ) from err
        check_close(out, ref, tolerance, where=f"{what} of {model.name}, input shape {shape}")


def fidelity(
    model: Model, session: Session, batches: Sequence[Batch], reference: Sequence[Outputs]
) -> Quality:
    """How close `session` comes to `reference` on `batches`, including the pooled sentence
    embedding when the model has pooling: for candidates that are not meant to be exact."""
    outputs = [session.run(batch) for batch in batches]
    masks = [b["attention_mask"] for b in batches] if "attention_mask" in batches[0] else None
    return compare(
        outputs,
        reference,
        attention_masks=masks,
        pooling=model.pooling,
        embedding_output=model.spec.outputs[0] if model.pooling else None,
        logits=model.logits,
    )


def check_close(out: Outputs, ref: Outputs, tolerance: Tolerance, *, where: str) -> None:
    """One line naming the first output that is missing, misshapen or out of tolerance."""
    for name, expected in ref.items():
        got = out.get(name)
        if got is None:
            raise ExportMismatch(f"{where}: output '{name}' is missing (got {sorted(out)})")
        if got.shape != expected.shape:
            raise ExportMismatch(
                f"{where}: output '{name}' has shape {got.shape}, expected {expected.shape}"
            )
        error = np.abs(got.astype(np.float64) - expected)
        bound = tolerance.atol + tolerance.rtol * np.abs(expected.astype(np.float64))
        if not np.all(error <= bound):  # also catches NaN
            raise ExportMismatch(
                f"{where}: output '{name}' differs from the original by up to "
                f"{float(error.max()):.3g} "
                f"(tolerance {tolerance.atol:g} + {tolerance.rtol:g}*|ref|); a shape or "
                "constant was probably fixed at export time"
            )


def reference_outputs(
    model: Model, batches: Sequence[Batch], source: Artifact | None = None
) -> list[Outputs]:
    """Outputs of `source` (default: the fp32 original) on its reference runtime."""
    session = reference_session(source or model.original())
    return [session.run(batch) for batch in batches]


def reference_runtime(artifact: Artifact) -> str:
    """The runtime an artifact's own answers come from: PyTorch eager for torch artifacts, ONNX
    Runtime for ONNX, OpenVINO for IR. A model's baseline is its original on this runtime."""
    return {"torch": "torch", "onnx": "onnxruntime", "openvino": "openvino"}[artifact.format]


def reference_session(artifact: Artifact) -> Session:
    """The artifact on its reference runtime, in fp32 (OpenVINO pinned to f32)."""
    options = RuntimeOptions(openvino_precision="f32")
    return open_session(reference_runtime(artifact), artifact, options)


def verification_batches(model: Model) -> list[Batch]:
    """Three shapes unlike the traced example: one short item alone, a padded odd-sized batch of
    mixed lengths, and a batch of long items."""
    rng = np.random.default_rng(1234)
    if model.is_text:
        longest = min(model.max_length or 128, 128)
        shapes = [(1, (3, 8)), (3, None), (2, (max(4, longest - 28), longest))]
        return [
            tokenize(
                model,
                generate_sentences(
                    size,
                    model.tokenizer,
                    rng,
                    token_range=token_range,
                    max_tokens=longest,
                ),
            )
            for size, token_range in shapes
        ]
    dims = example_dims(model)
    sequence = dims.get(SEQUENCE, 8)
    variants = [(1, sequence), (3, sequence + 5), (7, max(1, sequence // 2))]
    return [
        random_inputs(model.spec, {**dims, BATCH: batch, SEQUENCE: seq}, rng)
        for batch, seq in variants
    ]


@contextlib.contextmanager
def staging(final: Path) -> Iterator[Path]:
    """A path in a fresh folder beside `final`; on success its files move next to `final`
    (external-data files keep their names, so references stay valid), else all is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".mahir-staging-", dir=final.parent))
    try:
        yield folder / final.name
        for produced in sorted(folder.iterdir(), key=lambda p: p == folder / final.name):
            produced.replace(final.parent / produced.name)  # the main file last
    finally:
        shutil.rmtree(folder, ignore_errors=True)
