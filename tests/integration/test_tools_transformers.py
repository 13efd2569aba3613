"""Tool calling and structured output on the transformers engine, through the real stack.

A real registry and nanio S3, the inference service in-process with the transformers engine as a
child process serving the tool-calling fixture model (tests/support/tool_model.py: a tiny Qwen2
trained to call ``get_weather`` the Hermes way, answer a tool result in text and write its weather
as JSON), and the gateway, driven by the official ``openai`` client.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from modelyard.client import RegistryClient
from modelyard.inference.v1 import inference_pb2 as pb
from modelyard.registry.v1 import registry_pb2 as rpb
from services.core.artifacts import S3ArtifactStore
from tests.integration.test_gateway_real_stack import ADMIN, GREEDY, new_key, sdk, start_gateway
from tests.support import tool_model as tm
from tests.support.fake_inference import BackgroundLoop
from tests.support.inprocess_stack import deploy_ready, inference_service, registry_service, s3_bucket

pytestmark = [pytest.mark.timeout(300)]

NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, s3_server) -> Iterator[dict]:
    bg = BackgroundLoop()
    work = tmp_path_factory.mktemp("tools-real")
    s3 = s3_bucket(s3_server)
    try:
        with registry_service(bg, work, s3) as registry_addr:
            S3ArtifactStore.connect(s3).upload_dir("uploads/toolbot/base", tm.cached_tool_model())

            async def register() -> rpb.ModelVersion:
                async with RegistryClient(registry_addr) as client:
                    return await client.create_model_version(
                        parent="models/toolbot",
                        version_id="base",
                        model_version=rpb.ModelVersion(artifact_prefix="uploads/toolbot/base"),
                    )

            version = bg.run(register(), timeout=120)
            with inference_service(bg, work, s3, registry_addr) as (inference_addr, inference):
                deployment = pb.Deployment(model_version=version.name, engine=pb.ENGINE_TRANSFORMERS)
                bg.run(deploy_ready(inference, deployment, "toolbot"), timeout=330)
                gw = start_gateway(bg, work / "gateway", inference_addr, [])
                admin = httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {ADMIN}"}, timeout=30)
                try:
                    real = {"gw": gw, "key": new_key(admin, "tools")}
                    yield {"client": sdk(real)}
                finally:
                    admin.close()
                    gw.stop()
    finally:
        bg.close()


def chat(stack: dict, **kw: Any) -> Any:
    return stack["client"].chat.completions.create(model="toolbot", **{"max_tokens": 60, **GREEDY, **kw})


def streamed(stack: dict, **kw: Any) -> dict[str, Any]:
    """A streamed answer put back together by OpenAI's rules, with the raw tool-call deltas."""
    content, calls, deltas, finish = [], {}, [], None
    for chunk in chat(stack, stream=True, **kw):
        for c in chunk.choices:
            content.append(c.delta.content or "")
            for t in c.delta.tool_calls or ():
                deltas.append(t)
                call = calls.setdefault(t.index, {"id": "", "name": "", "arguments": ""})
                call["id"] = t.id or call["id"]
                call["name"] = (t.function and t.function.name) or call["name"]
                call["arguments"] += (t.function and t.function.arguments) or ""
            finish = c.finish_reason or finish
    return {
        "content": "".join(content) or None,
        "calls": [calls[i] for i in sorted(calls)],
        "deltas": deltas,
        "finish": finish,
    }


def whole(stack: dict, **kw: Any) -> dict[str, Any]:
    choice = chat(stack, **kw).choices[0]
    calls = [
        {"id": t.id, "name": t.function.name, "arguments": t.function.arguments}
        for t in choice.message.tool_calls or ()
    ]
    return {"content": choice.message.content, "calls": calls, "finish": choice.finish_reason}


def without_ids(answer: dict[str, Any]) -> dict[str, Any]:
    return {
        "content": answer["content"],
        "finish": answer["finish"],
        "calls": [(c["name"], c["arguments"]) for c in answer["calls"]],
    }


@pytest.mark.parametrize("choice", ["auto", "required", NAMED], ids=["auto", "required", "named"])
def test_tool_call_streamed_and_not(stack, choice):
    """The model's Hermes call comes back as an OpenAI tool call, streamed in OpenAI's delta shape
    (first delta: index, id, type, name and empty arguments; then argument fragments), and the
    reassembled stream equals the whole answer."""
    kw = {"messages": tm.weather_messages("Paris"), "tools": tm.TOOLS, "tool_choice": choice}
    answer = whole(stack, **kw)
    assert answer["finish"] == ("stop" if choice == NAMED else "tool_calls")  # as OpenAI reports a forced call
    assert answer["content"] is None
    assert [(c["name"], json.loads(c["arguments"])) for c in answer["calls"]] == [("get_weather", {"city": "Paris"})]
    assert answer["calls"][0]["id"].startswith("call_")

    stream = streamed(stack, **kw)
    assert without_ids(stream) == without_ids(answer)
    first = stream["deltas"][0]
    assert (first.index, first.type, first.function.name, first.function.arguments) == (
        0,
        "function",
        "get_weather",
        "",
    )
    assert first.id and first.id.startswith("call_")
    assert all(d.id is None and d.function.name is None for d in stream["deltas"][1:])


