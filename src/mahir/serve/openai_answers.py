"""OpenAI's chat and completions answers: a whole answer, its stream chunks and the usage, in
the shapes the stock `openai` client reads; tokens' log-probabilities (chat's `content` list or
completions' parallel lists) and tool calls written as each API writes them.

Knows JSON shapes only; nothing of HTTP, tokenizers or engines.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from mahir.serve.tool_calls import ToolCall


@dataclass(frozen=True, slots=True)
class Scored:
    """One generated token as its log-probabilities are written: its text, its log-probability,
    and the most likely tokens' (text, log-probability)."""

    text: str
    logprob: float
    top: tuple[tuple[str, float], ...]


@dataclass(frozen=True, slots=True)
class Written:
    """One choice of a non-streamed answer."""

    text: str
    finish: str
    scored: Sequence[Scored] | None = None
    """Its tokens' log-probabilities, where asked."""
    calls: Sequence[ToolCall] = ()
    """The tools it called (chat)."""


@dataclass(frozen=True, slots=True)
class Answer:
    """How the answers to one request are written: its id, time and model, said once."""

    kind: Literal["chat", "completion"]
    model: str
    id: str
    created: int

    @classmethod
    def new(cls, kind: Literal["chat", "completion"], model: str) -> Answer:
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        return cls(kind, model, f"{prefix}-{uuid.uuid4().hex}", int(time.time()))

    def whole(self, choices: Sequence[Written], usage: dict[str, Any]) -> dict[str, Any]:
        """A non-streamed answer: each choice in index order."""
        written = []
        for index, choice in enumerate(choices):
            logprobs = self.logprobs(choice.scored, 0)
            one: dict[str, Any] = {
                "index": index,
                "finish_reason": choice.finish,
                "logprobs": logprobs,
            }
            if self.kind == "chat":
                one["message"] = _assistant(choice.text, choice.calls)
            else:
                one["text"] = choice.text
            written.append(one)
        return self._shell("chat.completion", "text_completion", written, usage=usage)

    def chunk(
        self,
        text: str | None,
        finish: str | None,
        *,
        usage: bool,
        index: int = 0,
        logprobs: dict[str, Any] | None = None,
        calls: Sequence[tuple[int, ToolCall]] = (),
    ) -> dict[str, Any]:
        """A stream chunk of choice `index`: `text` None opens a chat's assistant turn; `calls`
        are tool calls with their places among the choice's calls. Every chunk carries
        `usage: null` when the client asked for the usage chunk, as OpenAI's do."""
        choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": logprobs}
        if self.kind == "chat":
            opening = {"role": "assistant", "content": ""}
            choice["delta"] = opening if text is None else {"content": text} if text else {}
            if calls:
                choice["delta"]["tool_calls"] = [call.written(place) for place, call in calls]
        else:
            choice["text"] = text or ""
        extra = {"usage": None} if usage else {}
        return self._shell("chat.completion.chunk", "text_completion", [choice], **extra)

    def logprobs(self, scored: Sequence[Scored] | None, offset: int) -> dict[str, Any] | None:
        """Tokens' log-probabilities in this API's shape (None where not asked): chat's
        `content` list, or completions' parallel lists with each token's offset in the text
        (from `offset`, where the text so far ends)."""
        if scored is None:
            return None
        if self.kind == "chat":
            return {"content": [_chat_logprob(s) for s in scored], "refusal": None}
        offsets = []
        for s in scored:
            offsets.append(offset)
            offset += len(s.text)
        return {
            "tokens": [s.text for s in scored],
            "token_logprobs": [s.logprob for s in scored],
            "top_logprobs": [dict(s.top) for s in scored],
            "text_offset": offsets,
        }

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        """The last chunk before [DONE] when `stream_options.include_usage` is set."""
        return self._shell("chat.completion.chunk", "text_completion", [], usage=usage)

    def _shell(
        self, chat: str, completion: str, choices: list[Any], **extra: Any
    ) -> dict[str, Any]:
        kind = chat if self.kind == "chat" else completion
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }


def _assistant(text: str, calls: Sequence[ToolCall]) -> dict[str, Any]:
    """A chat answer's message: with tool calls, its content is null where it is blank."""
    if not calls:
        return {"role": "assistant", "content": text}
    return {
        "role": "assistant",
        "content": text if text.strip() else None,
        "tool_calls": [call.written() for call in calls],
    }


def _chat_logprob(scored: Scored) -> dict[str, Any]:
    def entry(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    top = [entry(text, logprob) for text, logprob in scored.top]
    return entry(scored.text, scored.logprob) | {"top_logprobs": top}


def usage(prompt: Sequence[int], completion: int, cached: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; `cached`: prompt tokens the engine took from its prefix cache."""
    return {
        "prompt_tokens": len(prompt),
        "completion_tokens": completion,
        "total_tokens": len(prompt) + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
