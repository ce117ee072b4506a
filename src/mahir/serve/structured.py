"""Structured outputs: answers held to a grammar while they are generated, token by token.

A request's `response_format` (a JSON schema, or any JSON object) and a `tool_choice` that forces
a call ("required", or a named function) become one `generation.Structure`, and that one
grammar in llguidance's Lark dialect (JSON schemas embedded with `%json`); llguidance compiles it
against the model's tokenizer and, at each step, says which tokens may come next.
`GrammarConstraint` is `generation.Constraint` over that: `choose` sets every other token's logit
to -inf before choosing, so a greedy answer is the most likely one the grammar allows, and a
finished grammar allows only the stop tokens. Engines that choose in their own process take the
grammar (vLLM) or the structure (OpenVINO GenAI). An answer cut by `max_tokens` can still end
mid-structure, as OpenAI's can ("length").

A forced call is written in the Hermes form `tool_calls.py` reads: `<tool_call>`, a JSON object
with the function's "name" (a constant) and its "arguments" (the function's `parameters`
schema), `</tool_call>`; one block, or several where parallel calls are allowed. With tools on
"auto" beside a `response_format`, the answer is either calls or the JSON.

Knows llguidance, JSON schemas and token ids; nothing of HTTP or engines.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from mahir.errors import Mismatch, RuntimeFailure
from mahir.generation import Structure
from mahir.serve.openai_chat import LlmRequest
from mahir.serve.tool_calls import CLOSE, OPEN


def structure_of(request: LlmRequest) -> tuple[Structure, str] | None:
    """What `request` holds its answers to, with the field that asked for it; None where it
    asks for nothing."""
    if request.tool_choice == "required":
        forced = request.forced_tool
        tools = [t for t in request.tools if forced in (None, t["function"]["name"])]
        parallel = request.parallel_tool_calls and forced is None
        return tool_calls(tools, parallel=parallel), "tool_choice"
    schema = request.response_schema
    if schema is None:
        return None
    if request.reads_tool_calls:
        calls = tool_calls(request.tools, parallel=request.parallel_tool_calls, or_schema=schema)
        return calls, "response_format"
    return Structure(schema), "response_format"


def tool_calls(
    tools: Sequence[dict[str, Any]],
    *,
    parallel: bool,
    or_schema: dict[str, Any] | None = None,
) -> Structure:
    """One call (several where `parallel`) of `tools`, each as a `<tool_call>` block; with
    `or_schema`, a JSON value of it instead."""
    calls = {"anyOf": [_call_schema(tool["function"]) for tool in tools]}
    return Structure(calls, tags=(OPEN, CLOSE), repeat=parallel, alternative=or_schema)


COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""JSON written as `json.dumps` writes it: free whitespace lets a weak model pad without end
(a tiny model filled a forced call's 60 tokens with spaces), and this is the form tool calls
are trained on."""


def lark_grammar(structure: Structure) -> str:
    """`structure` in llguidance's Lark dialect."""
    if structure.tags is None:
        return f"start: {_json(structure.schema)}"
    opening, closing = (_lark_string(tag) for tag in structure.tags)
    block = f'"{opening}\\n" {_json(structure.schema)} "\\n{closing}"'
    rules = [
        f"block: {block}",
        'calls: block ("\\n" block)*' if structure.repeat else "calls: block",
    ]
    alternative = structure.alternative
    start = "start: calls" if alternative is None else f"start: calls | {_json(alternative)}"
    return "\n".join([start, *rules])


def _json(schema: dict[str, Any]) -> str:
    """`schema` embedded in a grammar, written compactly."""
    return f"%json {json.dumps({**schema, 'x-guidance': COMPACT})}"


def _call_schema(function: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "name": {"const": function["name"]},
            "arguments": function.get("parameters") or {"type": "object"},
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _lark_string(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


class Grammars:
    """Grammars compiled against one model's tokenizer (built once: 0.36 s for the default
    LLM's), each checked before any work (1-2.5 ms a request)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        self._tokenizer, self._vocab, self._stops = tokenizer, vocab_size, list(stop_token_ids)

    def warm(self) -> None:
        """Compile the tokenizer now (where llguidance is installed), so that the first
        structured request does not hold the event loop for it."""
        if importlib.util.find_spec("llguidance") is not None:
            self._compiled_tokenizer  # noqa: B018  # computed and cached

    @functools.cached_property
    def _compiled_tokenizer(self) -> Any:
        import llguidance.hf

        return llguidance.hf.from_tokenizer(
            self._tokenizer, n_vocab=self._vocab, eos_token=self._stops
        )

    def constraint(self, structure: Structure, param: str) -> GrammarConstraint:
        """A fresh constraint for one sequence; a grammar llguidance refuses (a schema it
        cannot hold to) is a 400 naming `param`."""
        import llguidance

        grammar = lark_grammar(structure)
        matcher = llguidance.LLMatcher(self._compiled_tokenizer, grammar)
        if matcher.is_error():
            why = matcher.get_error().strip().splitlines()[0]
            raise Mismatch(f"{param} cannot be followed: {why}", param=param)
        return GrammarConstraint(structure, grammar, matcher, self._vocab)


class GrammarConstraint:
    """`generation.Constraint` for one sequence, over an llguidance matcher."""

    def __init__(self, structure: Structure, grammar: str, matcher: Any, vocab_size: int) -> None:
        self.structure, self.grammar = structure, grammar
        self._matcher = matcher
        self._mask = np.full((vocab_size + 31) // 32, -1, np.int32)

    def allowed(self, logits: np.ndarray) -> np.ndarray:
        self._matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        bits = np.unpackbits(self._mask.view(np.uint8), bitorder="little")[: len(logits)]
        return np.where(bits.astype(bool), logits, -np.inf)

    def advance(self, token: int) -> None:
        if not self._matcher.consume_token(int(token)):
            raise RuntimeFailure(
                f"the grammar refused token {int(token)}: {self._matcher.get_error()}"
            )
