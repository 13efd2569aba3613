"""The gateway in front of the REAL inference service: a real registry and nanio S3, the inference
service in-process with the transformers engine as a child process serving a tiny random model,
and the gateway under uvicorn, driven by the official ``openai`` client and httpx.

What test_gateway.py checks against the scripted fake, checked here through the real path: a
client disconnect aborts the engine's request, the X-Request-Id reaches the inference service,
embeddings have the model's hidden size, the output content filter cuts a real stream, and usage
is billed from the engine's own counts, once per request id."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import structlog
from structlog.testing import capture_logs

from cli.demo_models import build_tiny_model
from gateway.app import create_app
from gateway.settings import GatewaySettings
from modelyard.client import InferenceClient, RegistryClient
from modelyard.inference.v1 import inference_pb2 as pb
from modelyard.registry.v1 import registry_pb2 as rpb
from services.core.artifacts import S3ArtifactStore
from services.core.settings import GrpcServerSettings, S3Settings
from services.inference.app import build_app as build_inference
from services.inference.settings import InferenceSettings
from services.registry.app import build_app as build_registry
from services.registry.settings import RegistrySettings
from tests.support.fake_inference import BackgroundLoop, GatewayServer

pytestmark = [pytest.mark.timeout(600)]

HIDDEN = 64  # the tiny model's hidden size: the length of its embeddings
# The tiny model's context, raised from 512 (rotary positions: nothing is sized by it) so that one
# request can run far longer than any wait below: a stream that stops there was aborted.
LONG_CONTEXT = 1_000_000
ADMIN = "admin-real-stack"
GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def real(tmp_path_factory, s3_server) -> Iterator[dict]:
    bg = BackgroundLoop()
    work = tmp_path_factory.mktemp("gateway-real")
    s3 = S3Settings(endpoint=s3_server.endpoint, access_key=s3_server.access_key, secret_key=s3_server.secret_key,
                    bucket=f"t-{uuid.uuid4().hex[:12]}", connect_retries=2, retry_backoff_s=0.05)
    registry_settings = RegistrySettings(data_dir=work / "registry", s3=s3, grpc=GrpcServerSettings(port=0),
                                         import_workers=1, hf_endpoint="http://127.0.0.1:9", hf_token=None)

    async def start_registry():  # built in the loop that serves it (its gRPC channels bind to that loop)
        app = build_registry(registry_settings, metrics=False, default_port=0)
        await app.start()
        return app

    registry = bg.run(start_registry(), timeout=60)
    registry_addr = f"127.0.0.1:{registry.server.port}"
    inference = None
    try:
        model_dir = build_tiny_model(work / "tiny", hidden=HIDDEN)
        config_path = model_dir / "config.json"
        config = json.loads(config_path.read_text())
        config["max_position_embeddings"] = LONG_CONTEXT
        config_path.write_text(json.dumps(config))
        S3ArtifactStore.connect(s3).upload_dir("uploads/tiny/base", model_dir)

        async def register() -> rpb.ModelVersion:
            async with RegistryClient(registry_addr) as client:
                return await client.create_model_version(
                    parent="models/tiny", version_id="base",
                    model_version=rpb.ModelVersion(artifact_prefix="uploads/tiny/base"))

        version = bg.run(register(), timeout=120)
        inference_settings = InferenceSettings(
            data_dir=work / "inference", s3=s3, grpc=GrpcServerSettings(port=0), registry_addr=registry_addr,
            vllm_python=work / "no-vllm" / "bin" / "python", restart_backoff_initial_s=0.5, health_interval_s=0.5,
            engine_start_timeout_s=300, omp_threads=1, stream_interval_ms=0)

        async def start_inference():
            app = build_inference(inference_settings, metrics=False, default_port=0)
            await app.start()
            return app

        inference = bg.run(start_inference(), timeout=60)
        inference_addr = f"127.0.0.1:{inference.server.port}"

        async def deploy() -> tuple[InferenceClient, pb.Deployment]:
            client = InferenceClient(inference_addr, timeout=30)
            await client.deploy(pb.Deployment(model_version=version.name, engine=pb.ENGINE_TRANSFORMERS),
                                deployment_id="tiny", timeout=120)
            deadline = time.monotonic() + 300
            while True:
                dep = await client.get_deployment("deployments/tiny")
                if dep.state == pb.DEPLOYMENT_STATE_READY:
                    return client, dep
                assert dep.state != pb.DEPLOYMENT_STATE_FAILED, dep.error.message
                assert time.monotonic() < deadline, f"deployment stayed {pb.DeploymentState.Name(dep.state)}"
                await asyncio.sleep(0.2)

        inference_client, dep = bg.run(deploy(), timeout=330)
        gw = start_gateway(bg, work / "gateway", inference_addr, [])
        admin = httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {ADMIN}"}, timeout=30)
        try:
            yield {"bg": bg, "work": work, "inference": inference_client, "inference_addr": inference_addr, "gw": gw, "admin": admin,
                   "engine_url": dep.engine_endpoints[0], "key": new_key(admin, "real")}
        finally:
            admin.close()
            gw.stop()
            bg.run(inference_client.close())
    finally:
        if inference is not None:
            bg.run(inference.stop(grace=1), timeout=60)
        bg.run(registry.stop(grace=1), timeout=60)
        bg.close()


def start_gateway(bg: BackgroundLoop, data_dir: Path, inference_addr: str, blocked_terms: list[str]) -> GatewayServer:
    settings = GatewaySettings(
        data_dir=data_dir, inference_addr=inference_addr, admin_token=ADMIN, blocked_terms=blocked_terms,
        log_json=False, routing={"refresh_interval_s": 0.5}, quota={"usage_flush_s": 0.2},
        timeouts={"first_token_s": 120, "idle_chunk_s": 120})
    gw = GatewayServer(bg, create_app(settings))
    gw.wait_started()
    return gw


def new_key(client: httpx.Client, name: str, admin: bool = False) -> dict:
    headers = {"authorization": f"Bearer {ADMIN}"} if admin else None
    created = client.post("/admin/keys", json={"name": name}, headers=headers)
    assert created.status_code == 201, created.text
    return created.json()


def sdk(real: dict, key: dict | None = None, url: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=(url or real["gw"].url) + "/v1", api_key=(key or real["key"])["key"],
                         max_retries=0, timeout=120)


def engine_running(real: dict) -> int:
    """Sequences the engine is generating now (its own /health)."""
    return httpx.get(real["engine_url"] + "/health", timeout=10).json()["running"]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


def direct_chat(real: dict, content: str, **sampling) -> tuple[str, pb.Usage]:
    """The inference service's own answer (text, usage) to a one-message chat, without the gateway."""
    async def call() -> tuple[str, pb.Usage]:
        chunks = [c async for c in real["inference"].chat(
            deployment="deployments/tiny", sampling=pb.SamplingParams(n=1, **sampling),
            messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER, content=content)], timeout=120)]
        return "".join(d.content for c in chunks for d in c.choices), chunks[-1].usage

    return real["bg"].run(call(), timeout=150)


