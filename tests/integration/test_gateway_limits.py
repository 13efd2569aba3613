"""Hardened inputs of the gateway: the body limit (413, chunked bodies too), the caps on ``n``, prompt
lists and the ``model`` string, ``max_tokens`` against the context length (each a 400 naming its
field), metric labels bounded whatever model names are sent; the persistent admin token (one per data
dir, whatever starts first), and ``yard keys`` finding the stack of ``yard up --data-dir``."""

from __future__ import annotations

import os
import re
import stat
import threading
import uuid

import httpx
import openai
import pytest
from typer.testing import CliRunner

from cli.gateway_cmds import keys_app
from cli.stack import STATE_FILE, ServiceState, StackState
from gateway.app import admin_token, create_app
from gateway.settings import GatewaySettings
from services.core.errors import InvalidArgument
from tests.support.fake_inference import BackgroundLoop, FakeInference, GatewayServer, start_fake

ADMIN = "limits-admin"
LIMITS = {"max_body_bytes": 65536, "max_n": 4, "max_prompts": 8, "max_model_chars": 64}
CONTEXT = 2048  # the fake's max_model_len (its Tokenize: one token a word)
MESSAGES = [{"role": "user", "content": "hi"}]


class ContextFake(FakeInference):
    """The fake, plus the engine's own refusal of a chat longer than its context (``TOO_LONG``)."""

    async def Chat(self, request, context):
        if "TOO_LONG" in request.messages[-1].content:
            raise InvalidArgument(f"This model's maximum context length is {CONTEXT} tokens; you requested 5000 "
                                  "tokens (4990 in the prompt, 10 for the completion)",
                                  reason="ENGINE_REJECTED_REQUEST")
        async for chunk in super().Chat(request, context):
            yield chunk


@pytest.fixture(scope="module")
def bg():
    loop = BackgroundLoop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def inference(bg):
    server = bg.run(start_fake(ContextFake()))
    yield server.address
    bg.run(server.stop(0))


@pytest.fixture(scope="module")
def stack(bg, inference, tmp_path_factory):
    settings = GatewaySettings(data_dir=tmp_path_factory.mktemp("gateway"), inference_addr=inference,
                               admin_token=ADMIN, log_json=False, limits=LIMITS)
    gw = GatewayServer(bg, create_app(settings))
    gw.wait_started()
    with httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {ADMIN}"}) as admin:
        key = admin.post("/admin/keys", json={"name": "limits"}).json()["key"]
    with httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {key}"}, timeout=20) as http:
        yield {"url": gw.url, "key": key, "http": http,
               "sdk": openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=20)}
    gw.stop()


def chat(content: str = "hi", **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **extra}


def test_a_body_over_the_limit_is_413_in_openai_shape_even_without_content_length(stack):
    http = stack["http"]
    big = httpx.Request("POST", "/", json=chat("x" * 200_000)).content  # ~200 kB of JSON, the limit is 64 KiB

    def chunks():
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    expected = {"error": {"message": "The request body is larger than 65536 bytes (limits.max_body_bytes).",
                          "type": "invalid_request_error", "param": None, "code": "request_too_large"}}
    for body in (big, chunks()):
        r = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert (r.status_code, r.json()) == (413, expected)
        assert r.headers["x-request-id"]
    assert r.request.headers["transfer-encoding"] == "chunked" and "content-length" not in r.request.headers
    fits = http.post("/v1/chat/completions", json=chat("x" * 60_000, max_tokens=1))  # under the limit: served
    assert fits.status_code == 200, fits.text


CAPS = {
    "n-chat": ("/v1/chat/completions", chat(n=5), "n"),
    "n-completions": ("/v1/completions", {"model": "tiny", "prompt": "a", "n": 5}, "n"),
    "prompt-list": ("/v1/completions", {"model": "tiny", "prompt": ["a"] * 9}, "prompt"),
    "token-prompt-list": ("/v1/completions", {"model": "tiny", "prompt": [[1, 2]] * 9}, "prompt"),
    "embedding-inputs": ("/v1/embeddings", {"model": "tiny", "input": ["a"] * 9}, "input"),
    "model-chat": ("/v1/chat/completions", chat() | {"model": "m" * 65}, "model"),
    "model-completions": ("/v1/completions", {"model": "m" * 65, "prompt": "a"}, "model"),
    "model-embeddings": ("/v1/embeddings", {"model": "m" * 65, "input": "a"}, "model"),
    "model-retrieve": ("/v1/models/" + "m" * 65, None, "model"),
    # max_tokens against the context (2048): alone, or with the prompt's tokens (counted by Tokenize)
    "max-tokens-chat": ("/v1/chat/completions", chat(max_tokens=CONTEXT), "max_tokens"),
    "max-completion-tokens": ("/v1/chat/completions", chat(max_completion_tokens=5000), "max_completion_tokens"),
    "max-tokens-prompt": ("/v1/completions", {"model": "tiny", "prompt": "w " * 2000, "max_tokens": 100},
                          "max_tokens"),
    "max-tokens-second-prompt": ("/v1/completions", {"model": "tiny", "prompt": ["a", "w " * 2000],
                                                     "max_tokens": 100}, "max_tokens"),
    "max-tokens-token-ids": ("/v1/completions", {"model": "tiny", "prompt": [1] * 2000, "max_tokens": 100},
                             "max_tokens"),
    # the engine's own refusal, mapped to the field: max_tokens when set, else the prompt
    "engine-context-max-tokens": ("/v1/chat/completions", chat("TOO_LONG", max_tokens=10), "max_tokens"),
    "engine-context-prompt": ("/v1/chat/completions", chat("TOO_LONG"), "messages"),
}


