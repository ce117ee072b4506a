"""`mahir serve` for an LLM output directory: OpenAI's chat and completions APIs over the winner
of `mahir optimize --llm`.

Endpoints: `POST /v1/chat/completions` (the model's chat template), `POST /v1/completions`,
`GET /v1/models`, health (`/v2/health/live`, `/v2/health/ready`, as the encoder server names
them) and Prometheus `/metrics` (time to first token, between tokens, tokens, sequences running
and waiting). A request is checked whole before any work (`openai_chat.py`; a prompt that does
not leave room in the context for what it asks is a 400), then waits for the scheduler
(`llm_scheduler.py`: a full queue is a 503 with Retry-After, a passed deadline a 504, or an error
event in a stream), and its tokens become text through `llm_text.py`. `n` choices are `n`
sequences of the scheduler, all admitted or none, their pieces merged as they come (each chunk
names its choice). `stream: true` answers as server-sent events ending with `data: [DONE]`. A
client that goes away stops its generations at the next token, which frees their slots. The
API key, errors, metrics wrappers and uvicorn's drain on SIGTERM are the encoder server's
(`http.py`).

Opens nothing itself (`llm_outdir.py` did); never imports passes or search.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from mahir.errors import HTTP_STATUS, MahirError, Mismatch, RuntimeFailure, first_line, nearest
from mahir.families.decoder import Decoder
from mahir.generation import Generator, Sampling, Token
from mahir.serve.http import (
    EXCEPTION_HANDLERS,
    check_model,
    disconnected,
    guarded,
    live,
    openai_error,
    prometheus,
    read_body,
    ready,
    run_uvicorn,
    served_state,
    until_disconnect,
)
from mahir.serve.llm_scheduler import Scheduler, SchedulerConfig, TokenStream
from mahir.serve.llm_text import TextStream
from mahir.serve.metrics import LlmMetrics
from mahir.serve.openai_answers import Answer, Scored, Written, usage
from mahir.serve.openai_chat import LlmRequest, parse_chat, parse_completion
from mahir.serve.protocol import read_json
from mahir.serve.served import ServeConfig
from mahir.serve.structured import GrammarConstraint, Grammars, structure_of
from mahir.serve.tool_calls import ToolCall, ToolCallReader, check_template

DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class Piece:
    """Of one choice, as its tokens come: new text and the tokens it came from (`Token`s where
    log-probabilities were asked; stop tokens left out), the finish reason at the end (else
    None), and the tokens generated so far."""

    text: str
    tokens: list[int]
    finish: str | None
    count: int
    calls: list[ToolCall] = dataclasses.field(default_factory=list)
    """Tool calls completed by these tokens (chat with tools)."""


class LlmServed:
    """The served LLM: its generator behind the scheduler, its family (tokenizer, chat
    template, stop tokens), the server's settings and metrics: all the handlers read."""

    def __init__(self, generator: Generator, family: Decoder, name: str, config: ServeConfig):
        self.family, self.name, self.config = family, name, config
        self.metrics = LlmMetrics(getattr(generator, "kv_cache_usage", None))
        self.context = min(generator.context_length, family.context_length)
        self.engine = generator.engine
        self.token_logprobs = bool(getattr(generator, "token_logprobs", False))
        self.top_logprobs: int | None = getattr(generator, "top_logprobs", None)
        """The most alternatives beside each token the engine reports; None: as many as asked."""
        self.constrained = bool(getattr(generator, "constrained", False))
        self.grammars = Grammars(family.tokenizer, family.vocab_size, family.stop_token_ids)
        batcher = config.batcher
        scheduling = SchedulerConfig(batcher.max_queue, batcher.timeout_ms / 1000)
        self.scheduler = Scheduler(generator, scheduling, self.metrics.observer())
        self.created = int(time.time())
        self.started = False

    @property
    def ready(self) -> bool:
        return self.started and not self.scheduler.closing

    def prompt_ids(self, request: LlmRequest) -> list[int]:
        """The prompt as the model reads it: chat messages through its chat template."""
        prompt, family = request.prompt, self.family
        if isinstance(prompt, str):
            return family.encode(prompt)
        if request.kind == "completion":
            ids = [int(t) for t in prompt]  # type: ignore[arg-type]
            if min(ids) < 0 or max(ids) >= family.vocab_size:
                raise Mismatch(f"token ids must be in [0, {family.vocab_size})", param="prompt")
            return ids
        if not family.chat:
            raise Mismatch(
                f"{self.name} has no chat template: use /v1/completions", param="messages"
            )
        if request.tools:
            check_template(family.tokenizer, self.name)
        try:
            return family.prompt_ids(prompt, request.tools)  # type: ignore[arg-type]
        except Exception as err:  # the template's own checks (jinja2 raises its own errors)
            raise Mismatch(
                f"the chat template refused the messages: {first_line(err)}", param="messages"
            ) from err

    def sampling(self, request: LlmRequest, prompt: list[int], choice: int = 0) -> Sampling:
        """What the request asks for choice `choice`, inside the context: refused before any
        work otherwise. A seeded request's choices sample with seeds seed, seed + 1, ...: each
        reproducible, and no two alike."""
        room = self.context - len(prompt)
        asked = request.max_tokens or room
        if room < 1 or asked > room:
            field = "messages" if request.kind == "chat" else "prompt"
            raise Mismatch(
                f"the prompt is {len(prompt)} tokens and {asked} more were asked; the model's "
                f"context holds {self.context}: shorten the prompt or lower max_tokens",
                param=field,
                code="context_length_exceeded",
            )
        if request.logprobs is not None and not self.token_logprobs:
            raise Mismatch(
                f"the {self.engine} engine does not report log-probabilities here (PyTorch, "
                "llama.cpp, vLLM and OpenVINO GenAI serving 2 or more slots do): leave "
                "logprobs out",
                param="logprobs",
            )
        most = self.top_logprobs
        if request.logprobs is not None and most is not None and request.logprobs > most:
            field = "top_logprobs" if request.kind == "chat" else "logprobs"
            raise Mismatch(
                f"the {self.engine} engine reports at most {most} alternatives beside each "
                f"token: ask {field} {most}",
                param=field,
            )
        seed = None if request.seed is None else request.seed + choice
        return self.family.sampling(
            asked,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=seed,
            logprobs=request.logprobs,
            constraint=self.constraint(request),
        )

    def constraint(self, request: LlmRequest) -> GrammarConstraint | None:
        """A fresh constraint for one sequence of `request`, where it asks for structure."""
        asked = structure_of(request)
        if asked is None:
            return None
        structure, param = asked
        if not self.constrained:
            raise Mismatch(
                f"the {self.engine} engine cannot hold its tokens to a grammar here (an "
                "OpenVINO IR exported without its tokenizer IRs): optimize the model again with "
                f"this mahir, or leave {param} out",
                param=param,
            )
        return self.grammars.constraint(structure, param)

    def scored(self, request: LlmRequest, tokens: list[int]) -> list[Scored] | None:
        """`tokens`' log-probabilities as the answer writes them; None where not asked."""
        if request.logprobs is None:
            return None
        decode = self.family.tokenizer.decode
        written = []
        for token in tokens:
            if not isinstance(token, Token):  # an engine path that dropped them: never silent
                raise RuntimeFailure(f"the {self.engine} engine gave a token without its scores")
            top = tuple((decode([i]), logprob) for i, logprob in token.top)
            written.append(Scored(decode([token]), token.logprob, top))
        return written


