"""Several inference replicas behind one gateway (least outstanding, ejection, retry before the
first chunk, never a non-ready replica), and `yard keys` / `yard usage` against a running gateway."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys

import grpc
import httpx
import openai
import pytest
import typer
import yaml
from typer.testing import CliRunner

from cli.gateway_cmds import keys_app, usage
from gateway.app import create_app
from gateway.routing import Router
from gateway.settings import GatewaySettings, RoutingSettings, TimeoutSettings
from modelyard.inference.v1 import inference_pb2 as pb
from tests.support.fake_inference import BackgroundLoop, FakeInference, GatewayServer, deployment, start_fake

ADMIN = "routing-admin"


@pytest.fixture
def replicas(tmp_path):
    bg = BackgroundLoop()
    fakes = [FakeInference(), FakeInference(), FakeInference(deployments=[
        deployment("tiny", state=pb.DEPLOYMENT_STATE_CREATING)])]  # the third one is not ready
    servers = [bg.run(start_fake(f)) for f in fakes]
    settings = GatewaySettings(
        data_dir=tmp_path / "gw", inference_addr=",".join(s.address for s in servers), admin_token=ADMIN,
        auth={"required": False}, log_json=False, routing={"refresh_interval_s": 0.2, "eject_s": 60},
        timeouts={"connect_s": 1})
    gw = GatewayServer(bg, create_app(settings))
    gw.wait_started()
    yield {"bg": bg, "fakes": fakes, "servers": servers, "url": gw.url}
    gw.stop()
    for s in servers:
        bg.run(s.stop(0))
    bg.close()


def test_requests_spread_over_ready_replicas_only(replicas):
    client = openai.OpenAI(base_url=replicas["url"] + "/v1", api_key="unused", max_retries=0)
    for _ in range(6):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])
    counts = [len(f.calls) for f in replicas["fakes"]]
    assert counts[2] == 0 and counts[0] >= 1 and counts[1] >= 1 and sum(counts) == 6


def test_a_failing_replica_is_ejected_and_requests_still_succeed(replicas):
    fakes, servers = replicas["fakes"], replicas["servers"]
    fakes[0].fail_generation_with = grpc.StatusCode.UNAVAILABLE  # answers listings, fails generation
    replicas["bg"].run(servers[1].stop(0))  # gone entirely
    fakes[1].calls.clear()
    client = openai.OpenAI(base_url=replicas["url"] + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.InternalServerError) as err:  # 503: every ready replica failed
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 503 and err.value.code == "no_ready_replica"
    fakes[0].fail_generation_with = None
    # replica 0 is ejected for 60 s: nothing is sent there until it is checked again
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])


def test_a_listing_in_flight_does_not_undo_an_ejection():
    """A refresh that started before a request failed on the replica answers after the ejection:
    the ejection stands (the listing no longer says whether generation works there)."""
    bg = BackgroundLoop()
    fake = FakeInference(list_delay_s=0.5)
    server = bg.run(start_fake(fake))
    routers: list[Router] = []

    async def scenario() -> tuple[bool, bool]:
        router = Router([server.address], TimeoutSettings(), RoutingSettings(eject_s=60))  # channels on this loop
        routers.append(router)
        await router.refresh()
        replica = router.replicas[0]
        listed_before = "tiny" in replica.ready
        refreshing = asyncio.create_task(router.refresh())
        await asyncio.sleep(0.1)  # the listing is in flight
        router.eject(replica, "generation failed: UNAVAILABLE")
        await refreshing
        return listed_before, replica.ejected and not replica.ready

    try:
        listed_before, still_ejected = bg.run(scenario())
        assert listed_before and still_ejected
    finally:
        for router in routers:
            bg.run(router.stop())
        bg.run(server.stop(0))
        bg.close()


def test_retry_on_another_replica_before_the_first_chunk(replicas):
    fakes, servers = replicas["fakes"], replicas["servers"]
    replicas["bg"].run(servers[0].stop(0))  # the table still lists it until the next failure
    client = openai.OpenAI(base_url=replicas["url"] + "/v1", api_key="unused", max_retries=0)
    for _ in range(4):
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in reply if c.choices) == "Hello from the fake"
    assert len(fakes[1].calls) == 4
    ready = httpx.get(replicas["url"] + "/readyz").json()["replicas"]
    assert ready[0]["ejected"] and not ready[1]["ejected"] and ready[2]["models"] == []


def _yard(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The real ``yard`` entry point in a child process, its stdout a pipe."""
    return subprocess.run([sys.executable, "-m", "cli.main", *args], env=dict(os.environ, **env),
                          capture_output=True, text=True, timeout=120)


def test_keys_and_usage_cli_against_a_running_gateway(tmp_path):
    bg = BackgroundLoop()
    fake = FakeInference()
    server = bg.run(start_fake(fake))
    settings = GatewaySettings(data_dir=tmp_path / "gw", inference_addr=server.address, log_json=False)
    gw = GatewayServer(bg, create_app(settings))  # no admin token set: it writes one to data_dir
    gw.wait_started()
    try:
        env = {"YARD_GATEWAY_URL": gw.url, "YARD_GATEWAY_ADMIN_TOKEN_FILE": str(tmp_path / "gw" / "admin_token")}
        runner = CliRunner()
        created = runner.invoke(keys_app, ["create", "--name", "ci", "--rpm", "5"], env=env)
        assert created.exit_code == 0, created.output
        secret = created.output.strip().splitlines()[-1]
        found = re.search(r"created (key_\w+)", created.output)  # the in-process gateway logs in this output too
        assert found, created.output
        key_id = found.group(1)
        assert secret.startswith("sk-yard-") and "rpm 5" in created.output
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0)
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "one two"}])

        listed = runner.invoke(keys_app, ["list"], env=env)
        assert listed.exit_code == 0 and "ci" in listed.output and "active" in listed.output
        assert secret not in listed.output
        as_json = _yard(env, "keys", "list", "-o", "json")  # a child process: the gateway's logs stay out of its stdout
        assert as_json.returncode == 0, as_json.stderr
        keys = json.loads(as_json.stdout)
        assert [(k["id"], k["name"], k["rpm"]) for k in keys] == [(key_id, "ci", 5)] and secret not in as_json.stdout

        usage_app = typer.Typer()
        usage_app.command()(usage)
        shown = runner.invoke(usage_app, ["--key", key_id], env=env)
        assert shown.exit_code == 0, shown.output
        assert "tiny" in shown.output and " 6 " in shown.output  # 2 prompt + 4 completion tokens
        as_yaml = _yard(env, "usage", "--key", key_id, "-o", "yaml")
        assert as_yaml.returncode == 0, as_yaml.stderr
        assert [(r["model"], r["total_tokens"]) for r in yaml.safe_load(as_yaml.stdout)] == [("tiny", 6)]

        revoked = runner.invoke(keys_app, ["revoke", key_id], env=env)
        assert revoked.exit_code == 0 and "revoked" in revoked.output
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
        missing = runner.invoke(keys_app, ["revoke", "key_nope"], env=env)
        assert missing.exit_code == 1 and "key_not_found" in missing.output and "Traceback" not in missing.output
        wrong = runner.invoke(keys_app, ["list"], env=env | {"YARD_GATEWAY_ADMIN_TOKEN": "wrong"})
        assert wrong.exit_code == 1 and "invalid_admin_token" in wrong.output
    finally:
        gw.stop()
        bg.run(server.stop(0))
        bg.close()
