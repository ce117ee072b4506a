"""Tool calls in the chat API: the request's `tools` go into the model's chat template, and the
calls the model writes come back as OpenAI's `tool_calls`.

A model calls a tool by writing it in the format it was trained on; the chat template shows it.
mahir reads the format most open models share (Hermes: Qwen2 to Qwen3, SmolLM3, Hermes, ...):
each call a JSON object with "name" and "arguments" between `<tool_call>` and `</tool_call>`.
A template that never mentions `tools`, or calls tools some other way, makes a request with
tools a 400 before any work, not a prompt that silently drops them.

`ToolCallReader` reads one choice's text as it streams: text outside the tags passes on as
content (a tail that could open a tag is held back until it cannot); a block is held until it
closes and then handed over as one call, its arguments whole. A block that is not such an
object stays text, as the model wrote it. Knows JSON and text only.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from mahir.errors import Mismatch
from mahir.serve.llm_text import opening_tail

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call the model made: a function's name and its arguments as JSON text."""

    id: str
    name: str
    arguments: str

    def written(self, index: int | None = None) -> dict[str, Any]:
        """OpenAI's shape of the call; a stream's delta also names its place (`index`)."""
        call = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}


def check_template(tokenizer: Any, model: str) -> None:
    """Refuse tools for a model whose chat template does not take them in the Hermes way."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # named templates: the default and "tool_use"
        template = " ".join(str(t) for t in template.values())
    if "tools" not in template:
        raise Mismatch(
            f"the chat template of {model} takes no tools: leave tools out, or serve a model "
            "trained to call them",
            param="tools",
        )
    if OPEN not in template:
        raise Mismatch(
            f"{model}'s chat template calls tools in a format mahir does not read (it reads "
            f"{OPEN} blocks): leave tools out",
            param="tools",
        )


class ToolCallReader:
    """One choice's text in, its content and calls out, as the text comes."""

    def __init__(self, *, parallel: bool = True) -> None:
        self._parallel = parallel
        """False: the first call only (OpenAI's `parallel_tool_calls`); later ones are dropped."""
        self._pending = ""
        """Text not yet judged: a tail that may open a tag, or an open block's body."""
        self._in_call = False
        self._space = ""
        """Whitespace at the end of the content so far, held until more content comes: blank
        lines around calls are not content."""
        self.calls: list[ToolCall] = []

    def add(self, text: str) -> tuple[str, list[ToolCall]]:
        """The content that may go out now, and the calls completed by `text`."""
        self._pending += text
        content, calls = [], []
        while True:
            if self._in_call:
                end = self._pending.find(CLOSE)
                if end < 0:
                    break
                body, self._pending = self._pending[:end], self._pending[end + len(CLOSE) :]
                self._in_call = False
                call = _parsed(body)
                if call is None:
                    content.append(OPEN + body + CLOSE)
                else:
                    calls.append(call)
                continue
            start = self._pending.find(OPEN)
            if start < 0:
                held = opening_tail(self._pending, (OPEN,))
                content.append(self._pending[: len(self._pending) - held])
                self._pending = self._pending[len(self._pending) - held :]
                break
            content.append(self._pending[:start])
            self._pending = self._pending[start + len(OPEN) :]
            self._in_call = True
        return self._content("".join(content)), self._kept(calls)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """What is left at the end: an open block is a call if its body is one (the model may
        stop before the closing tag), else text; trailing blank content is dropped where calls
        were made."""
        rest, calls = self._pending, []
        if self._in_call:
            call = _parsed(rest)
            rest = "" if call is not None else OPEN + rest
            calls = [call] if call is not None else []
        self._pending, self._in_call = "", False
        calls = self._kept(calls)
        content = self._content(rest)
        if not self.calls:
            content, self._space = self._space + content, ""
        return content, calls

    def _kept(self, calls: list[ToolCall]) -> list[ToolCall]:
        if not self._parallel:
            calls = calls[: max(0, 1 - len(self.calls))]
        self.calls += calls
        return calls

    def _content(self, text: str) -> str:
        """`text` less its trailing whitespace, which waits for what follows it: content, or
        a call (then it is dropped), however the text was split."""
        kept = text.rstrip()
        if not kept:
            self._space += text
            return ""
        released, self._space = self._space + kept, text[len(kept) :]
        return released


def _parsed(body: str) -> ToolCall | None:
    """A block's call: a JSON object with a "name" and its "arguments" (or "parameters")."""
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", call["name"], arguments)
