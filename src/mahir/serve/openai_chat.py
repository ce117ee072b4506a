"""OpenAI's chat and completions APIs, as the stock `openai` client speaks them: requests checked
into one `LlmRequest`, answers and stream chunks written in OpenAI's shapes.

Honoured: `messages` (string content or text parts) or `prompt` (a string, token ids, or a list
of one of them), `max_tokens` (`max_completion_tokens` too), `temperature` and `top_p` (OpenAI's
defaults: 1 and 1, so an unset temperature samples), `seed`, `stop` (up to 4 strings), `n`
(choices generated from the one prompt, up to `MAX_CHOICES`), `stream` and
`stream_options.include_usage`, and log-probabilities (chat: `logprobs` with `top_logprobs` up
to 20; completions: `logprobs` up to 5), and on chat `tools` with `tool_choice` (any of
OpenAI's) and `parallel_tool_calls`, with the assistant's `tool_calls` and "tool" messages in
the history (`tool_calls.py` reads the calls), and `response_format` (text, a JSON object, a
JSON schema; `structured.py` holds the answer to them). Refused with a 400 naming the field,
never silently ignored: `best_of` above 1, `echo`, `suffix`, `functions`. Fields OpenAI's
clients send that change nothing here (`user`, `metadata`, penalties at 0) pass.

Answers are written by `openai_answers.py`. Knows JSON shapes only; nothing of HTTP, tokenizers
or engines.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

from mahir.errors import Malformed

Messages = list[dict[str, Any]]
MAX_STOPS = 4
MAX_CHOICES = 16
"""`n` at most: each choice is a sequence of its own in the scheduler."""
MAX_TOP = {"chat": 20, "completion": 5}
"""Alternatives per token at most, as OpenAI's APIs allow them."""
ROLES = ("system", "developer", "user", "assistant", "tool")
"""The roles a chat message may have (OpenAI's, less the retired "function")."""
UNAPPLIED = ("frequency_penalty", "presence_penalty", "logit_bias")
"""Fields that change which tokens come out, which no engine here is given: a request that sets
one is refused rather than answered as if it had not."""


@dataclass(frozen=True, slots=True)
class LlmRequest:
    kind: Literal["chat", "completion"]
    prompt: str | list[int] | Messages
    """Chat messages (role, content), or a completion's text or token ids."""
    max_tokens: int | None
    """None: up to the context's end (capped by the server's default)."""
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    n: int
    """Choices to generate from the prompt."""
    logprobs: int | None
    """Log-probabilities asked: of each token and this many alternatives; None: not asked."""
    stream: bool
    include_usage: bool
    model: str | None
    tools: tuple[dict[str, Any], ...] = ()
    """Chat: the tools the model may call, as OpenAI's request gives them."""
    tool_choice: Literal["auto", "none", "required"] = "auto"
    """"auto": the model's tool calls are read into `tool_calls`; "none": its text stays text;
    "required": it must call one (of `forced_tool` alone where named)."""
    forced_tool: str | None = None
    """The function a named `tool_choice` forces."""
    parallel_tool_calls: bool = True
    """False: one tool call per choice at most."""
    response_schema: dict[str, Any] | None = None
    """Chat: the JSON schema the answer must follow (`response_format`; {"type": "object"}
    for "json_object")."""

    @property
    def reads_tool_calls(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"


def parse_chat(body: Any) -> LlmRequest:
    """A `POST /v1/chat/completions` body."""
    body = _object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Malformed("messages must be a non-empty list of {role, content}", param="messages")
    _refuse_set(body, "functions")
    wanted = body.get("logprobs")
    if wanted not in (None, True, False):
        raise Malformed("logprobs must be true or false", param="logprobs")
    top = _whole(body, "top_logprobs", 0, low=0)
    if top and not wanted:
        raise Malformed("top_logprobs needs logprobs: true", param="top_logprobs")
    logprobs = _top(top, "chat", "top_logprobs") if wanted else None
    parsed = _request(body, "chat", [_message(m, i) for i, m in enumerate(messages)], logprobs)
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise Malformed("parallel_tool_calls must be true or false", param="parallel_tool_calls")
    tools = _tools(body.get("tools"))
    choice, forced = _tool_choice(body.get("tool_choice"), tools)
    return dataclasses.replace(
        parsed,
        tools=tools,
        tool_choice=choice,
        forced_tool=forced,
        parallel_tool_calls=parallel is not False,
        response_schema=_response_schema(body.get("response_format")),
    )


def parse_completion(body: Any) -> LlmRequest:
    """A `POST /v1/completions` body."""
    body = _object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    for name in ("echo", "suffix"):
        _refuse_set(body, name)
    logprobs = None
    if body.get("logprobs") is not None:
        logprobs = _top(_whole(body, "logprobs", 0, low=0), "completion", "logprobs")
    if _whole(body, "best_of", 1, low=1) > 1:
        raise Malformed("best_of above 1 is not supported: send best_of 1", param="best_of")
    if isinstance(prompt, str) and prompt:
        return _request(body, "completion", prompt, logprobs)
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        return _request(body, "completion", [int(t) for t in prompt], logprobs)
    raise Malformed(
        "prompt must be a non-empty string or list of token ids (one prompt per request)",
        param="prompt",
    )


def _request(
    body: dict[str, Any],
    kind: Literal["chat", "completion"],
    prompt: Any,
    logprobs: int | None = None,
) -> LlmRequest:
    for name in UNAPPLIED:
        _refuse_set(body, name)
    n = _whole(body, "n", 1, low=1)
    if n > MAX_CHOICES:
        raise Malformed(
            f"n is at most {MAX_CHOICES} here, got {n}: send several requests", param="n"
        )
    limit = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = body.get(limit)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise Malformed("stream_options must be an object", param="stream_options")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise Malformed("model must be a string", param="model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool | None):
        raise Malformed("stream must be true or false", param="stream")
    return LlmRequest(
        kind=kind,
        prompt=prompt,
        max_tokens=None if max_tokens is None else _whole(body, limit, 0, low=1),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_low=True),
        seed=None if body.get("seed") is None else _whole(body, "seed", 0, low=0),
        stop=_stops(body.get("stop")),
        n=n,
        logprobs=logprobs,
        stream=bool(stream),
        include_usage=bool((options or {}).get("include_usage")),
        model=model,
    )


def _top(count: int, kind: Literal["chat", "completion"], name: str) -> int:
    """Alternatives per token, at most what OpenAI's API of this kind allows."""
    if count > MAX_TOP[kind]:
        raise Malformed(f"{name} is at most {MAX_TOP[kind]}, got {count}", param=name)
    return count


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise Malformed("the body must be a JSON object")
    return body


def _tools(tools: Any) -> tuple[dict[str, Any], ...]:
    """The request's tools, each a function with a name (and a JSON-schema `parameters`)."""
    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise Malformed("tools must be a list of {type: function, function}", param="tools")
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(tool, dict)
            or tool.get("type") != "function"
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("parameters", {}), dict)
        ):
            raise Malformed(
                f"tools[{index}] must be {{type: function, function: {{name, parameters}}}}",
                param=f"tools[{index}]",
            )
    return tuple(tools)


