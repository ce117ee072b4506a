"""Tool calls end to end: a tiny Llama trained here to call a weather tool (and to answer from
its result) in the Hermes format its chat template shows, optimized, served by `mahir serve` on
loopback, and asked by the stock `openai` client with `tools`. The answer carries the call as
`tool_calls` (streamed or not), the next turn with the tool's result answers in text, and
`tool_choice: none` leaves the call as text."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from mahir.families.decoder import LanguageModel
from mahir.model import load_model
from mahir.serve.openai_chat import parse_chat
from tests.helpers import Server, cheapest_llm_output
from tests.models import decoder_folder

TEMPLATE = """
{%- if tools %}<|im_start|>system
You may call these tools:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content or "" }}
{%- for call in message.tool_calls or [] %}<tool_call>
{{ {"name": call.function.name, "arguments": call.function.arguments} | tojson }}
</tool_call>{% endfor %}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {  # strict: a forced call's arguments are then one of two
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
EARLIER_CALL = {
    "id": "call_0",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
ANSWERED = [
    *ASK,
    {"role": "assistant", "content": None, "tool_calls": [EARLIER_CALL]},
    {"role": "tool", "tool_call_id": "call_0", "content": "sunny, 21 C"},
]
REPLY = "It is sunny in Paris, 21 C."


def taught(model: LanguageModel, examples: list[tuple[list[int], list[int]]]) -> bool:
    """Whether `model` learned, in at most 300 steps, to answer each example's prompt with its
    answer greedily: teacher-forced, every answer token the argmax after what precedes it,
    which is what greedy decoding then reads. Only the answer's logits are computed (the
    vocabulary is most of the cost)."""
    module: Any = model.module
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    for step in range(1, 301):
        for prompt, answer in examples:
            loss = torch.nn.functional.cross_entropy(
                _logits(module, prompt, answer), torch.tensor(answer)
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if step % 10 == 0:
            with torch.no_grad():
                picks = [_logits(module, p, a).argmax(-1).tolist() for p, a in examples]
            if picks == [answer for _, answer in examples]:
                return True
    return False


def _logits(module: Any, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """The logits that predict each token of `answer` after `prompt`."""
    ids = torch.tensor([prompt + answer])
    return module(input_ids=ids, logits_to_keep=len(answer) + 1).logits[0, :-1]


@pytest.fixture(scope="module")
def tool_llm_dir(llm_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = copy.deepcopy(llm_tokenizer)
    tokenizer.chat_template = TEMPLATE
    folder = decoder_folder(tmp_path_factory.mktemp("tool-llm") / "model", "llama", tokenizer)
    model = load_model(folder, llm=True)
    family = model.family
    end = family.tokenizer.convert_tokens_to_ids("<|im_end|>")
    call = family.tokenizer(CALL_TEXT, add_special_tokens=False)["input_ids"] + [end]
    reply = family.tokenizer(REPLY, add_special_tokens=False)["input_ids"] + [end]
    tools = [WEATHER]
    ask = family.prompt_ids(parse_chat({"messages": ASK}).prompt, tools)  # as the server reads it
    answered = family.prompt_ids(parse_chat({"messages": ANSWERED}).prompt, tools)
    assert taught(model, [(ask, call), (answered, reply)]), "the tiny model did not learn"
    return cheapest_llm_output(model, tmp_path_factory.mktemp("tool") / "out")


@pytest.fixture(scope="module")
def api(tool_llm_dir: Path) -> Iterator[openai.OpenAI]:
    server = Server(tool_llm_dir)
    yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    assert server.stop() == 0


def test_a_tool_call_comes_back_as_tool_calls(api: openai.OpenAI) -> None:
    name = api.models.list().data[0].id
    answer = api.chat.completions.create(
        model=name,
        messages=ASK,
        tools=[WEATHER],
        temperature=0,
        max_tokens=40,  # type: ignore[arg-type, list-item]
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather"]  # type: ignore[union-attr]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    assert calls[0].id.startswith("call_")


def test_a_streamed_tool_call_arrives_whole_in_one_delta(api: openai.OpenAI) -> None:
    chunks = list(
        api.chat.completions.create(
            model=api.models.list().data[0].id,
            messages=ASK,  # type: ignore[arg-type]
            tools=[WEATHER],  # type: ignore[list-item]
            temperature=0,
            max_tokens=40,
            stream=True,
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [call for d in deltas for call in d.tool_calls or []]
    assert [call.index for call in calls] == [0]
    assert calls[0].function is not None
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments or "") == {"city": "Paris"}
    assert "".join(d.content or "" for d in deltas) == ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_the_tools_result_is_answered_in_text_and_tool_choice_none_keeps_text(
    api: openai.OpenAI,
) -> None:
    name = api.models.list().data[0].id
    answer = api.chat.completions.create(
        model=name,
        messages=ANSWERED,
        tools=[WEATHER],
        temperature=0,
        max_tokens=40,  # type: ignore[arg-type, list-item]
    )
    assert answer.choices[0].message.content == REPLY
    assert answer.choices[0].finish_reason == "stop"
    assert not answer.choices[0].message.tool_calls
    raw = api.chat.completions.create(
        model=name,
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="none",
        temperature=0,
        max_tokens=40,
    )
    assert raw.choices[0].message.content == CALL_TEXT
    assert raw.choices[0].finish_reason == "stop"


def test_a_forced_call_and_a_json_schema_hold_the_answer_to_them(api: openai.OpenAI) -> None:
    """After the tool's result the model answers in text; a named `tool_choice` makes it call
    the tool again, and a `response_format` makes it write the schema's JSON instead of a call."""
    name = api.models.list().data[0].id
    forced = api.chat.completions.create(
        model=name,
        messages=ANSWERED,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=60,
    )
    choice = forced.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather"]  # type: ignore[union-attr]
    arguments = json.loads(calls[0].function.arguments)  # type: ignore[union-attr]
    assert arguments["city"] in ("Paris", "Oslo")
    schema = {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    formatted = api.chat.completions.create(
        model=name,
        messages=ASK,  # type: ignore[arg-type]
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
        temperature=0,
        max_tokens=30,
    )
    assert formatted.choices[0].finish_reason == "stop"
    assert json.loads(formatted.choices[0].message.content or "")["answer"] in ("yes", "no")
