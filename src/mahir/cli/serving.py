"""`mahir serve`: the command that serves a model (an encoder, or an LLM output directory)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from mahir.cli.common import errors, guard
from mahir.errors import BadInput, refuse_below
from mahir.sources import refuse_missing

SERVES = (
    "give an output directory of mahir optimize or apply, or a model to serve in fp32: a "
    "Hugging Face folder, an .onnx file or path/to/file.py:factory"
)


def serve(
    ctx: typer.Context,
    source: Annotated[
        str | None,
        typer.Argument(
            help="An output directory of mahir optimize/apply, or any model mahir can load "
            "(served fp32 on ONNX Runtime).",
            show_default=False,
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Interface to bind; other than loopback only if asked.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_batch_size: Annotated[
        int | None,
        typer.Option(
            help="Items per batch at most \\[default: tuned, else 32].", show_default=False
        ),
    ] = None,
    max_batch_tokens: Annotated[
        int,
        typer.Option(help="Padded tokens per batch at most (real ones for a packed session)."),
    ] = 8192,
    max_delay_ms: Annotated[
        float | None,
        typer.Option(
            help="Longest wait for a batch to fill \\[default: tuned, else 0: run when the worker "
            "is free].",
            show_default=False,
        ),
    ] = None,
    max_padding: Annotated[
        float | None,
        typer.Option(
            help="Padded tokens per real token a batch may add at most "
            "\\[default: tuned, else 0.5].",
            show_default=False,
        ),
    ] = None,
    max_queue: Annotated[
        int,
        typer.Option(
            help="Waiting items at most (an LLM's: requests waiting to generate); then 503 "
            "(a request holding more alone: 413)."
        ),
    ] = 1024,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Batches run at once (openvino: on that many streams, the cores split among "
            "them; onnxruntime: concurrent runs; on a GPU: batches queued while the next is "
            "prepared) \\[default: tuned, else 1].",
            show_default=False,
        ),
    ] = None,
    timeout_ms: Annotated[
        float,
        typer.Option(
            help="A request not started by then gets 504 (an LLM's: not finished by then)."
        ),
    ] = 30_000.0,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body; then 413.")] = 8.0,
    slots: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="An LLM's requests decoded together in mahir's continuous batch (PyTorch "
            "eager, llama.cpp) \\[default: what mahir optimize recorded, else 1].",
            show_default=False,
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="MAHIR_API_KEY", help="Require Authorization: Bearer KEY.", show_default=False
        ),
    ] = None,
    truncate: Annotated[
        bool,
        typer.Option(
            help="/v1/embeddings cuts inputs past the model's max length (usage counts the tokens "
            'read); --no-truncate refuses them (400). A request\'s own "truncate" wins.'
        ),
    ] = True,
    matryoshka_dims: Annotated[
        str | None,
        typer.Option(
            help="Embedding sizes the model was trained to be cut to (Matryoshka), e.g. "
            "256,128,64: /v1/embeddings honours dimensions for these and the native size only.",
            show_default=False,
        ),
    ] = None,
    tune: Annotated[
        bool,
        typer.Option(
            "--tune",
            help="First measure batch size, delay and padding; keep the most throughput with p99 "
            "under --p99-ms, record it in mahir.json, then serve with it.",
        ),
    ] = False,
    p99_ms: Annotated[
        float | None,
        typer.Option(
            "--p99-ms",
            help="The p99 bound --tune keeps to (ms): an encoder's request latency, an LLM's "
            "time between streamed tokens.",
        ),
    ] = None,
    tune_concurrency: Annotated[int, typer.Option(help="Clients --tune loads with.")] = 32,
    tune_seconds: Annotated[
        float, typer.Option(help="Timed seconds per setting --tune tries.")
    ] = 2.0,
    ray: Annotated[
        bool,
        # "\\[" keeps rich from reading the extra's name as markup
        typer.Option("--ray", help="Serve as Ray Serve replicas (pip install 'mahir\\[ray]')."),
    ] = False,
    replicas: Annotated[
        int | None, typer.Option(help="With --ray: this many replicas \\[default: 1].")
    ] = None,
    autoscale: Annotated[
        str | None,
        typer.Option(
            help="With --ray: MIN,MAX replicas, scaled with the load.", show_default=False
        ),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(
            help="With --ray: join this Ray cluster (else start a local one).", show_default=False
        ),
    ] = None,
) -> None:
    """Serve a model over HTTP (KServe v2, OpenAI-style embeddings) with dynamic batching; an LLM
    output directory (mahir optimize --llm) over OpenAI's chat and completions APIs."""
    from mahir.serve.batcher import BatcherConfig
    from mahir.serve.served import ServeConfig
    from mahir.serve.tune import TuneConfig

    given = {
        "max_batch_size": max_batch_size,
        "max_delay_ms": max_delay_ms,
        "max_padding": max_padding,
        "workers": workers,
    }
    explicit = {name: value for name, value in given.items() if value is not None}
    for_encoders = set(explicit)  # and flags with defaults, where typed rather than defaulted
    if _typed(ctx, "max_batch_tokens"):
        for_encoders.add("max_batch_tokens")
    if _typed(ctx, "truncate"):
        for_encoders.add("truncate" if truncate else "no_truncate")

    def configure() -> tuple[ServeConfig, TuneConfig | None]:
        if (p99_ms is not None) != tune:
            raise BadInput("--tune and --p99-ms go together: --tune --p99-ms 100, say")
        _check_port(host, port)
        if api_key is not None and not api_key.strip():
            raise BadInput(
                "--api-key (or MAHIR_API_KEY) is empty: give the key clients must send, or "
                "leave it unset to serve without one"
            )
        counts = {
            "--max-batch-size": max_batch_size,
            "--max-batch-tokens": max_batch_tokens,
            "--max-queue": max_queue,
            "--workers": workers,
            "--tune-concurrency": tune_concurrency,
        }
        refuse_below(1, counts)
        refuse_below(0, {"--max-delay-ms": max_delay_ms, "--max-padding": max_padding})
        spans = {"--timeout-ms": timeout_ms, "--max-body-mb": max_body_mb}
        refuse_below(0, {**spans, "--tune-seconds": tune_seconds}, above=True)
        try:
            batcher = BatcherConfig(
                max_batch_tokens=max_batch_tokens,
                max_queue=max_queue,
                timeout_ms=timeout_ms,
                **explicit,  # type: ignore[arg-type]
            )
            tuning = None
            if p99_ms is not None:
                tuning = TuneConfig(
                    p99_ms,
                    concurrency=tune_concurrency,
                    seconds=tune_seconds,
                    workers=(1, 2),  # two only where the runtime runs batches at once
                )
        except ValueError as err:
            raise BadInput(str(err)) from err
        config = ServeConfig(
            host=host,
            port=port,
            api_key=api_key,
            max_body_bytes=int(max_body_mb * 2**20),
            batcher=batcher,
            truncate=truncate,
            matryoshka_dims=_sizes(matryoshka_dims),
            slots=slots,
        )
        return config, tuning

    config, tuning = guard(ctx, configure)
    scale = guard(ctx, lambda: _ray_config(ray, replicas, autoscale, address))
    guard(ctx, lambda: _run_serve(source, config, set(explicit), tuning, scale, for_encoders))