def _tool_choice(
    choice: Any, tools: tuple[dict[str, Any], ...]
) -> tuple[Literal["auto", "none", "required"], str | None]:
    """The tool choice and the function it names, if it names one of `tools`."""
    if choice is None or choice in ("auto", "none", "required"):
        if choice == "required" and not tools:
            raise Malformed("tool_choice required needs tools", param="tool_choice")
        return choice or "auto", None
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise Malformed(
            'tool_choice must be "auto", "none", "required" or {type: function, function: {name}}',
            param="tool_choice",
        )
    if name not in {tool["function"]["name"] for tool in tools}:
        raise Malformed(
            f"tool_choice names {name!r}, which is not among tools", param="tool_choice"
        )
    return "required", name


def _response_schema(response_format: Any) -> dict[str, Any] | None:
    """The JSON schema `response_format` asks the answer to follow; None for plain text."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    spec = response_format.get("json_schema") if kind == "json_schema" else None
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise Malformed(
            'response_format must be {type: "text"}, {type: "json_object"} or {type: '
            '"json_schema", json_schema: {name, schema}}',
            param="response_format",
        )
    return schema


def _message(message: Any, index: int) -> dict[str, Any]:
    """One chat message as the chat template takes it: role and text content, and an
    assistant's tool calls (arguments as objects, as templates write them) or a tool's id."""
    where = f"messages[{index}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise Malformed(f"{where} must be an object with a role", param=where)
    if message["role"] not in ROLES:
        raise Malformed(
            f"{where}.role is {message['role']!r}: send one of {', '.join(ROLES)}", param=where
        )
    content = message.get("content")
    calls = message.get("tool_calls") if message["role"] == "assistant" else None
    if isinstance(content, list):  # text parts
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise Malformed(f"{where}: only text content parts are supported", param=where)
        content = "".join(str(p.get("text", "")) for p in content)
    if content is None and calls:
        content = ""
    if not isinstance(content, str):
        raise Malformed(f"{where}.content must be a string or text parts", param=where)
    role = "system" if message["role"] == "developer" else message["role"]
    written: dict[str, Any] = {"role": role, "content": content}
    if calls:
        written["tool_calls"] = [
            _call(call, f"{where}.tool_calls[{i}]") for i, call in enumerate(calls)
        ]
    if role == "tool" and isinstance(message.get("tool_call_id"), str):
        written["tool_call_id"] = message["tool_call_id"]
    return written


def _call(call: Any, where: str) -> dict[str, Any]:
    """An assistant's earlier tool call, its JSON arguments read back into an object."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise Malformed(
            f"{where} must be {{id, type: function, function: {{name, arguments}}}}", param=where
        )
    arguments = function.get("arguments", "{}")
    try:
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError as err:
        raise Malformed(f"{where}.function.arguments is not JSON: {err}", param=where) from err
    return {
        "id": call.get("id"),
        "type": "function",
        "function": {"name": function["name"], "arguments": arguments},
    }


def _stops(stop: Any) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise Malformed("stop must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOPS:
        raise Malformed(f"stop holds {len(stops)} strings; at most {MAX_STOPS}", param="stop")
    return tuple(s for s in stops if s)


def _refuse_set(body: dict[str, Any], name: str) -> None:
    """Refuse `name` given a value that asks for something (0, false, empty: nothing)."""
    if body.get(name):
        raise Malformed(f"{name} is not supported by this server: leave it out", param=name)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _whole(body: dict[str, Any], name: str, default: int, *, low: int) -> int:
    value = body.get(name, default)
    value = default if value is None else value
    if not _is_int(value) or value < low:
        raise Malformed(f"{name} must be an integer >= {low}, got {value!r}", param=name)
    return int(value)


def _number(
    body: dict[str, Any],
    name: str,
    default: float,
    low: float,
    high: float,
    *,
    open_low: bool = False,
) -> float:
    value = body.get(name)
    value = default if value is None else value
    below = value <= low if open_low else value < low
    if isinstance(value, bool) or not isinstance(value, int | float) or below or value > high:
        side = "(" if open_low else "["
        raise Malformed(f"{name} must be in {side}{low:g}, {high:g}], got {value!r}", param=name)
    return float(value)