def build_llm_app(
    generator: Generator, family: Decoder, name: str, config: ServeConfig
) -> Starlette:
    app = Starlette(routes=ROUTES, exception_handlers=EXCEPTION_HANDLERS, lifespan=_lifespan)
    app.state.served = LlmServed(generator, family, name, config)
    return app


@asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    served: LlmServed = app.state.served
    if served.constrained:  # an engine that takes no grammar never needs the tokenizer
        await asyncio.to_thread(served.grammars.warm)
    served.started = True
    yield
    await served.scheduler.stop()


async def chat_completions(request: Request) -> Response:
    return await _complete(request, parse_chat)


async def completions(request: Request) -> Response:
    return await _complete(request, parse_completion)


async def models(request: Request) -> Response:
    served: LlmServed = served_state(request)
    model = {
        "id": served.name,
        "object": "model",
        "created": served.created,
        "owned_by": "mahir",
        "max_model_len": served.context,
    }
    return _json({"object": "list", "data": [model]})


async def _complete(request: Request, parse: Callable[[Any], LlmRequest]) -> Response:
    served: LlmServed = served_state(request)
    parsed = parse(read_json(await read_body(request, served.config.max_body_bytes)))
    check_model(parsed.model, served.name)
    prompt = served.prompt_ids(parsed)
    samplings = [served.sampling(parsed, prompt, choice) for choice in range(parsed.n)]
    served.metrics.prompt_tokens.inc(len(prompt))
    answer = Answer.new(parsed.kind, served.name)
    # Admitted before the answer starts: a full queue is a 503, not an error inside a 200.
    streams = await until_disconnect(request, _start_all(served.scheduler, prompt, samplings))

    def stop() -> None:
        for stream in streams:
            stream.cancel()

    pieces = [
        _pieces(served, parsed, prompt, sampling, tokens)
        for sampling, tokens in zip(samplings, streams, strict=True)
    ]
    if parsed.stream:
        events = _events(served, _merged(pieces), parsed, prompt, answer, streams[0])
        return EventStream(events, stop)
    try:
        choices = await until_disconnect(request, asyncio.gather(*map(_whole, pieces)))
    finally:
        stop()
    generated = sum(choice.count for choice in choices)
    written = [
        Written(c.text, c.finish or "length", served.scored(parsed, c.tokens), c.calls)
        for c in choices
    ]
    return _json(answer.whole(written, usage(prompt, generated, streams[0].cached_tokens)))