def test_named_function_is_forced(stack):
    """A named function the model would not call by itself is still called, its arguments following
    its parameters schema (constrained decoding)."""
    # The timezone is an enum here: the model never learnt get_time, and a free string lets it write until
    # max_tokens on some CPUs (the tiny model's weights differ with the machine that trained it).
    time_tool = json.loads(json.dumps(tm.TIME_TOOL))
    time_tool["function"]["parameters"]["properties"]["timezone"]["enum"] = ["UTC", "Europe/Berlin", "Asia/Tokyo"]
    answer = whole(
        stack,
        messages=tm.weather_messages("Berlin"),
        tools=[tm.WEATHER_TOOL, time_tool],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    assert answer["finish"] == "stop", answer
    assert [c["name"] for c in answer["calls"]] == ["get_time"]
    jsonschema.validate(json.loads(answer["calls"][0]["arguments"]), time_tool["function"]["parameters"])


def test_required_without_parallel_calls_gives_one_call(stack):
    answer = whole(
        stack, messages=tm.weather_messages("Tokyo"), tools=tm.TOOLS, tool_choice="required", parallel_tool_calls=False
    )
    assert [(c["name"], json.loads(c["arguments"])) for c in answer["calls"]] == [("get_weather", {"city": "Tokyo"})]


def test_tool_choice_none_leaves_the_text(stack):
    answer = whole(stack, messages=tm.weather_messages("Paris"), tools=tm.TOOLS, tool_choice="none")
    assert answer["calls"] == [] and answer["finish"] == "stop"
    assert answer["content"] == tm.tool_call_text("Paris")


def test_tool_result_is_answered_in_text(stack):
    """The follow-up turn: the assistant's call and the ``role: tool`` result go through the chat
    template, and the model answers in text."""
    first = whole(stack, messages=tm.weather_messages("Tokyo"), tools=tm.TOOLS, tool_choice="auto")
    call = first["calls"][0]
    messages = [
        *tm.weather_messages("Tokyo"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": call["arguments"]},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call["id"], "content": tm.TOOL_RESULT},
    ]
    answer = whole(stack, messages=messages, tools=tm.TOOLS)
    assert answer == {"content": tm.tool_answer("Tokyo"), "calls": [], "finish": "stop"}
    assert streamed(stack, messages=messages, tools=tm.TOOLS)["content"] == tm.tool_answer("Tokyo")


def test_json_schema_answer_validates(stack):
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": tm.WEATHER_SCHEMA, "strict": True}}
    for city in ("Berlin", "Paris"):
        text = chat(stack, messages=tm.json_messages(city), response_format=fmt).choices[0].message.content
        jsonschema.validate(json.loads(text), tm.WEATHER_SCHEMA)
    # a prompt the model never saw: the grammar still holds every token to the schema
    strict = {
        **tm.WEATHER_SCHEMA,
        "properties": {
            "city": {"type": "string", "maxLength": 8},
            "temperature": {"type": "integer", "minimum": -50, "maximum": 60},
        },
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": strict, "strict": True}}
    text = (
        chat(stack, messages=[{"role": "user", "content": "Hello!"}], response_format=fmt, max_tokens=40)
        .choices[0]
        .message.content
    )
    jsonschema.validate(json.loads(text), strict)


def test_json_object_answer_parses(stack):
    text = (
        chat(stack, messages=tm.json_messages("Tokyo"), response_format={"type": "json_object"})
        .choices[0]
        .message.content
    )
    assert isinstance(json.loads(text), dict)


def test_unsupported_schema_feature_is_named(stack):
    schema = {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}},
    }
    with pytest.raises(openai.BadRequestError) as err:
        chat(
            stack,
            messages=tm.json_messages("Paris"),
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
    assert "uniqueItems" in str(err.value)
    assert err.value.body["param"] == "response_format.json_schema.schema.properties.tags.uniqueItems", err.value.body


def test_bad_tools_are_named(stack):
    with pytest.raises(openai.BadRequestError) as err:
        chat(
            stack,
            messages=tm.weather_messages("Paris"),
            tools=tm.TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_stock_price"}},
        )
    assert err.value.body["param"] == "tool_choice.function.name" and "get_stock_price" in str(err.value)
    bad = [tm.WEATHER_TOOL, {"type": "function", "function": {"name": "get_time", "parameters": "a string"}}]
    with pytest.raises(openai.BadRequestError) as err:
        chat(stack, messages=tm.weather_messages("Paris"), tools=bad, tool_choice="required")
    assert err.value.body["param"] == "tools[1].function.parameters", err.value.body


def test_constrained_and_free_requests_share_a_batch(stack):
    """A schema-constrained answer, a forced tool call and a free answer generated at the same time
    (one batch in the engine's scheduler): each follows only its own constraint."""
    from concurrent.futures import ThreadPoolExecutor

    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": tm.WEATHER_SCHEMA, "strict": True}}
    calls = {
        "schema": lambda: whole(stack, messages=tm.json_messages("Paris"), response_format=fmt),
        "named": lambda: whole(stack, messages=tm.weather_messages("Berlin"), tools=tm.TOOLS, tool_choice=NAMED),
        "free": lambda: whole(stack, messages=tm.followup_messages("Paris"), tools=tm.TOOLS),
    }
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = {name: pool.submit(fn) for name, fn in calls.items()}
        got = {name: f.result(timeout=120) for name, f in futures.items()}
    assert json.loads(got["schema"]["content"]) == json.loads(tm.json_answer("Paris"))
    assert [(c["name"], json.loads(c["arguments"])) for c in got["named"]["calls"]] == [
        ("get_weather", {"city": "Berlin"})
    ]
    assert got["free"] == {"content": tm.tool_answer("Paris"), "calls": [], "finish": "stop"}
