"""`mahir profile`: why a model is slow, and how much faster it could get (parse, call, print)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mahir.cli.common import (
    console,
    guard,
    load_with_logits,
    progress_bar,
    refuse_unwritable,
    write_json,
)
from mahir.cli.llm import is_llm
from mahir.errors import BadInput
from mahir.sources import refuse_missing

PROFILES = "give an output directory, a model folder or file"

if TYPE_CHECKING:
    from mahir.profile.run import ProfileConfig
    from mahir.types import Device


def profile(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Argument(
            help="An output directory of mahir optimize/apply, a Hugging Face model folder, an "
            ".onnx file or path/to/file.py:factory (default: the bundled all-MiniLM-L6-v2).",
            show_default=False,
        ),
    ] = None,
    runtime: Annotated[
        str | None,
        typer.Option(
            "--runtime",
            "-r",
            help="onnxruntime, openvino or torch \\[default: an output directory's own; else "
            "onnxruntime on a CPU, torch on a GPU].",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Rows per call.")] = 1,
    sequence_length: Annotated[
        int | None,
        typer.Option(
            "--sequence-length",
            help="Text models: tokens per sentence (about) \\[default: a traffic-like length].",
            show_default=False,
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            "--device",
            help="Where the runtimes compute: cpu, cuda (GPU 0) or cuda:N \\[default: an output "
            "directory's own, else cpu].",
            show_default=False,
        ),
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", help="Threads (default: cores).")
    ] = None,
    runs: Annotated[
        int, typer.Option("--runs", help="Profiled calls; each op's time is its median.")
    ] = 20,
    seconds: Annotated[
        float, typer.Option("--seconds", help="Seconds timing the call with the profiler off.")
    ] = 1.0,
    top: Annotated[int, typer.Option("--top", help="Heaviest ops shown, with advice.")] = 10,
    llm: Annotated[
        bool,
        typer.Option(
            "--llm",
            help="A decoder LLM (a .gguf file or causal-LM folder is one by itself; none given: "
            "the bundled SmolLM2-135M-Instruct): its prefill and one decode step, profiled apart; "
            "--sequence-length is the prompt's tokens.",
        ),
    ] = False,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the whole profile here.")
    ] = None,
    trace: Annotated[
        Path | None,
        typer.Option(
            "--trace",
            help="Write the runtime's Chrome/Perfetto trace here (onnxruntime, torch).",
        ),
    ] = None,
) -> None:
    """Time every op with the runtime's own profiler, count its FLOPs and bytes, and place the
    model and its heaviest ops on the roofline of this machine's measured peaks."""

    def configure() -> ProfileConfig:
        refuse_missing(model, PROFILES)  # before the imports: torch takes seconds
        refuse_unwritable({"--json": json_path, "--trace": trace})
        from mahir.hardware import detect
        from mahir.profile.run import ProfileConfig, check_runtime
        from mahir.types import CPU, Device

        recorded_runtime, recorded_device = _recorded(model)
        config = ProfileConfig(
            runtime=runtime,
            batch_size=batch_size,
            sequence_length=sequence_length,
            device=Device.parse(device) if device else recorded_device or CPU,
            threads=threads,
            runs=runs,
            seconds=seconds,
            top=top,
        )
        if is_llm(model, llm):
            if config.chosen_runtime() != "torch" and runtime is not None:
                raise BadInput(
                    f"an LLM is profiled on torch's forward, not {runtime}: leave -r out"
                )
            machine = detect(gpus=config.device.kind == "cuda")
            machine.require(config.device)
            return config
        chosen = config.chosen_runtime(recorded_runtime)
        check_runtime(chosen, config.device, detect())
        if trace is not None and chosen == "openvino":
            raise BadInput(
                "--trace: OpenVINO writes no trace; profile with -r onnxruntime or torch"
            )
        return config

    config = guard(ctx, configure)
    if is_llm(model, llm):
        guard(ctx, lambda: _run_llm(model, config, json_path, trace))
        return
    guard(ctx, lambda: _run(model, config, json_path, trace))


def _is_output_dir(source: str | None) -> bool:
    from mahir.outdir import MANIFEST

    return source is not None and (Path(source) / MANIFEST).is_file()


def _recorded(source: str | None) -> tuple[str | None, Device | None]:
    """The runtime (where mahir profile reads its profiler) and the device an output
    directory's winner was built for, from one read of its manifest; (None, None) otherwise."""
    from mahir.outdir import read_manifest
    from mahir.profile.run import recorded_device, recorded_runtime

    if source is None or not _is_output_dir(source):
        return None, None
    manifest = read_manifest(source)
    return recorded_runtime(manifest), recorded_device(manifest)


def _run(
    source: str | None, config: ProfileConfig, json_path: Path | None, trace: Path | None
) -> None:
    from mahir.profile.run import profile_model, profile_output_dir

    with progress_bar() as progress, tempfile.TemporaryDirectory(prefix="mahir-profile-") as tmp:
        progress.add_task("profiling (peaks are measured once per machine)", total=None)
        if source is not None and _is_output_dir(source):
            result = profile_output_dir(source, config, tmp)
        else:
            model = load_with_logits(source, None, "mahir profile")
            result = profile_model(model, config, tmp)
    console.print(result)
    if json_path is not None:
        write_json(json_path, result.to_json())
        console.print(f"profile: {json_path}", soft_wrap=True)
    if trace is not None:
        events = result.breakdown.trace
        if events is None:
            raise BadInput(f"{result.runtime} gave no trace to write")
        write_json(trace, {"traceEvents": events, "displayTimeUnit": "ms"})
        console.print(
            f"trace: {trace} (open it in ui.perfetto.dev or chrome://tracing)", soft_wrap=True
        )


def _run_llm(
    source: str | None, config: ProfileConfig, json_path: Path | None, trace: Path | None
) -> None:
    from mahir.model import load_model
    from mahir.profile.llm import profile_llm

    with progress_bar() as progress:
        progress.add_task("profiling the prefill and a decode step", total=None)
        result = profile_llm(load_model(source, llm=True), config)
    console.print(result)
    if json_path is not None:
        write_json(json_path, result.to_json())
        console.print(f"profile: {json_path}", soft_wrap=True)
    if trace is not None:
        events = [*(result.prefill.breakdown.trace or []), *(result.decode.breakdown.trace or [])]
        write_json(trace, {"traceEvents": events, "displayTimeUnit": "ms"})
        console.print(f"trace (prefill, then decode): {trace}", soft_wrap=True)