def direct_complete(real: dict, prompt: str, **sampling) -> tuple[str, pb.Usage]:
    async def call() -> tuple[str, pb.Usage]:
        chunks = [c async for c in real["inference"].complete(
            deployment="deployments/tiny", prompt=prompt, sampling=pb.SamplingParams(n=1, **sampling), timeout=120)]
        return "".join(d.text for c in chunks for d in c.choices), chunks[-1].usage

    return real["bg"].run(call(), timeout=150)


def sse_events(response: httpx.Response) -> list:
    body = response.text
    assert body.endswith("data: [DONE]\n\n"), body[-300:]
    return [json.loads(block[6:]) for block in body.split("\n\n")[:-2]]


# ----------------------------------------------------------------------------- the tests


def test_client_disconnect_aborts_the_engine_request(real):
    """The engine stops generating once the client goes: its running count drops back to 0 long
    before the request (max_tokens near a million) could have finished on its own."""
    wait_for(lambda: engine_running(real) == 0, 60, "an idle engine")
    with httpx.Client(base_url=real["gw"].url, timeout=120) as c:
        with c.stream("POST", "/v1/chat/completions", headers={"authorization": f"Bearer {real['key']['key']}"},
                      json={"model": "tiny", "messages": [{"role": "user", "content": "count forever"}],
                            "stream": True, "max_tokens": LONG_CONTEXT - 1000, "ignore_eos": True, **GREEDY}) as r:
            assert r.status_code == 200
            received = 0
            lines = r.iter_lines()  # held: an abandoned line iterator closes the connection
            for line in lines:
                if line.startswith("data: {"):
                    received += 1
                    if received == 3:
                        break
            assert received == 3
            assert engine_running(real) == 1
        # leaving the block closes the connection mid-stream
    wait_for(lambda: engine_running(real) == 0, 120, "the engine to drop the aborted request")


def test_request_id_reaches_the_inference_service(real):
    rid = f"real-rid-{uuid.uuid4().hex[:8]}"
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as lines:
        client = sdk(real)
        reply = client.chat.completions.with_raw_response.create(
            model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=4, extra_headers={
                "x-request-id": rid})
        assert reply.headers["x-request-id"] == rid and reply.parse().choices[0].finish_reason
        # the inference service's access line of its Chat call, under the id the gateway forwarded, and
        # the gateway's own (both written just after the answer)
        wait_for(lambda: any(x.get("rpc", "").endswith("InferenceService/Chat") and x["event"] == "rpc_finished"
                             and x.get("request_id") == rid for x in list(lines)), 30, "the inference access line")
        wait_for(lambda: any(x["event"] == "request_finished" and x.get("request_id") == rid for x in list(lines)),
                 30, "the gateway access line")
    served = [x for x in lines if x.get("rpc", "").endswith("InferenceService/Chat")]
    assert all(x.get("request_id") == rid for x in served), served