def _typed(ctx: typer.Context, name: str) -> bool:
    """Whether the option `name` was given (on the command line or by its environment
    variable), not left at its default."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name != "DEFAULT"


def _check_port(host: str, port: int) -> None:
    """Refuse a port that is none, or that something already listens on now, not after loading
    the model."""
    import socket

    if not 1 <= port <= 65535:
        raise BadInput(f"--port {port} is no TCP port: give one in 1-65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as err:
        raise BadInput(f"--host {host} is no address of this machine ({err})") from err
    with socket.socket(family, kind, proto) as probe:
        # as uvicorn binds: a port left in TIME_WAIT by a server that just stopped is free
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            raise BadInput(
                f"cannot listen on {host}:{port} ({err.strerror}): stop what holds the port, "
                "or pass another --port"
            ) from err


def _sizes(text: str | None) -> tuple[int, ...]:
    """'256,128' -> (256, 128)."""
    if text is None:
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise BadInput(f"--matryoshka-dims takes sizes such as 256,128,64, got {text!r}") from None


def _ray_config(ray: bool, replicas: int | None, autoscale: str | None, address: str | None) -> Any:
    """The Ray Serve scale-out asked for, or None to serve in this process."""
    from mahir.serve.ray import RayConfig, parse_autoscale

    if not ray:
        if replicas is not None or autoscale is not None or address is not None:
            raise BadInput("--replicas, --autoscale and --address go with --ray: add --ray")
        return None
    bounds = parse_autoscale(autoscale) if autoscale is not None else None
    return RayConfig(replicas=replicas, autoscale=bounds, address=address)


def _run_serve(
    source: str | None,
    config: Any,
    explicit: set[str],
    tuning: Any,
    scale: Any,
    for_encoders: set[str],
) -> None:
    """`explicit`: the batching flags given, which win over a tuned choice; `for_encoders`: every
    flag given that only an encoder's server reads."""
    from mahir.cli.tuning import recorded_batching, tune_and_record
    from mahir.outdir import MANIFEST, model_name, open_output_dir, read_manifest
    from mahir.serve.app import run_server

    folder = Path(source) if source else None
    manifest = read_manifest(folder) if folder and (folder / MANIFEST).is_file() else None
    if folder is not None and manifest is not None and manifest.get("family") == "decoder":
        if for_encoders:
            flags = " and ".join(f"--{name.replace('_', '-')}" for name in sorted(for_encoders))
            verb = "is" if len(for_encoders) == 1 else "are"
            raise BadInput(
                f"{flags} {verb} for an encoder's requests; an LLM's engine batches its own "
                "(--slots sets mahir's continuous batch): drop them"
            )
        _serve_llm(folder, manifest, config, tuning, scale)
        return
    if config.slots is not None:
        raise BadInput("--slots is for an LLM output directory (mahir optimize --llm): drop it")
    if folder is None or manifest is None:
        if scale is not None:
            raise BadInput(
                "--ray serves an output directory, which every replica opens (on any node): "
                "write one with mahir apply or mahir optimize --out DIR, then mahir serve DIR --ray"
            )
        if tuning is not None:
            raise BadInput(
                "--tune records its choice in an output directory's mahir.json: give one "
                "(mahir apply or mahir optimize writes it)"
            )
        refuse_missing(source, SERVES)  # before loading one imports torch
        with tempfile.TemporaryDirectory(prefix="mahir-serve-") as tmp:
            out = Path(tmp) / "out"
            _write_plain(source, out)
            opened = open_output_dir(out, workers=config.batcher.workers)
        _announce(opened.name, config)
        run_server(opened, config)
        return
    # The batching (workers too) is settled first: the session is opened for it.
    if tuning is not None:
        manifest["batching"] = tune_and_record(
            folder, open_output_dir(folder), config.batcher, tuning
        )
    config = recorded_batching(config, manifest.get("batching"), explicit)
    if scale is None:
        opened = open_output_dir(folder, workers=config.batcher.workers)  # may refuse the workers
        _announce(opened.name, config)
        run_server(opened, config)
        return
    from mahir.serve.ray import serve_ray

    _announce(model_name(manifest, folder), config)
    serve_ray(folder, config, scale)  # every replica opens the directory itself


