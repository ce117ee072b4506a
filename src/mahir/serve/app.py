"""`mahir serve`: an output directory behind HTTP, every request through the dynamic batcher.

Endpoints: the Open Inference Protocol (KServe v2: health, model metadata, infer, in JSON or
binary tensors, as `tritonclient.http` sends them), OpenAI's `POST /v1/embeddings` for sentence
encoders (`embeddings.py`: the server tokenizes and pools, with the model's own pooling config),
and Prometheus `/metrics`. Every request's inputs are checked (`validate.py`) before they may join
a batch. Errors map onto HTTP once, here: bad bodies 400, requests too large to ever admit 413,
requests that do not fit the model 422, a full queue or a model failing its health probe 503 with
Retry-After, a request past its timeout 504, an inference failure 500 for the request that
caused it only. Errors on /v1 take OpenAI's shape (and its 400 for any invalid request), the
others `{"error": message}`. A client that disconnects before its batch starts costs nothing:
its request is dropped unrun. Shutdown (SIGTERM) is uvicorn's: stop accepting, finish in-flight
requests, then the batcher drains and the process exits 0.

Opens the output directory through `outdir.py`; never imports passes or search.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from mahir.errors import BadInput, MahirError, first_line, nearest
from mahir.families.tensor import random_inputs
from mahir.families.text import Text
from mahir.outdir import OutputDir
from mahir.serve.batcher import (
    Batcher,
    BatcherConfig,
    DeadlineExceeded,
    Overloaded,
    TooLarge,
    Unavailable,
)
from mahir.serve.embeddings import Embedder, encode_embeddings, openai_error, parse_embeddings
from mahir.serve.images import ImageCodec, classified
from mahir.serve.metrics import ServerMetrics
from mahir.serve.protocol import (
    DATATYPES,
    HEADER_LENGTH,
    Malformed,
    Mismatch,
    encode_infer,
    parse_infer,
    read_json,
    v2_shape,
)
from mahir.serve.validate import InputRules
from mahir.types import BATCH, SEQUENCE

Handler = Callable[[], Awaitable[Response]]

# Status per error class, the nearest class deciding (`errors.nearest`).
_STATUS: dict[type[MahirError], int] = {
    Malformed: 400,
    TooLarge: 413,
    Mismatch: 422,
    BadInput: 422,
    Overloaded: 503,
    Unavailable: 503,
    DeadlineExceeded: 504,
    MahirError: 500,
}


@dataclass(frozen=True, slots=True)
class ServeConfig:
    host: str = "127.0.0.1"
    """Loopback by default; binding to other interfaces must be asked for."""
    port: int = 8000
    api_key: str | None = None
    """When set, inference endpoints need `Authorization: Bearer <key>`."""
    max_body_bytes: int = 8 * 2**20
    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    truncate: bool = True
    """/v1/embeddings cuts inputs past the model's max length (False: refuses them, 400);
    a request's own `truncate` wins."""
    matryoshka_dims: tuple[int, ...] = ()
    """Shorter embedding sizes the model was trained to be cut to; /v1/embeddings honours
    `dimensions` for these and the native size only."""


class Model:
    """The served model: its session behind a batcher, the checks its inputs must pass, and
    for sentence encoders the embedder."""

    def __init__(self, opened: OutputDir, config: ServeConfig, metrics: ServerMetrics):
        self.opened = opened
        self.name = opened.name
        spec = opened.spec
        sequence = spec.sequence_inputs
        self.token_outputs = token_outputs(opened, sequence)
        text = opened.family if isinstance(opened.family, Text) else None
        self.rules = InputRules.for_model(spec, text.limits if text else None)
        probe = random_inputs(spec, {BATCH: 1, SEQUENCE: 4}, np.random.default_rng(0))
        self.batcher = Batcher(
            opened.session,
            config.batcher,
            sequence_inputs=sequence,
            token_outputs=self.token_outputs,
            observer=metrics.observer(),
            probe=probe,
        )
        self.images = ImageCodec.of(opened.family, self.batcher.check_admission)
        self.embedder: Embedder | None = None
        embeds = text is not None and text.pooling is not None and text.max_length is not None
        if config.matryoshka_dims and not embeds:
            raise BadInput(f"--matryoshka-dims: {self.name} is not a sentence encoder; drop it")
        if embeds:
            native = opened.session.run(probe)[spec.outputs[0]].shape[-1]
            self.embedder = Embedder(
                opened,
                self.batcher,
                self.rules,
                native=native,
                dimensions=config.matryoshka_dims,
                truncate=config.truncate,
            )


def token_outputs(opened: OutputDir, sequence: frozenset[str]) -> frozenset[str]:
    """Outputs whose axis 1 follows the sequence length, found by running two lengths (which
    also warms the runtime up before the first request)."""
    if not sequence:
        return frozenset()
    runs = []
    for length in (3, 7):
        batch = {
            t.name: np.ones(
                (1, length, *tuple(d for d in t.shape[2:] if isinstance(d, int))), t.dtype
            )
            for t in opened.spec.inputs
        }
        runs.append(opened.session.run(batch))
    return frozenset(
        name
        for name, out in runs[0].items()
        if out.ndim >= 2 and out.shape[1] == 3 and runs[1][name].shape[1] == 7
    )


