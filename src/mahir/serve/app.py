"""`mahir serve`: an output directory behind HTTP, every request through the dynamic batcher.

Endpoints: the Open Inference Protocol (KServe v2: health, model metadata, infer, in JSON or
binary tensors, as `tritonclient.http` sends them), OpenAI's `POST /v1/embeddings` for sentence
encoders (`embeddings.py`: the server tokenizes and pools, with the model's own pooling config),
and Prometheus `/metrics`. A plain Starlette app: module-level handlers that read the served
model (`served.py`) from `request.app.state`, one list of routes, and around each model endpoint
two pure ASGI wrappers, metrics outside the API-key check. No FastAPI: its parameter
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

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mahir.errors import (
    HTTP_STATUS,
    ClientClosed,
    MahirError,
    Malformed,
    NotFound,
    RequestError,
    RuntimeFailure,
    TooLarge,
    Unauthorized,
    first_line,
    nearest,
)
from mahir.outdir import OutputDir
from mahir.serve.batcher import BatcherConfig
from mahir.serve.embeddings import encode_embeddings, openai_error, parse_embeddings
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


async def live(request: Request) -> Response:
    return JSONResponse({"live": True})


async def ready(request: Request) -> Response:
    is_ready = _served(request).ready
    return JSONResponse({"ready": is_ready}, 200 if is_ready else 503)


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
    body = await _read_body(request, served.config.max_body_bytes)
    length = request.headers.get(HEADER_LENGTH)
    if length is not None and not length.isdigit():
        raise Malformed(f"{HEADER_LENGTH} is {length!r}: send the JSON header's length in bytes")
    decode = served.images.decode if served.images else None
    header = None if length is None else int(length)
    parsed = parse_infer(body, header, served.opened.spec.inputs, decode)
    served.rules.check(parsed.inputs)
    outputs = await _until_disconnect(request, served.batcher.submit(parsed.inputs))
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
    parsed = parse_embeddings(read_json(await _read_body(request, served.config.max_body_bytes)))
    if parsed.model is not None and parsed.model != served.name:
        raise NotFound(
            f"the model {parsed.model!r} does not exist; this server serves {served.name!r}",
            param="model",
            code="model_not_found",
        )
    vectors, tokens = await _until_disconnect(request, embedder.embed(parsed))
    content = encode_embeddings(parsed, vectors, tokens, served.name)
    return Response(content, media_type="application/json")


async def prometheus(request: Request) -> Response:
    content = _served(request).metrics.render()
    return Response(content, media_type="text/plain; version=0.0.4")


class Metered:
    """Counts each answer by endpoint and status, and times it (Prometheus); an exception that
    escapes every handler counts as the 500 Starlette answers for it."""

    def __init__(self, app: ASGIApp, endpoint: str) -> None:
        self.app, self.endpoint = app, endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started, status = time.perf_counter(), 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            metrics = scope["app"].state.served.metrics
            metrics.requests.labels(self.endpoint, str(status)).inc()
            metrics.latency.labels(self.endpoint).observe(time.perf_counter() - started)


class Authorized:
    """Passes only requests that carry the server's API key, when it has one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = scope["app"].state.served.config.api_key
        given = Headers(scope=scope).get("authorization", "")
        if key is None or hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            await self.app(scope, receive, send)
            return
        refused = Unauthorized(
            "missing or wrong API key: send Authorization: Bearer <key>", code="invalid_api_key"
        )
        response = await error_answer(Request(scope), refused)
        await response(scope, receive, send)


def _guarded(endpoint: str) -> list[Middleware]:
    """Around a model endpoint, outermost first: every answer counted, then the key checked."""
    return [Middleware(Metered, endpoint=endpoint), Middleware(Authorized)]


ROUTES = [
    Route("/v2/health/live", live),
    Route("/v2/health/ready", ready),
    Route("/v2", server_metadata),
    Route("/v2/models/{name}", model_metadata, middleware=_guarded("metadata")),
    Route("/v2/models/{name}/ready", model_ready, middleware=_guarded("ready")),
    Route("/v2/models/{name}/config", model_config, middleware=_guarded("config")),
    Route("/v2/models/{name}/infer", infer, methods=["POST"], middleware=_guarded("infer")),
    Route("/v1/embeddings", embeddings, methods=["POST"], middleware=_guarded("embeddings")),
    Route("/metrics", prometheus),
]


async def error_answer(request: Request, err: Exception) -> Response:
    """The one place an error becomes an HTTP answer: mahir's by its nearest class in
    `HTTP_STATUS`, Starlette's own 404 and 405 by their code, anything else a 500 (Starlette
    then logs its traceback: a bug, since inference failures arrive as RuntimeFailure)."""
    param = code = None
    if isinstance(err, RequestError):
        param, code = err.param, err.code
    if isinstance(err, MahirError):
        status, message, headers = nearest(err, HTTP_STATUS) or 500, str(err), None
    elif isinstance(err, HTTPException):
        status, message, headers = err.status_code, str(err.detail), err.headers
    else:
        status, message, headers = 500, f"internal error: {first_line(err)}", None
    return _error_response(request.scope["path"], status, message, param, code, headers)


EXCEPTION_HANDLERS = {
    MahirError: error_answer,
    HTTPException: error_answer,  # Starlette's own 404 and 405
    Exception: error_answer,  # a bug: Starlette answers with this, then logs its traceback
}


def _error_response(
    path: str,
    status: int,
    message: str,
    param: str | None,
    code: str | None,
    headers: Mapping[str, str] | None,
) -> Response:
    """OpenAI's shape on /v1 (and its 400 for every invalid request), `{"error": message}`
    elsewhere; a 503 says when to retry, a 401 how to authenticate."""
    if status == 503:
        headers = {**(headers or {}), "Retry-After": "1"}
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    if not path.startswith("/v1/"):
        return JSONResponse({"error": message}, status, headers=headers)
    if status == 422:
        status = 400
    return JSONResponse(openai_error(status, message, param, code), status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and int(declared) > limit:
        raise TooLarge(f"the body is {int(declared)} bytes, the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise TooLarge(f"the body exceeds the {limit}-byte limit")
    return bytes(body)


async def _until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Await `work`, cancelling it if the client goes away first (its batch not yet started
    then drops it unrun). The runtime's own errors become RuntimeFailure here, the boundary:
    the batcher has already made sure they fail only the request that caused them."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task not in done:
        task.cancel()
        # A gathered request that already failed would otherwise be logged as never retrieved.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        raise ClientClosed("the client closed the connection")
    try:
        return task.result()
    except MahirError:
        raise
    except Exception as err:
        raise RuntimeFailure(f"inference failed: {first_line(err)}") from err


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


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
    """Serve until SIGTERM or Ctrl-C; uvicorn drains in-flight requests before exiting.
    uvicorn re-raises the signal after draining, to whatever handler was there before it; a
    SIGTERM handler that does nothing makes a drained shutdown exit 0, as orchestrators expect."""
    import signal

    import uvicorn

    signal.signal(signal.SIGTERM, lambda signum, frame: None)

    uvicorn.run(
        build_app(opened, config),
        host=config.host,
        port=config.port,
        log_level="warning",
        timeout_graceful_shutdown=30,
    )
