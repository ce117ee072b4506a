"""What every mahir server shares around its model endpoints: health, Prometheus, the API key,
errors as HTTP answers, request bodies, client disconnects and uvicorn's start and drain.

The encoder server (`app.py`) and the LLM server (`llm_app.py`) each keep the thing they serve
in `app.state.served`; these pieces read from it only `ready`, `metrics` (an `HttpMetrics`) and
`config.api_key`. Errors become HTTP answers in one place (`error_answer`), by mahir's error
tree (`errors.HTTP_STATUS`); on /v1 they take OpenAI's shape (and its 400 for any invalid
request), elsewhere `{"error": message}`. Knows HTTP and the error tree; nothing of models.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import time
from collections.abc import Awaitable, Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mahir.errors import (
    HTTP_STATUS,
    ClientClosed,
    MahirError,
    NotFound,
    RequestError,
    RuntimeFailure,
    TooLarge,
    Unauthorized,
    first_line,
    nearest,
)


def served_state(request: Request) -> Any:
    """What the app serves (`ServedModel`, `LlmServed`): set at build time on `app.state`."""
    return request.app.state.served


async def live(request: Request) -> Response:
    return JSONResponse({"live": True})


async def ready(request: Request) -> Response:
    is_ready = served_state(request).ready
    return JSONResponse({"ready": is_ready}, 200 if is_ready else 503)


async def prometheus(request: Request) -> Response:
    content = served_state(request).metrics.render()
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


def guarded(endpoint: str) -> list[Middleware]:
    """Around a model endpoint, outermost first: every answer counted, then the key checked."""
    return [Middleware(Metered, endpoint=endpoint), Middleware(Authorized)]


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


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and int(declared) > limit:
        raise TooLarge(f"the body is {int(declared)} bytes, the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise TooLarge(f"the body exceeds the {limit}-byte limit")
    return bytes(body)


async def until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Await `work`, cancelling it if the client goes away first (its batch not yet started
    then drops it unrun). The runtime's own errors become RuntimeFailure here, the boundary:
    the batcher has already made sure they fail only the request that caused them."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected(request.receive))
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


def freeze_startup_heap() -> None:
    """Hide what is loaded before serving from the garbage collector. torch, transformers, the
    model and its tokenizer are millions of objects that live as long as the server, and each
    full collection scanned them all, pausing the event loop and every request waiting on it:
    p99 was ~8x p50 (a 1-layer encoder, 64 clients, 2 cores: 194 against 25 ms; frozen, 45 ms
    and 1.18x the requests/s, `benchmarks/server_heap.py`, benchmarks/README.md)."""
    gc.collect()
    gc.freeze()


async def disconnected(receive: Receive) -> None:
    """Returns when the client has gone away."""
    while (await receive())["type"] != "http.disconnect":
        pass


def run_uvicorn(app: Starlette, host: str, port: int) -> None:
    """Serve until SIGTERM or Ctrl-C; uvicorn drains in-flight requests before exiting.
    uvicorn re-raises the signal after draining, to whatever handler was there before it; a
    SIGTERM handler that does nothing makes a drained shutdown exit 0, as orchestrators expect."""
    import signal

    import uvicorn

    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    freeze_startup_heap()

    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=30,
    )


def openai_error(status: int, message: str, param: str | None, code: str | None) -> Any:
    """An error body in OpenAI's shape, which its clients parse and show."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def check_model(asked: str | None, served: str) -> None:
    """An OpenAI request's `model`, when it names one, must be the one served."""
    if asked is not None and asked != served:
        raise NotFound(
            f"the model {asked!r} does not exist; this server serves {served!r}",
            param="model",
            code="model_not_found",
        )
