"""`mahir serve`: an output directory behind HTTP, every request through the dynamic batcher.

Endpoints: the Open Inference Protocol (KServe v2: health, model metadata, infer, in JSON or
binary tensors, as `tritonclient.http` sends them), OpenAI's `POST /v1/embeddings` for sentence
encoders (`embeddings.py`: the server tokenizes and pools, with the model's own pooling config),
and Prometheus `/metrics`. A plain Starlette app: module-level handlers that read the served
model (`served.py`) from `request.app.state`, one list of routes, and around each model endpoint
two pure ASGI wrappers, metrics outside the API-key check (those, health, errors and uvicorn's
start and drain are shared with the LLM server: `http.py`). No FastAPI: its parameter
resolution cost ~30 us a request, and a model endpoint's GET took 460 us in process against
115 us here (raw ASGI calls, a busy 2-core machine). Every request's inputs are checked
(`validate.py`) before they may join a batch. Errors become HTTP answers in one place
(`error_answer`), by mahir's error tree (`errors.HTTP_STATUS`): bad bodies 400, requests too
large to ever admit 413, requests that do not fit the model 422, a full queue or a model failing
its health probe 503 with Retry-After, a request past its timeout 504, an inference failure 500
for the request that caused it only. Errors on /v1 take OpenAI's shape (and its 400 for any
invalid request), the others `{"error": message}`. A client that disconnects before its batch
starts costs nothing: its request is dropped unrun. Shutdown (SIGTERM) is uvicorn's: stop
accepting, finish in-flight requests, then the batcher drains and the process exits 0.

Opens the output directory through `outdir.py`; never imports passes or search.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mahir.errors import Malformed, NotFound
from mahir.outdir import OutputDir
from mahir.serve.batcher import BatcherConfig
from mahir.serve.embeddings import encode_embeddings, parse_embeddings
from mahir.serve.http import (
    EXCEPTION_HANDLERS,
    check_model,
    guarded,
    live,
    prometheus,
    read_body,
    ready,
    run_uvicorn,
    until_disconnect,
)
from mahir.serve.images import classified
from mahir.serve.metrics import ServerMetrics
from mahir.serve.protocol import (
    DATATYPES,
    HEADER_LENGTH,
    encode_infer,
    parse_infer,
    read_json,
    v2_shape,
)
from mahir.serve.served import ServeConfig, ServedModel


def build_app(opened: OutputDir, config: ServeConfig) -> Starlette:
    """The server for one output directory; its batcher runs from the app's startup to its
    shutdown (the ASGI lifespan: uvicorn's, or each Ray Serve replica's)."""
    app = Starlette(routes=ROUTES, exception_handlers=EXCEPTION_HANDLERS, lifespan=_lifespan)
    app.state.served = ServedModel(opened, config, ServerMetrics())
    return app


@asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    served: ServedModel = app.state.served
    served.start()
    yield
    await served.stop()


def _served(request: Request) -> ServedModel:
    served: ServedModel = request.app.state.served
    return served


def _known(request: Request) -> ServedModel:
    """The served model, if the path names it."""
    served, name = _served(request), request.path_params["name"]
    if name != served.name:
        raise NotFound(f"no model {name!r}; this server serves {served.name!r}")
    return served


async def server_metadata(request: Request) -> Response:
    return JSONResponse({"name": "mahir", "version": "1", "extensions": ["binary_tensor_data"]})


async def model_metadata(request: Request) -> Response:
    return JSONResponse(_metadata(_known(request)))


async def model_ready(request: Request) -> Response:
    served = _known(request)
    is_ready = served.ready
    return JSONResponse({"name": served.name, "ready": is_ready}, 200 if is_ready else 503)


async def model_config(request: Request) -> Response:
    served = _known(request)
    return JSONResponse(_batching_config(served.name, served.config.batcher))


async def infer(request: Request) -> Response:
    served = _known(request)
    body = await read_body(request, served.config.max_body_bytes)
    length = request.headers.get(HEADER_LENGTH)
    if length is not None and not length.isdigit():
        raise Malformed(f"{HEADER_LENGTH} is {length!r}: send the JSON header's length in bytes")
    decode = served.images.decode if served.images else None
    header = None if length is None else int(length)
    parsed = parse_infer(body, header, served.opened.spec.inputs, decode)
    served.rules.check(parsed.inputs)
    outputs = await until_disconnect(request, served.batcher.submit(parsed.inputs))
    outputs = classified(outputs, parsed, served.images)
    content, header_length = encode_infer(served.name, parsed, outputs)
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(
        content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)}
    )


async def embeddings(request: Request) -> Response:
    served = _served(request)
    embedder = served.embedder
    if embedder is None:
        raise NotFound(
            f"{served.name} is not a sentence encoder: use /v2/models/{served.name}/infer"
        )
    parsed = parse_embeddings(read_json(await read_body(request, served.config.max_body_bytes)))
    check_model(parsed.model, served.name)
    vectors, tokens = await until_disconnect(request, embedder.embed(parsed))
    content = encode_embeddings(parsed, vectors, tokens, served.name)
    return Response(content, media_type="application/json")


ROUTES = [
    Route("/v2/health/live", live),
    Route("/v2/health/ready", ready),
    Route("/v2", server_metadata),
    Route("/v2/models/{name}", model_metadata, middleware=guarded("metadata")),
    Route("/v2/models/{name}/ready", model_ready, middleware=guarded("ready")),
    Route("/v2/models/{name}/config", model_config, middleware=guarded("config")),
    Route("/v2/models/{name}/infer", infer, methods=["POST"], middleware=guarded("infer")),
    Route("/v1/embeddings", embeddings, methods=["POST"], middleware=guarded("embeddings")),
    Route("/metrics", prometheus),
]


def _metadata(served: ServedModel) -> dict[str, Any]:
    spec = served.opened.spec
    return {
        "name": served.name,
        "versions": ["1"],
        "platform": f"mahir_{served.opened.manifest.get('runtime', 'unknown')}",
        "inputs": [
            {
                "name": t.name,
                "datatype": DATATYPES.get(t.dtype, t.dtype),
                "shape": v2_shape(t.shape),
            }
            for t in spec.inputs
        ],
        "outputs": [{"name": name} for name in spec.outputs],
    }


def _batching_config(name: str, batcher: BatcherConfig) -> dict[str, Any]:
    """The batching in force, in the shape of Triton's model-configuration extension (what
    `tritonclient`'s `get_model_config` reads), plus mahir's own settings beside it."""
    return {
        "name": name,
        "max_batch_size": batcher.max_batch_size,
        "dynamic_batching": {
            "max_queue_delay_microseconds": int(batcher.max_delay_ms * 1000),
            "default_queue_policy": {"max_queue_size": batcher.max_queue},
        },
        "mahir_batching": {
            "max_batch_tokens": batcher.max_batch_tokens,
            "max_padding": batcher.max_padding,
            "group_by_length": batcher.group_by_length,
            "timeout_ms": batcher.timeout_ms,
        },
    }


def run_server(opened: OutputDir, config: ServeConfig) -> None:
    """Serve until SIGTERM or Ctrl-C; in-flight requests finish first (`http.run_uvicorn`)."""
    run_uvicorn(build_app(opened, config), config.host, config.port)
