"""Reading tool calls out of a model's text as it streams, and the chat request's tool fields:
content passes on, a tag split across pieces is held, a block becomes one call with its
arguments whole, a block that is not a call stays text, and what cannot be honoured is a 400."""

from __future__ import annotations

import json

import pytest

from mahir.errors import Malformed, Mismatch
from mahir.serve.openai_chat import parse_chat
from mahir.serve.tool_calls import ToolCall, ToolCallReader, check_template

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def read(pieces: list[str], *, parallel: bool = True) -> tuple[list[str], list[ToolCall]]:
    """The content released piece by piece (the last item is what `finish` released), and the
    calls in order."""
    reader = ToolCallReader(parallel=parallel)
    released, calls = [], []
    for piece in pieces:
        content, found = reader.add(piece)
        released.append(content)
        calls += found
    content, found = reader.finish()
    assert reader.calls == calls + found
    return [*released, content], calls + found


def characters(text: str) -> list[str]:
    return list(text)


def test_plain_text_passes_through_as_it_comes() -> None:
    released, calls = read(["The weather ", "is fine.\n\n", "Bye <tool", " and <b>"])
    assert calls == []
    assert "".join(released) == "The weather is fine.\n\nBye <tool and <b>"
    # trailing blanks wait for what follows; "<tool" could open a tag: held until it cannot
    assert released[:3] == ["The weather", " is fine.", "\n\nBye"]


@pytest.mark.parametrize("split", [lambda text: [text], characters], ids=["whole", "by-char"])
def test_a_block_becomes_one_call_however_the_text_is_split(split) -> None:  # type: ignore[no-untyped-def]
    released, calls = read(split("Let me look.\n" + CALL + "\n" + CALL.replace("Paris", "Oslo")))
    assert "".join(released) == "Let me look."
    assert [c.name for c in calls] == ["get_weather", "get_weather"]
    assert [json.loads(c.arguments) for c in calls] == [{"city": "Paris"}, {"city": "Oslo"}]
    assert calls[0].id != calls[1].id
    assert calls[0].id.startswith("call_")
    assert calls[0].written(3) == {
        "index": 3,
        "id": calls[0].id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": calls[0].arguments},
    }


def test_an_unclosed_block_at_the_end_is_a_call_when_it_parses_and_text_otherwise() -> None:
    _, calls = read([CALL.removesuffix("</tool_call>")])
    assert [c.name for c in calls] == ["get_weather"]
    released, calls = read(['<tool_call>{"name": "get_wea'])
    assert calls == []
    assert "".join(released) == '<tool_call>{"name": "get_wea'


def test_a_block_that_is_not_a_call_stays_text_and_blank_content_around_calls_is_dropped() -> None:
    released, calls = read(["<tool_call>[1, 2]</tool_call>"])
    assert calls == []
    assert "".join(released) == "<tool_call>[1, 2]</tool_call>"
    released, calls = read(["\n\n", CALL, "\n"])
    assert len(calls) == 1
    assert "".join(released) == ""
    _, calls = read([CALL.replace('"arguments"', '"parameters"')])
    assert json.loads(calls[0].arguments) == {"city": "Paris"}


def test_parallel_tool_calls_false_keeps_the_first_call_only() -> None:
    _, calls = read([CALL, CALL.replace("Paris", "Oslo")], parallel=False)
    assert [json.loads(c.arguments)["city"] for c in calls] == ["Paris"]


def test_chat_requests_carry_tools_and_earlier_calls_to_the_template() -> None:
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    request = parse_chat({"messages": history, "tools": [WEATHER], "parallel_tool_calls": False})
    assert request.tools == (WEATHER,)
    assert request.reads_tool_calls
    assert not request.parallel_tool_calls
    assistant, tool = request.prompt[1], request.prompt[2]  # type: ignore[index]
    assert assistant["content"] == ""
    assert assistant["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert tool == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
    quiet = parse_chat({"messages": history[:1], "tools": [WEATHER], "tool_choice": "none"})
    assert not quiet.reads_tool_calls


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"tools": [{"type": "function"}]}, "tools[0]"),
        ({"tools": {"get_weather": {}}}, "tools"),
        ({"tool_choice": "always"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice"),
        ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"functions": [{"name": "f"}]}, "functions"),
    ],
)
def test_tool_fields_it_cannot_honour_are_400s_naming_them(change: dict, param: str) -> None:  # type: ignore[type-arg]
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER], **change}
    with pytest.raises(Malformed) as raised:
        parse_chat(body)
    assert raised.value.param == param


def test_a_template_that_takes_no_tools_refuses_them() -> None:
    class Tokenizer:
        chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"

    with pytest.raises(Mismatch, match="takes no tools"):
        check_template(Tokenizer(), "tiny")
    Tokenizer.chat_template = "{% if tools %}{{ tools | tojson }}{% endif %} [TOOL_CALLS]"
    with pytest.raises(Mismatch, match="format mahir does not read"):
        check_template(Tokenizer(), "tiny")
    Tokenizer.chat_template = (
        "{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %} <tool_call>"
    )
    check_template(Tokenizer(), "tiny")