@pytest.mark.parametrize("case", sorted(CAPS))
def test_each_cap_is_a_400_naming_its_param(stack, case):
    path, body, param = CAPS[case]
    http = stack["http"]
    r = http.get(path) if body is None else http.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert set(error) == {"message", "type", "param", "code"}
    if case.startswith(("max-", "engine-context")):
        assert error["code"] == "context_length_exceeded", error


def test_requests_within_the_caps_are_served(stack):
    client = stack["sdk"]
    assert len(client.chat.completions.create(model="tiny", messages=MESSAGES, n=4, max_tokens=2).choices) == 4
    ok = client.completions.create(model="tiny", prompt=["a"] * 7 + ["w " * 1900], max_tokens=100)
    assert len(ok.choices) == 8  # 1900 + 100 <= 2048
    with pytest.raises(openai.BadRequestError) as too_many:
        client.chat.completions.create(model="tiny", messages=MESSAGES, n=5)
    assert too_many.value.param == "n"


def test_a_flood_of_unknown_model_names_leaves_the_metric_labels_bounded(stack):
    http = stack["http"]
    names = [f"flood-{uuid.uuid4().hex[:12]}" for _ in range(60)]
    for name in names:
        assert http.post("/v1/chat/completions", json=chat() | {"model": name}).status_code == 404
    assert http.post("/v1/chat/completions", json=chat()).status_code == 200
    text = http.get("/metrics").text
    assert not [n for n in names if n in text]
    labels = set(re.findall(r'gateway_requests_total\{[^}]*model="([^"]*)"', text))
    assert {"unknown", "tiny"} <= labels and not any(label.startswith("flood-") for label in labels)
    unknown = re.search(r'gateway_requests_total\{endpoint="/v1/chat/completions",model="unknown",status="404"\} '
                        r'([0-9.e+]+)', text)
    assert unknown and float(unknown.group(1)) >= 60


# ---------------------------------------------------------------- the admin token


def test_concurrent_starts_on_one_data_dir_keep_one_token(tmp_path, monkeypatch):
    settings = GatewaySettings(data_dir=tmp_path / "shared", log_json=False)
    start = threading.Barrier(8)
    tokens: list[str] = []

    def replica() -> None:
        start.wait()
        tokens.append(admin_token(settings))

    threads = [threading.Thread(target=replica) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    path = tmp_path / "shared" / "admin_token"
    assert len(tokens) == 8 and set(tokens) == {path.read_text()}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["admin_token"]  # nothing left aside
    elsewhere = tmp_path / "secrets" / "gateway-admin"
    monkeypatch.setenv("YARD_GATEWAY_ADMIN_TOKEN_FILE", str(elsewhere))
    from_env = GatewaySettings(data_dir=tmp_path / "other")
    assert from_env.admin_token_file == elsewhere and admin_token(from_env) == elsewhere.read_text() != tokens[0]


def _cli_env(**env: str) -> dict[str, str | None]:
    """Nothing from the test's own environment tells the CLI where the gateway is: only ``env``."""
    cleared = ("YARD_GATEWAY_URL", "YARD_GATEWAY_ADMIN_TOKEN", "YARD_GATEWAY_ADMIN_TOKEN_FILE", "YARD_DATA_DIR",
               "YARD_STACK_DATA_DIR")
    return {name: None for name in cleared} | env


def test_admin_token_survives_a_restart_and_yard_keys_finds_the_stack_by_its_data_dir(bg, inference, tmp_path):
    """As `yard up --data-dir X` lays it out: the gateway's data dir is X/gateway, X/stack.json names
    its address; `yard keys --data-dir X` (or YARD_DATA_DIR=X) finds both."""
    data_dir = tmp_path / "stack"
    settings = GatewaySettings(data_dir=data_dir / "gateway", inference_addr=inference, log_json=False)
    runner = CliRunner()
    tokens = []
    for start in range(2):
        gw = GatewayServer(bg, create_app(settings))
        gw.wait_started()
        try:
            token = (data_dir / "gateway" / "admin_token").read_text()
            tokens.append(token)
            me = os.getpid()
            (data_dir / STATE_FILE).write_text(StackState(state="running", supervisor_pid=me, data_dir=str(data_dir),
                                                          services=[ServiceState(
                                                              name="gateway", address=f"127.0.0.1:{gw.port}", pid=me,
                                                              health="http", log="gateway.log")]).model_dump_json())
            if start == 0:
                made = runner.invoke(keys_app, ["create", "--name", "by-dir", "--data-dir", str(data_dir)],
                                     env=_cli_env())
                assert made.exit_code == 0, made.output
            for env, args in [(_cli_env(), ["--data-dir", str(data_dir)]), (_cli_env(YARD_DATA_DIR=str(data_dir)), []),
                              (_cli_env(YARD_STACK_DATA_DIR=str(data_dir)), [])]:
                listed = runner.invoke(keys_app, ["list", *args], env=env)
                assert listed.exit_code == 0 and "by-dir" in listed.output, listed.output
            assert httpx.get(gw.url + "/admin/keys", headers={"authorization": f"Bearer {token}"}).status_code == 200
        finally:
            gw.stop()
    assert tokens[0] == tokens[1] and len(tokens[0]) >= 32  # the restart read the token, did not make a new one
    nowhere = runner.invoke(keys_app, ["list", "--data-dir", str(tmp_path / "empty")], env=_cli_env())
    assert nowhere.exit_code == 1 and "no admin token" in nowhere.output
