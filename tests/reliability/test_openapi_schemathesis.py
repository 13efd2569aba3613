"""The gateway's OpenAPI document checked against the gateway itself by schemathesis (``st run``, all
its checks plus ``openai_error_shape`` from schemathesis_hooks.py), with an API key on the OpenAI
endpoints and the admin token on the admin ones.

The gateway runs as ``python -m gateway`` in front of the scripted inference service of
tests/support/fake_inference.py (real gRPC; the gateway is what is under test), so that schema-valid
requests for the deployed model go the whole way through routing, streaming and billing in
milliseconds. ``YARD_SCHEMATHESIS_EXAMPLES`` sets the examples per operation (default 100, the full
setting); the seed is fixed, so a run repeats.

``positive_data_acceptance`` takes 400, 404 and 409 as answers to schema-valid requests: the schema
cannot say which models exist, which names are taken, or rules across fields (``top_logprobs`` needs
``logprobs``, ``best_of`` must equal ``n``, ``max_tokens`` within the deployment's context). Every
other check runs as schemathesis ships it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.fake_inference import BackgroundLoop, FakeInference, start_fake
from tests.support.ports import free_ports
from tests.support.serving_stack import Process, wait_until

pytestmark = [pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "admin-schemathesis"
SEED = 20261207
EXAMPLES = int(os.environ.get("YARD_SCHEMATHESIS_EXAMPLES", "100"))

CONFIG = f"""
seed = {SEED}
hooks = "tests.reliability.schemathesis_hooks"
workers = 1
request-timeout = 30

[auth.openapi.bearerAuth]
bearer = "${{YARD_ST_API_KEY}}"

[auth.openapi.adminToken]
bearer = "${{YARD_ST_ADMIN_TOKEN}}"

[generation]
max-examples = {EXAMPLES}
database = "none"

[checks.positive_data_acceptance]
expected-statuses = ["2xx", 400, 401, 403, 404, 409]

# half the generated model names are ones the fake deploys, so those requests reach it
[dictionaries.models]
values = ["tiny", "tiny:sql"]

[parameters]
"body.model" = {{ dictionary = "models", probability = 0.5 }}
"path.model" = {{ dictionary = "models", probability = 0.5 }}
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """``python -m gateway`` (a process of its own: in this process's thread it would share the GIL
    and a loop thread, ~50 ms a request) in front of the fake inference service served here."""
    bg = BackgroundLoop()
    server = bg.run(start_fake(FakeInference()))
    work = tmp_path_factory.mktemp("gateway-openapi")
    port = free_ports(1)[0]
    gw = Process("gateway", [sys.executable, "-m", "gateway"], {
        **os.environ, "YARD_GATEWAY_DATA_DIR": str(work), "YARD_GATEWAY_HTTP__HOST": "127.0.0.1",
        "YARD_GATEWAY_HTTP__PORT": str(port), "YARD_GATEWAY_INFERENCE_ADDR": server.address,
        "YARD_GATEWAY_ADMIN_TOKEN": ADMIN, "YARD_GATEWAY_LOG_LEVEL": "WARNING",
        "YARD_GATEWAY_ROUTING__REFRESH_INTERVAL_S": "0.5", "YARD_GATEWAY_CONSOLE__ENABLED": "false",
    }, work / "gateway.log")
    url = f"http://127.0.0.1:{port}"
    gw.start()
    try:
        wait_until(lambda: _ready(url, gw), 60, "the gateway to route the fake's models", interval=0.1)
        with httpx.Client(base_url=url, headers={"authorization": f"Bearer {ADMIN}"}, timeout=30) as admin:
            created = admin.post("/admin/keys", json={"name": "schemathesis"})
            assert created.status_code == 201, created.text
            yield {"url": url, "key": created.json()["key"], "process": gw}
    finally:
        gw.stop()
        bg.run(server.stop(0))
        bg.close()


def _ready(url: str, gw: Process) -> bool:
    assert gw.alive, gw.log_tail()
    try:
        return httpx.get(url + "/readyz", params={"model": "tiny"}, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_openapi_documents_every_error_in_the_openai_shape(gateway):
    doc = httpx.get(gateway["url"] + "/openapi.json", timeout=10).json()
    responses = doc["components"]["responses"]
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    names = {"400": "BadRequest", "401": "Unauthorized", "404": "NotFound", "405": "MethodNotAllowed",
             "413": "PayloadTooLarge", "429": "RateLimited", "500": "InternalError", "503": "Unavailable"}
    assert all(responses[name]["content"]["application/json"]["schema"] == error_ref for name in names.values())
    assert "Allow" in responses["MethodNotAllowed"]["headers"] and "Retry-After" in responses["RateLimited"]["headers"]
    error = doc["components"]["schemas"]["ErrorResponse"]["properties"]["error"]
    assert set(error["required"]) == {"message", "type", "param", "code"}
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    for status in ("400", "401", "404", "413", "429", "500", "503"):
        assert chat[status] == {"$ref": f"#/components/responses/{names[status]}"}, status
    assert "422" not in chat and "HTTPValidationError" not in doc["components"]["schemas"]
    assert "text/event-stream" in chat["200"]["content"]
    assert not any(p.startswith(("/console", "/healthz", "/readyz", "/metrics")) for p in doc["paths"])
    # 405 names the methods the path has (RFC 9110), in the OpenAI error shape
    reply = httpx.delete(gateway["url"] + "/admin/keys", headers={"authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert reply.status_code == 405 and reply.json()["error"]["code"] == "method_not_allowed"
    assert set(reply.headers["allow"].split(", ")) == {"GET", "POST"}
    # a limit of false is not a limit of 0 (found by schemathesis: the JSON boolean was taken as an int)
    reply = httpx.post(gateway["url"] + "/admin/keys", json={"name": "strict", "tpm": False},
                       headers={"authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "tpm", reply.text


def test_schemathesis_finds_no_failure(gateway, tmp_path):
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    env = {**os.environ, "YARD_ST_API_KEY": gateway["key"], "YARD_ST_ADMIN_TOKEN": ADMIN, "PYTHONPATH": str(ROOT),
           "NO_COLOR": "1", "COLUMNS": "160"}
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", gateway["url"] + "/openapi.json",
         "--checks", "all", "--phases", "examples,coverage,fuzzing,stateful", "--no-color"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    took = time.monotonic() - started
    out = run.stdout
    summary = out[out.rfind("SUMMARY"):] if "SUMMARY" in out else out[-3000:]
    print(f"schemathesis, {EXAMPLES} examples per operation, seed {SEED}, {took:.0f}s:\n{summary}")
    assert run.returncode == 0, f"{out[-12000:]}\n{run.stderr[-3000:]}"
    counts = re.search(r"(\d+) generated, (\d+) passed", summary)  # "2969 generated, 2969 passed, 26 skipped"
    assert counts, summary
    generated, passed = int(counts.group(1)), int(counts.group(2))
    assert generated == passed >= 10 * EXAMPLES, summary  # every case passed every check; 14 operations