def _serve_llm(
    folder: Path, manifest: dict[str, Any], config: Any, tuning: Any, scale: Any
) -> None:
    """An LLM output directory (`mahir optimize --llm`) behind OpenAI's chat and completions."""
    from mahir.llm_outdir import open_llm_output
    from mahir.outdir import model_name
    from mahir.serve.llm_app import run_llm_server

    if config.matryoshka_dims:
        raise BadInput("--matryoshka-dims is for sentence encoders: drop it for an LLM")
    if tuning is not None:  # before any engine opens: it is opened with the slots chosen
        from mahir.cli.tuning import tune_llm_and_record

        if config.slots is not None:
            raise BadInput("--tune chooses the slots: drop --slots, or --tune")
        tune_llm_and_record(folder, tuning)
    if scale is not None:
        from mahir.serve.ray import serve_ray

        serve_ray(folder, config, scale)  # every replica opens the directory itself
        return
    generator, family = open_llm_output(folder, slots=config.slots)
    name = model_name(manifest, folder)
    _announce(name, config)
    run_llm_server(generator, family, name, config)


def _announce(name: str, config: Any) -> None:
    errors.print(f"serving {name} on http://{config.host}:{config.port}", highlight=False)


def _write_plain(source: str | None, out: Path) -> None:
    """A model that is no output directory yet: its fp32 ONNX export, checked, as one."""
    from mahir.model import load_model, one_forward
    from mahir.recipe import Recipe
    from mahir.search.apply import apply_recipe, write_output_dir

    model = one_forward(load_model(source), "mahir serve")
    applied = apply_recipe(
        model, Recipe((), "onnxruntime"), out.parent / "work", calibration=(), evaluation=()
    )
    write_output_dir(model, applied, out)
