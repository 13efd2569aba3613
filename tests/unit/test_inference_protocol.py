"""Translation between inference protos and OpenAI JSON, and small pieces of the engine and domain."""

from __future__ import annotations

import pytest

from modelyard.inference.v1 import inference_pb2 as pb
from services.core.errors import InvalidArgument, NotFound, Unimplemented
from services.inference import protocol
from services.inference.deployments import parse_name
from services.inference.engines.base import _http_error
from services.inference.engines.scheduler import _safe_end


def test_chat_body_passes_only_set_sampling_fields():
    req = pb.ChatRequest(deployment="deployments/x", messages=[
        pb.ChatMessage(role=pb.CHAT_ROLE_SYSTEM, content="be brief"),
        pb.ChatMessage(role=pb.CHAT_ROLE_ASSISTANT, tool_calls=[pb.ToolCall(id="c1", name="f", arguments="{}")]),
        pb.ChatMessage(role=pb.CHAT_ROLE_TOOL, content="42", tool_call_id="c1"),
    ], sampling=pb.SamplingParams(temperature=0.0, stop=["\n"], logprobs=True, top_logprobs=2),
        tools_json='[{"type": "function", "function": {"name": "f"}}]')
    body = protocol.chat_body(req, "alias")
    assert body["model"] == "alias"
    assert body["temperature"] == 0.0 and "top_p" not in body and "max_tokens" not in body
    assert body["stop"] == ["\n"] and body["logprobs"] is True and body["top_logprobs"] == 2
    assert body["messages"][1]["tool_calls"][0]["function"] == {"name": "f", "arguments": "{}"}
    assert body["messages"][2] == {"role": "tool", "content": "42", "tool_call_id": "c1"}
    assert body["tools"][0]["function"]["name"] == "f"


def test_completion_logprobs_is_the_top_count():
    body = protocol.complete_body(pb.CompleteRequest(prompt="hi", echo=True, sampling=pb.SamplingParams(
        max_tokens=0, logprobs=True)), "m")
    assert body == {"model": "m", "prompt": "hi", "echo": True, "max_tokens": 0, "logprobs": 0}


@pytest.mark.parametrize("req, field", [
    (pb.ChatRequest(), "messages"),
    (pb.ChatRequest(messages=[pb.ChatMessage(content="x")]), "messages[0].role"),
    (pb.ChatRequest(messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER)], tools_json="{nope"), "tools_json"),
    (pb.ChatRequest(messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER)], response_format=pb.ResponseFormat(
        type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema="[")), "response_format.json_schema"),
])
def test_bad_chat_requests_name_the_field(req, field):
    with pytest.raises(InvalidArgument) as info:
        protocol.chat_body(req, "m")
    assert info.value.violations[0].field == field


def test_chat_chunk_translation_with_logprobs_and_usage():
    chunk = protocol.chat_chunk({"id": "c", "choices": [{
        "index": 1, "delta": {"role": "assistant", "content": "Hi"}, "finish_reason": "length",
        "logprobs": {"content": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105],
                                  "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]}]}]}}]})
    choice = chunk.choices[0]
    assert (choice.index, choice.role, choice.content) == (1, pb.CHAT_ROLE_ASSISTANT, "Hi")
    assert choice.finish_reason == pb.FINISH_REASON_LENGTH
    assert choice.logprobs[0].logprob == -0.5 and choice.logprobs[0].bytes == b"Hi"
    assert not chunk.HasField("usage")
    final = protocol.chat_chunk({"id": "c", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}})
    assert final.usage.prompt_tokens == 3 and final.usage.completion_tokens == 1


def test_completion_chunk_keeps_the_missing_first_prompt_logprob_unset():
    chunk = protocol.complete_chunk({"id": "x", "choices": [{"index": 0, "text": "ab", "finish_reason": None,
                                                             "logprobs": {"tokens": ["a", "b"],
                                                                          "token_logprobs": [None, -1.0],
                                                                          "top_logprobs": [None, {"c": -0.1, "b": -1.0}]}}]})
    first, second = chunk.choices[0].logprobs
    assert not first.HasField("logprob") and second.logprob == -1.0
    assert [t.token for t in second.top_logprobs] == ["c", "b"]  # best first


def test_engine_http_errors_map_to_domain_errors():
    assert isinstance(_http_error(400, b'{"error": {"message": "bad top_p", "code": 400}}', "vllm"), InvalidArgument)
    assert isinstance(_http_error(404, b'{"detail": "Not Found"}', "vllm"), NotFound)
    err = _http_error(404, b'{"detail": "Not Found"}', "vllm")
    assert err.reason == "ENGINE_ROUTE_NOT_FOUND"
    assert _http_error(404, b'{"error": {"message": "The model `x` does not exist."}}', "vllm").reason == \
        "ENGINE_MODEL_NOT_FOUND"
    assert _http_error(500, b"boom", "vllm").reason == "ENGINE_ERROR"
    assert Unimplemented.code.name == "UNIMPLEMENTED"


@pytest.mark.parametrize("text, stops, end", [
    ("hello wor", ["world"], 6),  # "wor" may start a stop string: held back
    ("hello", ["xyz"], 5),
    ("caf\ufffd", [], 3),  # an incomplete character is held back
    ("abc", [], 3),
])
def test_safe_end_holds_back_possible_stop_prefixes(text, stops, end):
    assert _safe_end(text, stops) == end


def test_deployment_names():  # listing: tests/unit/test_inference_listing.py
    assert parse_name("deployments/chat-1") == "chat-1"
    with pytest.raises(InvalidArgument, match="name"):
        parse_name("chat")
