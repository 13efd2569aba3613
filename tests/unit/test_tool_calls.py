"""The transformers engine's tool-call reader and request checks (services/inference/engines/tool_calls.py)."""

from __future__ import annotations

import json

import pytest

from services.inference.engines.tool_calls import (
    ToolCallStream,
    ToolRequestError,
    collect,
    merge_delta,
    resolve,
    template_messages,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}}},
}

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>'
TWO_CALLS = CALL + '\n<tool_call>\n{"name": "get_time", "arguments": {"timezone": "CET"}}\n</tool_call>'


def read_streamed(pieces: list[str]) -> tuple[str | None, list[dict], list[dict]]:
    reader = ToolCallStream()
    deltas = [d for p in pieces for d in reader.feed(p)] + reader.finish()
    content: list[str] = []
    calls: dict[int, dict] = {}
    for d in deltas:
        merge_delta(d, content, calls)
    return "".join(content) or None, [calls[i] for i in sorted(calls)], deltas


def without_ids(calls: list[dict]) -> list[tuple[str, str]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


@pytest.mark.parametrize(
    "text",
    [
        CALL,
        TWO_CALLS,
        "Let me check.\n" + CALL,
        "No call here, only <tool text.",
        "a < b and <tool_call> broken",
        CALL + " and after",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}',
        "trailing space  \n",
        "",
    ],
)
def test_stream_split_at_every_position_reads_like_the_whole_text(text):
    """However the text is cut into two pieces, the deltas put together give the same answer as the
    whole text read at once (content, call names and arguments)."""
    whole_content, whole_calls = collect(text)
    for cut in range(len(text) + 1):
        content, calls, _ = read_streamed([text[:cut], text[cut:]])
        assert (content, without_ids(calls)) == (whole_content, without_ids(whole_calls)), cut


def test_stream_one_character_at_a_time():
    content, calls, deltas = read_streamed(list("Sure.\n" + TWO_CALLS))
    assert content == "Sure."
    assert without_ids(calls) == [("get_weather", '{"city": "Zürich"}'), ("get_time", '{"timezone": "CET"}')]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert calls[0]["id"] != calls[1]["id"]


def test_streamed_call_has_openai_delta_shape():
    """First delta of a call: index, id, type, name and empty arguments; then the arguments alone."""
    _, _, deltas = read_streamed([CALL])
    first, second = deltas
    (head,) = first["tool_calls"]
    assert head["index"] == 0 and head["type"] == "function" and head["id"].startswith("call_")
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    assert second == {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Zürich"}'}}]}


def test_text_is_sent_before_a_call_starts_and_a_partial_tag_is_held():
    reader = ToolCallStream()
    assert reader.feed("It is") == [{"content": "It is"}]
    assert reader.feed(" <tool") == []  # might be the start of <tool_call> (and the space before it)
    assert reader.feed("box>") == [{"content": " <toolbox>"}]


def test_invalid_call_json_stays_content():
    text = "<tool_call>\n{not json}\n</tool_call>"
    assert collect(text) == (text, [])
    assert collect('<tool_call>\n{"arguments": {}}\n</tool_call>')[1] == []  # no name


def test_unclosed_call_with_whole_json_is_read():
    content, calls = collect('<tool_call>\n{"name": "get_time", "arguments": {"timezone": "UTC"}}')
    assert content is None and without_ids(calls) == [("get_time", '{"timezone": "UTC"}')]


def test_resolve_choices():
    assert resolve(None, None).choice == "none"
    assert resolve([WEATHER], None).choice == "auto"
    spec = resolve([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}, False)
    assert (spec.choice, spec.name, spec.parallel, spec.constrains) == ("named", "get_time", False, True)
    assert resolve([WEATHER], "none").parses is False
    assert resolve([WEATHER], "required").constrains


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice.function.name"),
        ([WEATHER], "sometimes", "tool_choice"),
        (None, "required", "tool_choice"),
        ([WEATHER], {"function": {"name": "get_weather"}}, "tool_choice"),
        ("get_weather", None, "tools"),
        (
            [WEATHER, {"type": "function", "function": {"name": "x", "parameters": "str"}}],
            None,
            "tools[1].function.parameters",
        ),
        (
            [WEATHER, {"type": "function", "function": {"name": "x", "parameters": {"type": "array"}}}],
            None,
            "tools[1].function.parameters",
        ),
        ([{"type": "retrieval"}], None, "tools[0].type"),
        ([{"type": "function", "function": {"name": "has space"}}], None, "tools[0].function.name"),
        ([WEATHER, WEATHER], None, "tools[1].function.name"),
        (
            [
                WEATHER,
                {
                    "type": "function",
                    "function": {
                        "name": "x",
                        "parameters": {"type": "object", "properties": {"a": {"not": {"type": "string"}}}},
                    },
                },
            ],
            "required",
            "tools[1].function.parameters.properties.a.not",
        ),
    ],
)
def test_bad_tools_name_the_field(tools, choice, param):
    with pytest.raises(ToolRequestError) as err:
        resolve(tools, choice)
    assert err.value.param == param
    assert str(err.value).startswith(f"{param}: ")


def test_unsupported_parameters_are_fine_when_not_constrained():
    odd = {"type": "function", "function": {"name": "x", "parameters": {"type": "object", "not": {}}}}
    assert resolve([odd], "auto").choice == "auto"


def test_template_messages_turn_arguments_into_objects():
    messages = [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "2"},
    ]
    out = template_messages(messages)
    assert out[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert messages[0]["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'  # the input is not changed
    assert out[1] is messages[1]
    assert json.dumps(out[0]["tool_calls"][0]["function"]["arguments"]) == '{"a": 1}'
