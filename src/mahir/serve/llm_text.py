"""Token ids in, text out, a piece at a time: what an LLM server streams to its clients.

Two things make this more than `decode(token)`. A token can hold part of a character (byte-level
BPE splits a multi-byte character across tokens, and sentencepiece has byte fallback), and
tokenizers join tokens with context (a leading space dropped at the start of a text). So the
text is read as vLLM's detokenizer reads it: decode a short window of ids before the new ones
and after, and emit what the new ones added; while the window ends in U+FFFD (a character not
yet complete) nothing is emitted and the window grows. Second, OpenAI's `stop` strings: the
text ends before the first stop string, which is never sent, so a tail that could still become
one is held back until it cannot (or the generation ends).

Knows a tokenizer's `decode`; nothing of HTTP, engines or scheduling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

CONTEXT_TOKENS = 5
"""Prompt ids decoded before the first new one, so it reads as it does after the prompt."""


class TextStream:
    """The text of one generation, released as deltas that never split a character and never
    show a stop string."""

    def __init__(self, tokenizer: Any, prompt: Sequence[int], stops: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt[-CONTEXT_TOKENS:])
        self._prefix = 0
        """Where the decoded window starts."""
        self._read = len(self._ids)
        """Ids before this are in `text` already."""
        self._stops = tuple(s for s in stops if s)
        self.text = ""
        """Everything decoded so far (a stop string included, if one came)."""
        self._sent = 0
        """Characters of `text` released."""
        self.stopped = False
        """A stop string came: the generation should end; nothing after it is released."""

    def add(self, token: int) -> str:
        """The new text that may go out now ('' while a character or a stop string is open)."""
        self._ids.append(token)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)
        return self._release(final=False)

    def finish(self) -> str:
        """What is left when the generation has ended: the held-back tail, an unfinished
        character as U+FFFD."""
        rest = self._decode(self._ids[self._prefix :])[
            len(self._decode(self._ids[self._prefix : self._read])) :
        ]
        self.text += rest
        self._read = len(self._ids)
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        if self.stopped:
            return ""
        end = len(self.text)
        start = max(0, self._sent - max((len(s) for s in self._stops), default=0))
        found = [i for i in (self.text.find(s, start) for s in self._stops) if i >= 0]
        if found:
            end, self.stopped = min(found), True
        elif not final:
            end -= opening_tail(self.text, self._stops)
        delta = self.text[self._sent : max(end, self._sent)]
        self._sent = max(end, self._sent)
        return delta

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=True))


def opening_tail(text: str, strings: Sequence[str]) -> int:
    """Characters at the end of `text` that begin one of `strings`: a tail to hold back
    until what follows shows whether it becomes one."""
    for size in range(min(max((len(s) for s in strings), default=0), len(text)), 0, -1):
        tail = text[-size:]
        if any(s.startswith(tail) for s in strings):
            return size
    return 0
