"""`mahir export`: an output directory as a Triton model repository and a KServe manifest."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mahir.cli.common import console, errors, guard, refuse_unwritable
from mahir.errors import BadInput

if TYPE_CHECKING:
    from mahir.serve.triton import GpuPlacement


def export(
    ctx: typer.Context,
    source: Annotated[Path, typer.Argument(help="An output directory of mahir optimize/apply.")],
    triton: Annotated[
        Path | None,
        typer.Option(
            "--triton",
            help="Write the model into this Triton model repository (REPO_DIR/NAME/...).",
            show_default=False,
        ),
    ] = None,
    kserve: Annotated[
        bool, typer.Option("--kserve", help="Print a KServe InferenceService for the repository.")
    ] = False,
    name: Annotated[
        str | None,
        typer.Option(
            help="Model name in the repository (default: the model's name).", show_default=False
        ),
    ] = None,
    instances: Annotated[int, typer.Option(help="Model instances Triton runs side by side.")] = 1,
    gpu: Annotated[
        bool, typer.Option("--gpu", help="Run the instances on GPUs (KIND_GPU).")
    ] = False,
    gpu_index: Annotated[
        list[int] | None,
        typer.Option(
            "--gpu-index",
            help="With --gpu: a GPU to place instances on (--instances on each); repeat. "
            "Default: every GPU Triton sees.",
            show_default=False,
        ),
    ] = None,
    tensorrt: Annotated[
        str | None,
        typer.Option(
            "--tensorrt",
            help="With --gpu: ONNX Runtime hands the graph to TensorRT, fp16 or fp32.",
            show_default=False,
        ),
    ] = None,
    storage_uri: Annotated[
        str | None,
        typer.Option(
            help="Where the repository will be for KServe (s3://, gs://, pvc://, https://).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Write the KServe manifest here instead of stdout.", show_default=False
        ),
    ] = None,
) -> None:
    """Export an optimized model for scale-out: a Triton model repository and/or a KServe
    InferenceService that serves it. Triton serves tensors: text models tokenize client-side."""
    guard(
        ctx,
        lambda: _run_export(
            source,
            triton,
            kserve,
            name=name,
            instances=instances,
            gpu=_placement(gpu, tuple(gpu_index or ()), tensorrt, triton=triton is not None),
            storage_uri=storage_uri,
            out=out,
        ),
    )


def _placement(
    gpu: bool, indices: tuple[int, ...], tensorrt: str | None, *, triton: bool
) -> GpuPlacement | None:
    """The GPU settings as one value, or one line saying which flag is missing."""
    from mahir.serve.triton import GpuPlacement

    if indices and not gpu:
        raise BadInput(f"--gpu-index {indices[0]} places instances on GPUs: add --gpu")
    if tensorrt is not None and not gpu:
        raise BadInput("--tensorrt runs the model on GPUs: add --gpu")
    if tensorrt is not None and not triton:
        raise BadInput("--tensorrt is a setting of the Triton model: add --triton REPO_DIR")
    if not gpu:
        return None
    return GpuPlacement(indices, tensorrt)  # type: ignore[arg-type]  # checked in __post_init__


def _run_export(
    source: Path,
    triton: Path | None,
    kserve: bool,
    *,
    name: str | None,
    instances: int,
    gpu: GpuPlacement | None,
    storage_uri: str | None,
    out: Path | None,
) -> None:
    from mahir.files import write_text_atomically
    from mahir.outdir import read_manifest
    from mahir.serve.triton import check_exportable, default_name, write_triton_repo

    if triton is None and not kserve:
        raise BadInput("say what to export: --triton REPO_DIR, --kserve, or both")
    if out is not None and not kserve:
        raise BadInput("--out is where the KServe manifest goes: add --kserve")
    refuse_unwritable({"--out": out})
    manifest = read_manifest(source)
    check_exportable(manifest, source, gpu=gpu)
    name = name or default_name(manifest, source)
    # Built before anything is written: a bad URI leaves no half an export.
    service = _service(source, manifest, name, storage_uri, instances, gpu) if kserve else None
    # Status on stderr when stdout carries the YAML, so the two never mix in a pipe.
    status = errors if kserve and out is None else console
    if triton is not None:
        folder = write_triton_repo(source, triton, name=name, instances=instances, gpu=gpu)
        status.print(f"wrote Triton model {name} to {folder}", highlight=False)
        if (folder / "tokenizer").is_dir():
            status.print(
                f"Triton serves tensors: clients tokenize with {folder / 'tokenizer'} and pool "
                "as its mahir.json says",
                highlight=False,
            )
    if service is None:
        return
    if out is None:
        sys.stdout.write(service)
    else:
        write_text_atomically(out, service)
        status.print(f"wrote KServe InferenceService to {out}", highlight=False)


def _service(
    source: Path,
    manifest: dict[str, Any],
    name: str,
    uri: str | None,
    instances: int,
    gpu: GpuPlacement | None,
) -> str:
    """The KServe InferenceService, as YAML, for a repository at `uri`."""
    from mahir.outdir import read_artifact
    from mahir.serve import kserve as ks

    if uri is None:
        raise BadInput(
            "--kserve needs --storage-uri: where the Triton repository will be (s3://bucket/"
            "models, gs://..., pvc://claim/models); copy the --triton REPO_DIR there"
        )
    size = sum(p.stat().st_size for p in read_artifact(source, manifest).files())
    return ks.to_yaml(
        ks.inference_service(
            name, uri, model_bytes=size, instances=instances, gpus=gpu.devices if gpu else 0
        )
    )
