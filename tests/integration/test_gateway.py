"""The gateway served by uvicorn, in front of a real gRPC fake inference service, driven by the
official ``openai`` client and by httpx for exact shapes (golden JSON in tests/data/gateway)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import openai
import pytest
import structlog
from structlog.testing import capture_logs

from gateway.app import create_app
from gateway.settings import GatewaySettings
from tests.support.fake_inference import BackgroundLoop, FakeInference, GatewayServer, start_fake

GOLDEN = json.loads((Path(__file__).parents[1] / "data" / "gateway" / "errors.json").read_text())
ADMIN = "admin-secret"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    bg = BackgroundLoop()
    fake = FakeInference()
    server = bg.run(start_fake(fake))
    settings = GatewaySettings(
        data_dir=tmp_path_factory.mktemp("gateway"), inference_addr=server.address, admin_token=ADMIN,
        blocked_terms="forbidden, Secret Plan", log_json=False,
        routing={"refresh_interval_s": 0.2, "eject_s": 1.0},
        timeouts={"first_token_s": 60, "idle_chunk_s": 60, "connect_s": 2},  # longer than any wait below
        quota={"usage_flush_s": 0.2})
    gw = GatewayServer(bg, create_app(settings))
    gw.wait_started()
    admin = httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {ADMIN}"})
    key = admin.post("/admin/keys", json={"name": "tests"}).json()["key"]
    yield {"url": gw.url, "fake": fake, "key": key, "admin": admin, "bg": bg}
    admin.close()
    gw.stop()
    bg.run(server.stop(0))
    bg.close()


@pytest.fixture
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack["url"] + "/v1", api_key=stack["key"], max_retries=0, timeout=20)


@pytest.fixture
def http(stack):
    with httpx.Client(base_url=stack["url"], headers={"authorization": f"Bearer {stack['key']}"}, timeout=20) as c:
        yield c


def sse_events(response: httpx.Response) -> list:
    """The data payloads of an SSE body, checking the framing (``data: ...`` + blank line)."""
    body = response.text
    assert body.endswith("data: [DONE]\n\n"), body[-200:]
    events = []
    for block in body.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_models_lists_ready_deployments_and_adapters_only(client):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids == ["tiny", "tiny:sql"]  # "warming" is not ready
    assert models.data[1].parent == "tiny" and models.data[0].owned_by == "modelyard"


def test_chat_completion_has_openai_shape_and_engine_usage(client, http, stack):
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "say hi please"}])
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.content == "Hello from the fake"
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason == "stop"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (3, 4, 7)
    raw = http.post("/v1/chat/completions", json={"model": "tiny:sql", "messages": [{"role": "user", "content": "x"}],
                                                  "max_tokens": 2, "temperature": 0.3, "n": 2}).json()
    assert set(raw) == {"id", "object", "created", "model", "choices", "usage", "system_fingerprint"}
    assert raw["model"] == "tiny:sql"
    assert raw["choices"] == [
        {"index": i, "message": {"role": "assistant", "content": "Hello from", "refusal": None, "tool_calls": None},
         "logprobs": None, "finish_reason": "length"} for i in range(2)]
    sent = stack["fake"].calls[-1].request
    assert sent.deployment == "deployments/tiny" and sent.adapter == "sql"
    assert sent.sampling.max_tokens == 2 and sent.sampling.n == 2 and abs(sent.sampling.temperature - 0.3) < 1e-9


def test_chat_stream_forwards_chunks_then_usage_then_done(client, http):
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a b"}], stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from the fake"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])

    with http.stream("POST", "/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "a"}], "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        response.read()
    events = sse_events(response)
    assert events[-1] == "[DONE]" and len(events) == 5
    assert all("usage" not in e for e in events[:-1])  # not asked for: not sent
    assert events[0]["object"] == "chat.completion.chunk" and events[0]["choices"][0]["delta"] == {
        "role": "assistant", "content": "Hello", "tool_calls": None}


def test_chat_logprobs_in_openai_shape(client):
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}], logprobs=True,
                                           top_logprobs=2, max_tokens=2)
    content = reply.choices[0].logprobs.content
    assert [c.token for c in content] == ["Hello", " from"]
    assert content[0].logprob == -0.5 and content[0].bytes == list(b"Hello")
    assert [t.token for t in content[0].top_logprobs] == ["Hello", " other"]


def test_completion_echo_logprobs_for_loglikelihood(client, stack):
    """lm-evaluation-harness loglikelihood: echo + logprobs=1 + max_tokens=0 -> prompt token logprobs."""
    reply = client.completions.create(model="tiny", prompt="The cat sat", echo=True, logprobs=1, max_tokens=0)
    choice = reply.choices[0]
    assert choice.text == "The cat sat"
    assert choice.logprobs.tokens == ["The", " cat", " sat"]
    assert choice.logprobs.token_logprobs == [None, -2.0, -3.0]
    assert choice.logprobs.top_logprobs == [None, {" cat": -2.0}, {" sat": -3.0}]
    assert choice.logprobs.text_offset == [0, 3, 7]
    sent = stack["fake"].calls[-1].request
    assert sent.echo and sent.sampling.max_tokens == 0 and sent.sampling.logprobs and sent.sampling.top_logprobs == 1


def test_completion_batch_of_prompts_and_stream(client):
    reply = client.completions.create(model="tiny", prompt=["one", "two three"], max_tokens=1, n=2)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert all(c.text == "Hello" and c.finish_reason == "length" for c in reply.choices)
    assert reply.usage.prompt_tokens == 3 and reply.usage.completion_tokens == 4
    chunks = list(client.completions.create(model="tiny", prompt="x", stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Hello from the fake"
    assert chunks[-1].usage.completion_tokens == 4


def test_embeddings(client):
    reply = client.embeddings.create(model="tiny", input=["ab", "cde"])
    assert [d.embedding for d in reply.data] == [[2.0, 0.0, 0.5], [3.0, 1.0, 0.5]]
    assert reply.usage.prompt_tokens == 2 and reply.object == "list"
    b64 = client.embeddings.create(model="tiny", input="ab", dimensions=2)  # the SDK asks for base64
    assert b64.data[0].embedding == [2.0, 0.0]


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_error_shapes_match_golden(case, stack):
    spec = GOLDEN[case]
    headers = {} if spec.get("no_auth") else {"authorization": spec.get("auth", f"Bearer {stack['key']}")}
    with httpx.Client(base_url=stack["url"], timeout=20) as c:
        if "raw_body" in spec:
            r = c.request(spec["method"], spec["path"], content=spec["raw_body"],
                          headers=headers | {"content-type": "application/json"})
        else:
            r = c.request(spec["method"], spec["path"], json=spec.get("body"), headers=headers)
    assert r.status_code == spec["status"], r.text
    assert r.json() == spec["response"]
    assert "detail" not in r.text and "Traceback" not in r.text


def test_sdk_raises_typed_errors(client, stack):
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=3)
    assert bad.value.param == "temperature"
    bad_key = openai.OpenAI(base_url=stack["url"] + "/v1", api_key="sk-yard-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as auth:
        bad_key.models.list()
    assert auth.value.code == "invalid_api_key" and auth.value.status_code == 401


def test_error_mid_stream_ends_with_error_event_then_done(http):
    with http.stream("POST", "/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "FAIL_MIDSTREAM"}], "stream": True}) as r:
        assert r.status_code == 200
        r.read()
    events = sse_events(r)
    assert [e["choices"][0]["delta"]["content"] for e in events[:2]] == ["Hello", " from"]
    assert events[2] == {"error": {"message": "the engine crashed", "type": "server_error", "param": None,
                                   "code": "engine_crashed"}}
    assert events[3] == "[DONE]" and len(events) == 4


def test_engine_error_before_first_chunk_is_http_error_naming_field(http):
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "REJECT"}],
                                                "stream": True})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "sampling.temperature"


def test_client_disconnect_cancels_the_upstream_call(stack):
    fake = stack["fake"]
    rid = f"disconnect-{time.monotonic_ns()}"
    with httpx.Client(base_url=stack["url"], timeout=20) as c:
        with c.stream("POST", "/v1/chat/completions", headers={"authorization": f"Bearer {stack['key']}",
                                                               "x-request-id": rid},
                      json={"model": "tiny", "messages": [{"role": "user", "content": "HANG"}], "stream": True}) as r:
            first = next(r.iter_lines())
            assert first.startswith("data: ")
        # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 30
    while rid not in fake.cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rid in fake.cancelled


def test_non_streaming_disconnect_cancels_too(stack):
    """A client that goes away while it waits for a whole (non-streamed) answer: the gateway cancels
    the upstream call. The client leaves only once the call reached the inference side."""
    fake = stack["fake"]
    rid = f"disconnect-ns-{time.monotonic_ns()}"
    body = json.dumps({"model": "tiny", "prompt": "HANG"}).encode()
    host, port = stack["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
                     + f"authorization: Bearer {stack['key']}\r\nx-request-id: {rid}\r\n".encode()
                     + f"content-length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 30
        while not any(c.request_id == rid for c in list(fake.calls)):
            assert time.monotonic() < deadline, "the call never reached the inference side"
            time.sleep(0.02)
    # the connection is closed, the answer never read
    deadline = time.monotonic() + 30
    while rid not in fake.cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rid in fake.cancelled


def test_request_id_echoed_and_forwarded_as_grpc_metadata(http, stack):
    r = http.post("/v1/chat/completions", headers={"x-request-id": "req-abc-123"},
                  json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-abc-123"
    assert stack["fake"].calls[-1].request_id == "req-abc-123"
    generated = http.get("/v1/models").headers["x-request-id"]
    assert len(generated) == 32
    assert http.get("/nowhere").headers["x-request-id"]


def test_content_filter_blocks_prompts_and_cuts_outputs(client, http):
    with pytest.raises(openai.BadRequestError) as blocked:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the SECRET plan is"}])
    assert blocked.value.code == "content_filter" and blocked.value.param == "messages"
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "SAY_THE_WORD"}])
    assert reply.choices[0].message.content == "This is " and reply.choices[0].finish_reason == "content_filter"
    with http.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "SAY_THE_WORD", "stream": True}) as r:
        r.read()
    events = sse_events(r)
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]] == [None, None, "content_filter"]
    assert "forbidden" not in r.text.lower().replace("say_forbidden", "")


def test_health_ready_and_metrics(http, client):
    assert http.get("/healthz").status_code == 200
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["replicas"][0]["models"] == ["tiny", "tiny:sql"]
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], stream=False)
    text = http.get("/metrics").text
    assert 'gateway_requests_total{endpoint="/v1/chat/completions",model="tiny",status="200"}' in text
    assert 'gateway_tokens_total{direction="out",model="tiny"}' in text
    assert "gateway_time_to_first_token_seconds_bucket" in text


def test_usage_is_recorded_once_per_request_id(stack):
    admin = stack["admin"]
    created = admin.post("/admin/keys", json={"name": "usage"}).json()
    with httpx.Client(base_url=stack["url"], headers={"authorization": f"Bearer {created['key']}"}) as c:
        for _ in range(2):  # a client retry with the same id
            assert c.post("/v1/chat/completions", headers={"x-request-id": "same-id-1"},
                          json={"model": "tiny", "messages": [{"role": "user", "content": "a b"}]}).status_code == 200
        assert c.post("/v1/completions", json={"model": "tiny", "prompt": "a", "stream": True}).status_code == 200
    rows = admin.get("/admin/usage", params={"key": created["id"]}).json()["data"]
    assert rows == [{"key_id": created["id"], "model": "tiny", "requests": 2, "prompt_tokens": 3,
                     "completion_tokens": 8, "total_tokens": 11}]


def test_stream_cut_before_usage_is_billed_an_estimate(stack):
    """No usage from the engine (it failed mid-stream): prompt ~4 characters a token, completion the
    larger of the deltas seen (2) and ~4 characters a token of their text ("Hello from": 3)."""
    admin = stack["admin"]
    created = admin.post("/admin/keys", json={"name": "cut"}).json()
    with httpx.Client(base_url=stack["url"], headers={"authorization": f"Bearer {created['key']}"}) as c:
        with c.stream("POST", "/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": "FAIL_MIDSTREAM"}], "stream": True}) as r:
            assert r.status_code == 200
            r.read()
    assert '"engine_crashed"' in r.text
    rows = admin.get("/admin/usage", params={"key": created["id"]}).json()["data"]
    assert rows == [{"key_id": created["id"], "model": "tiny", "requests": 1, "prompt_tokens": 4,
                     "completion_tokens": 3, "total_tokens": 7}]


def test_rate_limits_answer_429_with_headers(stack):
    admin = stack["admin"]
    limited = admin.post("/admin/keys", json={"name": "rpm", "rpm": 2}).json()
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}
    with httpx.Client(base_url=stack["url"], headers={"authorization": f"Bearer {limited['key']}"}) as c:
        ok = c.post("/v1/chat/completions", json=body)
        assert ok.headers["x-ratelimit-limit-requests"] == "2" and ok.headers["x-ratelimit-remaining-requests"] == "1"
        assert c.post("/v1/chat/completions", json=body).status_code == 200
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 429
    assert r.json()["error"]["type"] == "requests" and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert r.headers["x-ratelimit-remaining-requests"] == "0" and 1 <= int(r.headers["retry-after"]) <= 60
    tokens = admin.post("/admin/keys", json={"name": "tpm", "tpm": 50}).json()
    with httpx.Client(base_url=stack["url"], headers={"authorization": f"Bearer {tokens['key']}"}) as c:
        big = c.post("/v1/chat/completions", json=body | {"max_tokens": 100})
        assert big.status_code == 429 and big.json()["error"]["type"] == "tokens"
        assert big.headers["x-ratelimit-limit-tokens"] == "50"
        # each call reserves 1 + 20 and settles to the engine's 1 + 4: six fit in 50, not two
        for _ in range(6):
            assert c.post("/v1/chat/completions", json=body | {"max_tokens": 20}).status_code == 200
        assert c.post("/v1/chat/completions", json=body | {"max_tokens": 20}).status_code == 429


def test_revoked_key_is_refused(stack):
    admin = stack["admin"]
    created = admin.post("/admin/keys", json={"name": "short-lived"}).json()
    headers = {"authorization": f"Bearer {created['key']}"}
    with httpx.Client(base_url=stack["url"], headers=headers) as c:
        assert c.get("/v1/models").status_code == 200
        assert admin.post(f"/admin/keys/{created['id']}/revoke").json()["revoked_at"]
        r = c.get("/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_every_log_line_of_a_request_carries_its_request_id(stack):
    """The gateway binds the request id for the whole request: its own lines (the failed stream,
    the estimated usage, the access line) and the inference side's (forwarded id) all carry it."""
    rid = f"logged-{time.monotonic_ns()}"
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as lines:
        with httpx.Client(base_url=stack["url"], timeout=20) as c:
            r = c.post("/v1/chat/completions", headers={"authorization": f"Bearer {stack['key']}", "x-request-id": rid},
                       json={"model": "tiny", "messages": [{"role": "user", "content": "FAIL_MIDSTREAM"}],
                             "stream": True})
        assert r.status_code == 200 and '"engine_crashed"' in r.text
        # The access line and the usage estimate are written after the last byte went out: wait for them.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not {"usage_estimated", "request_finished"} <= {x["event"] for x in lines}:
            time.sleep(0.02)
    # every line but the routing table's own refreshes (ListDeployments, not part of any request)
    mine = [x for x in lines if not str(x.get("rpc", "")).endswith("/ListDeployments")]
    events = {x["event"] for x in mine}
    assert {"stream_failed", "usage_estimated", "request_finished"} <= events, events
    assert [x for x in mine if x.get("request_id") != rid] == []
    access = next(x for x in mine if x["event"] == "request_finished")
    assert access["path"] == "/v1/chat/completions" and access["status"] == 200 and access["model"] == "tiny"