def build_app(opened: OutputDir, config: ServeConfig = ServeConfig()) -> FastAPI:
    metrics = ServerMetrics()
    model = Model(opened, config, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model.batcher.start()
        app.state.ready = True
        yield
        app.state.ready = False
        await model.batcher.stop()

    app = FastAPI(title="mahir", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.ready = False

    def is_ready() -> bool:
        """Started, and the session answered its probe after its last failure."""
        return bool(app.state.ready) and model.batcher.healthy

    async def guarded(
        request: Request, endpoint: str, handler: Handler, *, openai: bool = False
    ) -> Response:
        """Auth, size limit, error mapping and metrics around one endpoint's work."""
        started = time.perf_counter()
        try:
            _authorize(request, config.api_key)
            response = await handler()
        except _HttpError as err:
            response = _error_response(err.status, err.message, openai, err.param, err.code)
        except MahirError as err:
            param = getattr(err, "param", None)
            response = _error_response(nearest(err, _STATUS) or 500, str(err), openai, param)
        except Exception as err:  # an inference failure: the request that caused it only
            response = _error_response(500, f"inference failed: {first_line(err)}", openai)
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    @app.exception_handler(HTTPException)
    async def unrouted(request: Request, err: HTTPException) -> Response:
        """Starlette's own 404 and 405, in OpenAI's shape on /v1."""
        if request.url.path.startswith("/v1/"):
            return _error_response(err.status_code, str(err.detail), True, headers=err.headers)
        return JSONResponse({"detail": err.detail}, err.status_code, headers=err.headers)

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return JSONResponse({"ready": is_ready()}, 200 if is_ready() else 503)

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "mahir", "version": "1", "extensions": ["binary_tensor_data"]}

    @app.get("/v2/models/{name}")
    async def model_metadata(name: str, request: Request) -> Response:
        async def work() -> Response:
            _known(model, name)
            return JSONResponse(_metadata(model))

        return await guarded(request, "metadata", work)

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str, request: Request) -> Response:
        async def work() -> Response:
            _known(model, name)
            return JSONResponse({"name": name, "ready": is_ready()}, 200 if is_ready() else 503)

        return await guarded(request, "ready", work)

    @app.get("/v2/models/{name}/config")
    async def model_config(name: str, request: Request) -> Response:
        async def work() -> Response:
            _known(model, name)
            return JSONResponse(_batching_config(model.name, config.batcher))

        return await guarded(request, "config", work)

    # The two inference routes are plain Starlette routes: FastAPI's parameter resolution
    # costs ~30 us a request, and they read the request themselves anyway.
    async def infer(request: Request) -> Response:
        name = request.path_params["name"]

        async def work() -> Response:
            _known(model, name)
            body = await _read_body(request, config.max_body_bytes)
            length = request.headers.get(HEADER_LENGTH)
            decode = model.images.decode if model.images else None
            parsed = parse_infer(body, int(length) if length else None, opened.spec.inputs, decode)
            model.rules.check(parsed.inputs)
            outputs = await _until_disconnect(request, model.batcher.submit(parsed.inputs))
            outputs = classified(outputs, parsed, model.images)
            content, header_length = encode_infer(model.name, parsed, outputs)
            if header_length is None:
                return Response(content, media_type="application/json")
            return Response(
                content,
                media_type="application/octet-stream",
                headers={HEADER_LENGTH: str(header_length)},
            )

        return await guarded(request, "infer", work)

    async def embeddings(request: Request) -> Response:
        async def work() -> Response:
            embedder = model.embedder
            if embedder is None:
                raise _HttpError(
                    404,
                    f"{model.name} is not a sentence encoder: use /v2/models/{model.name}/infer",
                )
            parsed = parse_embeddings(read_json(await _read_body(request, config.max_body_bytes)))
            if parsed.model is not None and parsed.model != model.name:
                raise _HttpError(
                    404,
                    f"the model {parsed.model!r} does not exist; this server serves {model.name!r}",
                    param="model",
                    code="model_not_found",
                )
            vectors, tokens = await _until_disconnect(request, embedder.embed(parsed))
            content = encode_embeddings(parsed, vectors, tokens, model.name)
            return Response(content, media_type="application/json")

        return await guarded(request, "embeddings", work, openai=True)

    app.router.add_route("/v2/models/{name}/infer", infer, methods=["POST"])
    app.router.add_route("/v1/embeddings", embeddings, methods=["POST"])

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


class _HttpError(Exception):
    """An answer decided by the HTTP layer itself: auth, routing, body size."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error_response(
    status: int,
    message: str,
    openai: bool,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """The one place an error becomes an HTTP answer."""
    if status == 503:
        headers = {**(headers or {}), "Retry-After": "1"}
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    if not openai:
        return JSONResponse({"error": message}, status, headers=headers)
    if status == 422:  # OpenAI's API answers every invalid request 400
        status = 400
    if status == 401:
        code = "invalid_api_key"
    return JSONResponse(openai_error(status, message, param, code), status, headers=headers)


def _authorize(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
        raise _HttpError(401, "missing or wrong API key: send Authorization: Bearer <key>")


def _known(model: Model, name: str) -> None:
    if name != model.name:
        raise _HttpError(404, f"no model {name!r}; this server serves {model.name!r}")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and int(declared) > limit:
        raise _HttpError(413, f"the body is {int(declared)} bytes, the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _HttpError(413, f"the body exceeds the {limit}-byte limit")
    return bytes(body)


async def _until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Await `work`, cancelling it if the client goes away first (its batch not yet started
    then drops it unrun)."""
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
        raise _HttpError(499, "the client closed the connection")
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _metadata(model: Model) -> dict[str, Any]:
    spec = model.opened.spec
    return {
        "name": model.name,
        "versions": ["1"],
        "platform": f"mahir_{model.opened.manifest.get('runtime', 'unknown')}",
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