async def _start_all(
    scheduler: Scheduler, prompt: list[int], samplings: list[Sampling]
) -> list[TokenStream]:
    """One stream per choice, all admitted or none: a refusal (or the client leaving) stops
    the ones already started."""
    streams: list[TokenStream] = []
    try:
        for sampling in samplings:
            streams.append(await scheduler.start(prompt, sampling))
    except BaseException:
        for stream in streams:
            stream.cancel()
        raise
    return streams


async def _pieces(
    served: LlmServed,
    request: LlmRequest,
    prompt: list[int],
    sampling: Sampling,
    tokens: TokenStream,
) -> AsyncGenerator[Piece, None]:
    """One choice's pieces, as its tokens come; with tools, the calls read out of the text."""
    text = TextStream(served.family.tokenizer, prompt, request.stop)
    reader = ToolCallReader(parallel=request.parallel_tool_calls)
    read = reader.add if request.reads_tool_calls else lambda delta: (delta, [])
    last, taken = None, []
    async for last in tokens:
        if last not in sampling.stop_token_ids:
            taken.append(last)
        delta, calls = read(text.add(last))
        if delta or calls:
            yield Piece(delta, taken, None, tokens.count, calls)
            taken = []
        if text.stopped:  # a stop string: the text ends before it
            break
    stopped = text.stopped or last in sampling.stop_token_ids
    delta, calls = read(text.finish())
    if request.reads_tool_calls:
        rest, more = reader.finish()
        delta, calls = delta + rest, calls + more
    finish = "length" if not stopped else "tool_calls" if reader.calls else "stop"
    yield Piece(delta, taken, finish, tokens.count, calls)


async def _whole(pieces: AsyncGenerator[Piece, None]) -> Piece:
    """A choice's pieces as one."""
    parts: list[Piece] = [piece async for piece in pieces]
    tokens = [token for piece in parts for token in piece.tokens]
    calls = [call for piece in parts for call in piece.calls]
    text = "".join(p.text for p in parts)
    return Piece(text, tokens, parts[-1].finish, parts[-1].count, calls)