def test_embeddings_have_the_model_hidden_size(real):
    client = sdk(real)
    reply = client.embeddings.create(model="tiny", input=["hello world", "the sea is blue"], encoding_format="float")
    vectors = [d.embedding for d in reply.data]
    assert [d.index for d in reply.data] == [0, 1] and [len(v) for v in vectors] == [HIDDEN, HIDDEN]
    assert all(math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-4) for v in vectors)  # normalized
    assert vectors[0] != vectors[1] and reply.usage.prompt_tokens >= 2
    with httpx.Client(base_url=real["gw"].url, timeout=120,
                      headers={"authorization": f"Bearer {real['key']['key']}"}) as c:
        raw = c.post("/v1/embeddings", json={"model": "tiny", "input": "hello world", "encoding_format": "base64",
                                             "dimensions": 16}).json()
    packed = base64.b64decode(raw["data"][0]["embedding"])
    assert len(packed) == 16 * 4
    prefix = vectors[0][:16]  # `dimensions` keeps the first values, normalized again
    norm = math.sqrt(sum(x * x for x in prefix))
    assert list(struct.unpack("<16f", packed)) == pytest.approx([x / norm for x in prefix], abs=1e-5)


def test_output_content_filter_cuts_a_real_stream(real):
    """A term the engine will write (read from the inference service's own greedy answer) is blocked
    at a second gateway: the stream stops right before it, finishing with ``content_filter``."""
    prompt = "Hello! How can I"
    text, _ = direct_complete(real, prompt, max_tokens=32, ignore_eos=True, **GREEDY)
    # the first 4- or 3-character piece (no edge spaces, not in the prompt) that first occurs after
    # a third of the answer, else anywhere after its first character
    candidates = ((text[i:i + size], i) for start in (max(1, len(text) // 3), 1) for size in (4, 3)
                  for i in range(start, len(text) - size + 1))
    term, at = next(((t, i) for t, i in candidates if t.strip() == t and text.lower().find(t.lower()) == i
                     and t.lower() not in prompt.lower()), ("", -1))
    assert term, f"no usable term in the engine's answer {text!r}"
    gw = start_gateway(real["bg"], real["work"] / "gateway-filter", real["inference_addr"], [term])
    try:
        with httpx.Client(base_url=gw.url, timeout=120) as c:
            key = new_key(c, "filter", admin=True)
            with c.stream("POST", "/v1/completions", headers={"authorization": f"Bearer {key['key']}"},
                          json={"model": "tiny", "prompt": prompt, "max_tokens": 32, "ignore_eos": True,
                                "stream": True, **GREEDY}) as r:
                assert r.status_code == 200
                r.read()
    finally:
        gw.stop()
    events = sse_events(r)
    sent = "".join(e["choices"][0]["text"] for e in events)
    # Cut before the term: whatever came before it was sent (a delta is sent whole unless the term
    # completes in it, so a term's first characters may have gone out before its last arrived)
    assert sent == text[:len(sent)] and at <= len(sent) < at + len(term), (text, term, sent)
    assert term.lower() not in sent.lower()
    assert [e["choices"][0]["finish_reason"] for e in events][-1] == "content_filter"
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])


def test_usage_billed_is_the_engine_count_once_per_request_id(real):
    key = new_key(real["admin"], "billing")
    _, chat_usage = direct_chat(real, "what is two plus two", max_tokens=8, ignore_eos=True, **GREEDY)
    _, complete_usage = direct_complete(real, "The capital of France is", max_tokens=5, ignore_eos=True, **GREEDY)
    assert chat_usage.completion_tokens == 8 and complete_usage.completion_tokens == 5
    client = sdk(real, key)
    for _ in range(2):  # a client retry with the same request id is billed once
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "what is two plus two"}], max_tokens=8,
            extra_body={"ignore_eos": True}, extra_headers={"x-request-id": f"bill-{key['id']}"}, **GREEDY)
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (chat_usage.prompt_tokens, 8)
    chunks = list(client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=5,
                                            extra_body={"ignore_eos": True}, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (complete_usage.prompt_tokens, 5)
    rows = real["admin"].get("/admin/usage", params={"key": key["id"]}).json()["data"]
    prompt = chat_usage.prompt_tokens + complete_usage.prompt_tokens
    assert rows == [{"key_id": key["id"], "model": "tiny", "requests": 2, "prompt_tokens": prompt,
                     "completion_tokens": 13, "total_tokens": prompt + 13}]
