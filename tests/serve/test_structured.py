"""Structured outputs: the grammar a request asks for, held token by token through
`generation.choose` over the default LLM's tokenizer: what it allows passes, what it forbids is
never chosen, a finished grammar allows only the stop tokens, and a schema it cannot hold to is
a 400 naming the field."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from mahir.errors import Mismatch
from mahir.generation import Sampling, Structure, choose
from mahir.serve.openai_chat import parse_chat
from mahir.serve.structured import Grammars, structure_of

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {}}}
STOPS = (0, 2)


@pytest.fixture(scope="module")
def grammars(llm_tokenizer: Any) -> Grammars:
    return Grammars(llm_tokenizer, len(llm_tokenizer), STOPS)


def request(**fields: Any) -> Any:
    return parse_chat({"messages": [{"role": "user", "content": "hi"}], **fields})


def asked(**fields: Any) -> tuple[Structure, str]:
    """The structure a request of `fields` asks for, and the field that asks."""
    found = structure_of(request(**fields))
    assert found is not None
    return found


def follows(grammars: Grammars, fields: dict[str, Any], text: str, tokenizer: Any) -> bool:
    """Whether the grammar `fields` ask for lets `text` through and may end after it."""
    structure, param = asked(**fields)
    constraint = grammars.constraint(structure, param)
    vocab = len(tokenizer)
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        if not np.isfinite(constraint.allowed(np.zeros(vocab, np.float32))[token]):
            return False
        constraint.advance(token)
    allowed = np.flatnonzero(np.isfinite(constraint.allowed(np.zeros(vocab, np.float32))))
    return set(STOPS) <= set(allowed.tolist())


def test_a_json_schema_lets_its_values_through_and_nothing_else(
    grammars: Grammars, llm_tokenizer: Any
) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    fields = {
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    }
    assert follows(grammars, fields, '{"answer": "yes"}', llm_tokenizer)
    assert not follows(grammars, fields, '{"answer": "maybe"}', llm_tokenizer)
    assert not follows(grammars, fields, '{"answer": "yes"', llm_tokenizer)  # not ended yet
    assert follows(
        grammars, {"response_format": {"type": "json_object"}}, '{"x": [1]}', llm_tokenizer
    )
    assert structure_of(request(response_format={"type": "text"})) is None


def test_forced_tool_calls_are_hermes_blocks_of_the_named_or_any_tool(
    grammars: Grammars, llm_tokenizer: Any
) -> None:
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    clock = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    tools = [WEATHER, CLOCK]
    required = {"tools": tools, "tool_choice": "required"}
    assert follows(grammars, required, call, llm_tokenizer)
    assert follows(grammars, required, call + "\n" + clock, llm_tokenizer)
    assert not follows(grammars, required, "The weather is fine.", llm_tokenizer)
    named = {"tools": tools, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}
    assert follows(grammars, named, clock, llm_tokenizer)
    assert not follows(grammars, named, call, llm_tokenizer)
    assert not follows(
        grammars, {**required, "parallel_tool_calls": False}, call + "\n" + clock, llm_tokenizer
    )
    schema = {"response_format": {"type": "json_object"}, "tools": tools}  # calls or the JSON
    assert follows(grammars, schema, call, llm_tokenizer)
    assert follows(grammars, schema, '{"weather": "fine"}', llm_tokenizer)


def test_choose_picks_the_best_token_the_grammar_allows(
    grammars: Grammars, llm_tokenizer: Any
) -> None:
    structure, param = asked(response_format={"type": "json_object"})
    logits = np.zeros(len(llm_tokenizer), np.float32)
    brace = llm_tokenizer.convert_tokens_to_ids("{")
    logits[llm_tokenizer.convert_tokens_to_ids("Hello")] = 9.0  # likelier, but not JSON
    logits[brace] = 5.0
    sampling = Sampling(8, logprobs=0, constraint=grammars.constraint(structure, param))
    token = choose(logits, sampling, np.random.default_rng(0))
    assert token == brace
    assert token.logprob < np.log(0.5)  # the model's own log-probability, not the masked one
    sampled = Sampling(8, temperature=1.0, constraint=grammars.constraint(structure, param))
    for seed in range(5):
        assert choose(
            logits, sampled, np.random.default_rng(seed)
        ) != llm_tokenizer.convert_tokens_to_ids("Hello")
        sampled = Sampling(8, temperature=1.0, constraint=grammars.constraint(structure, param))


def test_what_cannot_be_followed_is_a_400_naming_the_field(grammars: Grammars) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "foo"}}}
    structure, param = asked(response_format=bad)
    with pytest.raises(Mismatch) as raised:
        grammars.constraint(structure, param)
    assert raised.value.param == "response_format"
    assert "\n" not in str(raised.value)
    with pytest.raises(Exception, match="response_format must be"):
        request(response_format={"type": "json_schema"})
    with pytest.raises(Exception, match="not among tools"):
        request(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(Exception, match="needs tools"):
        request(tool_choice="required")


@pytest.mark.parametrize(
    ("engine", "slots"), [("llama.cpp", 1), ("llama.cpp", 2), ("torch", 1), ("torch", 2)]
)
def test_every_engine_that_chooses_in_numpy_follows_the_grammar(
    tiny_llm: Any, tiny_gguf: Any, engine: str, slots: int
) -> None:
    """The tiny random model left alone writes no JSON; held to an enum's schema, each engine
    (alone and in its continuous batch) writes one of its values, then its stop token."""
    from mahir.runtimes.engines import open_engine
    from mahir.types import RuntimeOptions

    family = tiny_llm.family
    artifact = tiny_gguf if engine == "llama.cpp" else tiny_llm.original()
    generator = open_engine(engine, artifact, RuntimeOptions(threads=1, slots=slots))
    schema = {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}},
        "required": ["answer"],
        "additionalProperties": False,  # else a weak model may write keys until max_tokens
    }
    fields = {
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    }
    structure, param = asked(**fields)
    grammars = Grammars(family.tokenizer, family.vocab_size, family.stop_token_ids)
    try:
        for seed in (None, 1):
            sampling = family.sampling(
                24,
                temperature=0 if seed is None else 1.0,
                seed=seed,
                constraint=grammars.constraint(structure, param),
            )
            tokens = list(generator.stream(family.prompt_ids("Answer in JSON"), sampling))
            assert tokens[-1] in family.stop_token_ids
            assert json.loads(family.decode(tokens))["answer"] in ("yes", "no")
    finally:
        generator.close()
