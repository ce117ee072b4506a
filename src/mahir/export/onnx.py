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
`mahir.export.openvino_direct` is the other way to OpenVINO, without ONNX.

Sits just above `runtimes/` (it runs what it exported); knows nothing of passes or search.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mahir.errors import BadInput, ExportMismatch, MahirError, Unsupported, first_line
from mahir.files import staged
from mahir.model import Model
from mahir.quality import FP32, Tolerance, check_close
from mahir.runtimes import REFERENCE_OPTIONS, open_session, reference_outputs
from mahir.silence import silenced
from mahir.types import SEQUENCE, Artifact, InputSpec
from mahir.workload import Batch

# The exporter prints progress, logs missing torchvision ops and warns about renamed axes.
EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "transformers")


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
    dynamic_shapes = _dynamic_shapes(model.spec)
    from mahir.modules import PositionalInputs

    adapter = PositionalInputs(module, names).eval()
    args = tuple(torch.from_numpy(model.example_inputs[n]) for n in names)
    with staged(path) as draft, silenced(EXPORTER_LOGGERS, ignore_warnings=True):
        try:
            with switched_attention(module, "eager"):
                program = torch.onnx.export(
                    adapter,
                    args,
                    None,
                    input_names=list(names),
                    output_names=list(source.spec.outputs),
                    dynamic_shapes=dynamic_shapes,
                    opset_version=opset,
                    dynamo=True,
                    verbose=False,
                )
        except Exception as err:  # torch.export raises many types; all mean "cannot export"
            raise Unsupported(f"cannot export {model.name} to ONNX: {first_line(err)}") from err
        if program is None:
            raise Unsupported(f"cannot export {model.name} to ONNX: the exporter returned nothing")
        program.save(str(draft))
        _check_dynamic_axes(model, draft)
        # torch.onnx.export restores training flags it touched; answers must come from eval mode.
        module.eval()
        # The source's outputs, which a pass may have changed (a pooled module's embedding).
        artifact = Artifact("onnx", source.spec, path=draft)
        verify(model, artifact, "onnxruntime", what="ONNX export", reference=source)
    return Artifact("onnx", source.spec, path=path, meta=source.meta)


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


def _dynamic_shapes(spec: InputSpec) -> tuple[tuple[dict[int, Any], ...]]:
    """torch.export's dynamic shapes for the positional adapter: one Dim per named axis, the
    sequence bounded by the model's position table where known (the exporter refuses a range
    the model's own guards do not cover)."""
    import torch

    from mahir.runtimes.packing import SEGMENTS

    bounds = {SEQUENCE: spec.max_sequence}
    least = {SEGMENTS: 3}  # a packed batch: one sentence at least, and the padding's segment
    dims = {
        name: torch.export.Dim(name, min=least.get(name), max=bounds.get(name))
        for name in sorted(spec.dynamic_dims)
    }
    return (tuple({a: dims[d] for a, d in t.dynamic_axes.items()} for t in spec.inputs),)


def export_program(model: Model, source: Artifact, path: Path) -> Artifact:
    """Save a torch artifact as a torch.export program (`.pt2`) that loads without the
    model's code, dynamic axes kept dynamic; verified against `source` after loading back.
    A packed module is traced on the example batch packed (runtimes/packing.py)."""
    import torch

    from mahir.modules import PositionalInputs
    from mahir.runtimes.packing import pack, packed_spec

    spec, examples = source.spec, model.example_inputs
    if spec.packed:
        spec, examples = packed_spec(spec), pack(examples)
    adapter = PositionalInputs(source.module.eval(), spec.input_names).eval()
    args = tuple(torch.from_numpy(examples[n]) for n in spec.input_names)
    dynamic = _dynamic_shapes(spec)
    with staged(path) as draft, silenced(EXPORTER_LOGGERS, ignore_warnings=True):
        try:
            program = torch.export.export(adapter, args, dynamic_shapes=dynamic)
            torch.export.save(program, str(draft))
        except Exception as err:  # torch.export raises many types; all mean "cannot export"
            raise Unsupported(f"cannot save {model.name} as a program: {first_line(err)}") from err
        artifact = Artifact("torch", source.spec, path=draft)
        verify(model, artifact, "torch", what="saved program", reference=source)
    return Artifact("torch", source.spec, path=path, meta=source.meta)


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
    with staged(path) as draft:
        try:
            ov_model = ov.convert_model(str(onnx_artifact.path))
            ov.save_model(ov_model, str(draft), compress_to_fp16=False)
        except Exception as err:  # OpenVINO raises RuntimeError/OpConversionFailure/...
            raise Unsupported(f"OpenVINO cannot convert {model.name}: {first_line(err)}") from err
        ir = Artifact("openvino", model.spec, path=draft)
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
    batches = model.family.verification_batches() if batches is None else batches
    expected = reference_outputs(model, batches, reference)
    session = open_session(runtime, artifact, REFERENCE_OPTIONS)
    for batch, ref in zip(batches, expected, strict=True):
        shape = "x".join(str(d) for d in next(iter(batch.values())).shape)
        try:
            out = session.run(batch)
        except MahirError as err:
            raise ExportMismatch(
                f"{what} of {model.name} fails at input shape {shape}: {err}"
            ) from err
        check_close(out, ref, tolerance, where=f"{what} of {model.name}, input shape {shape}")