async def _merged(
    choices: list[AsyncGenerator[Piece, None]],
) -> AsyncGenerator[tuple[int, Piece], None]:
    """Every choice's pieces as they come, each with its choice's index."""
    arrived: asyncio.Queue[tuple[int, Piece | Exception | None]] = asyncio.Queue()

    async def pump(index: int, pieces: AsyncGenerator[Piece, None]) -> None:
        try:
            async for piece in pieces:
                arrived.put_nowait((index, piece))
        except Exception as err:  # raised where the pieces are read, as from one stream
            arrived.put_nowait((index, err))
        finally:
            arrived.put_nowait((index, None))

    pumps = [asyncio.ensure_future(pump(i, pieces)) for i, pieces in enumerate(choices)]
    try:
        running = len(pumps)
        while running:
            index, item = await arrived.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in pumps:
            task.cancel()


async def _events(
    served: LlmServed,
    pieces: AsyncGenerator[tuple[int, Piece], None],
    request: LlmRequest,
    prompt: list[int],
    answer: Answer,
    first: TokenStream,
) -> AsyncGenerator[bytes, None]:
    """The stream's events: a chat opens each choice's assistant turn, then text (with its
    tokens' log-probabilities where asked), each choice's finish reason, the usage when asked
    (how much of the prompt came from the engine's prefix cache: the `first` choice's stream
    knows), [DONE]; an error after the start is an error event."""
    with_usage = request.include_usage
    counts, offsets, called = [0] * request.n, [0] * request.n, [0] * request.n
    try:
        if request.kind == "chat":
            for index in range(request.n):
                yield _event(answer.chunk(None, None, usage=with_usage, index=index))
        async for index, piece in pieces:
            counts[index] = piece.count
            scored = served.scored(request, piece.tokens)
            logprobs = answer.logprobs(scored, offsets[index]) if piece.tokens else None
            offsets[index] += len(piece.text)
            if piece.text:
                yield _event(
                    answer.chunk(piece.text, None, usage=with_usage, index=index, logprobs=logprobs)
                )
                logprobs = None
            if piece.calls:
                places = enumerate(piece.calls, called[index])
                called[index] += len(piece.calls)
                yield _event(
                    answer.chunk(
                        "", None, usage=with_usage, index=index, logprobs=logprobs, calls=[*places]
                    )
                )
                logprobs = None
            if piece.finish is not None:  # with the last tokens' scores if no text came of them
                yield _event(
                    answer.chunk("", piece.finish, usage=with_usage, index=index, logprobs=logprobs)
                )
        if with_usage:
            yield _event(answer.usage_chunk(usage(prompt, sum(counts), first.cached_tokens)))
    except MahirError as err:
        status = nearest(err, HTTP_STATUS) or 500
        yield _event(openai_error(status, str(err), None, None))
    yield DONE


class EventStream(StreamingResponse):
    """Server-sent events, sent until the last one or until the client goes away: `stop` is
    called then at once (it stops the generation at its next token), and in any case at the end."""

    def __init__(self, events: AsyncGenerator[bytes, None], stop: Callable[[], None]) -> None:
        super().__init__(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
        self._events, self._stop = events, stop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        gone = asyncio.ensure_future(disconnected(receive))
        try:
            await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._stop()
            gone.cancel()
            pump.cancel()  # a no-op once it is done
        with contextlib.suppress(asyncio.CancelledError, OSError):  # OSError: the client left
            await pump

    async def _pump(self, send: Send) -> None:
        start = {
            "type": "http.response.start",
            "status": self.status_code,
            "headers": self.raw_headers,
        }
        try:
            await send(start)
            async for event in self._events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self._events.aclose()


def _event(body: Any) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


def _json(body: Any) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


ROUTES = [
    Route("/v2/health/live", live),
    Route("/v2/health/ready", ready),
    Route("/v1/models", models, middleware=guarded("models")),
    Route(
        "/v1/chat/completions",
        chat_completions,
        methods=["POST"],
        middleware=guarded("chat_completions"),
    ),
    Route("/v1/completions", completions, methods=["POST"], middleware=guarded("completions")),
    Route("/metrics", prometheus),
]


def run_llm_server(generator: Generator, family: Decoder, name: str, config: ServeConfig) -> None:
    """Serve until SIGTERM or Ctrl-C; running streams finish first (`http.run_uvicorn`)."""
    run_uvicorn(build_llm_app(generator, family, name, config), config.host, config.port)
