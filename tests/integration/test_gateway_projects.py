"""Projects: API keys belong to one, a project reaches only the models it is allowed, every other model
is answered as one that does not exist (404 ``model_not_found``) on every OpenAI endpoint, usage is
reported per project; ``yard projects`` / ``yard keys create --project``; the migration that put the
keys made before projects into the ``default`` project (every model)."""

from __future__ import annotations

import httpx
import openai
import pytest
from sqlalchemy import Column, DateTime, Index, Integer, MetaData, String, Table
from typer.testing import CliRunner

from cli.gateway_cmds import keys_app, projects_app, usage
from gateway.app import create_app
from gateway.auth.keys import KeyStore, hash_key
from gateway.auth.projects import ProjectStore
from gateway.quota import UsageRecorder
from gateway.settings import GatewaySettings
from gateway.store import MIGRATIONS, open_database
from modelyard.inference.v1 import inference_pb2 as pb
from services.core.db import Database, utcnow
from tests.support.fake_inference import BackgroundLoop, FakeInference, GatewayServer, deployment, start_fake

ADMIN = "projects-admin"
MESSAGES = [{"role": "user", "content": "hi there"}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    bg = BackgroundLoop()
    fake = FakeInference(deployments=[
        deployment("tiny", adapters=("sql", "chat")), deployment("other"),
        deployment("warming", state=pb.DEPLOYMENT_STATE_CREATING)])
    server = bg.run(start_fake(fake))
    settings = GatewaySettings(
        data_dir=tmp_path_factory.mktemp("gateway"), inference_addr=server.address, admin_token=ADMIN,
        log_json=False, routing={"refresh_interval_s": 0.2}, quota={"usage_flush_s": 0.2})
    gw = GatewayServer(bg, create_app(settings))
    gw.wait_started()
    admin = httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {ADMIN}"}, timeout=20)
    for name, models in [("team-a", ["tiny", "tiny:sql"]), ("team-b", ["other"]), ("adapters", ["tiny:*"])]:
        assert admin.post("/admin/projects", json={"name": name, "models": models}).status_code == 201
    keys = {p: admin.post("/admin/keys", json={"name": p, "project": p}).json()["key"]
            for p in ("team-a", "team-b", "adapters")}
    keys["default"] = admin.post("/admin/keys", json={"name": "no project given"}).json()["key"]
    clients = {p: openai.OpenAI(base_url=gw.url + "/v1", api_key=k, max_retries=0, timeout=20) for p, k in keys.items()}
    http = httpx.Client(base_url=gw.url, timeout=20)
    yield {"url": gw.url, "fake": fake, "admin": admin, "keys": keys, "clients": clients, "http": http}
    for c in clients.values():
        c.close()
    http.close()
    admin.close()
    gw.stop()
    bg.run(server.stop(0))
    bg.close()


def sdk(stack, project: str) -> openai.OpenAI:
    return stack["clients"][project]


# Every OpenAI endpoint of the gateway: (SDK call, raw HTTP request) for a model name.
ENDPOINTS = {
    "chat": (lambda c, m: c.chat.completions.create(model=m, messages=MESSAGES),
             lambda m: ("POST", "/v1/chat/completions", {"model": m, "messages": MESSAGES})),
    "chat-stream": (lambda c, m: list(c.chat.completions.create(model=m, messages=MESSAGES, stream=True)),
                    lambda m: ("POST", "/v1/chat/completions", {"model": m, "messages": MESSAGES, "stream": True})),
    "completions": (lambda c, m: c.completions.create(model=m, prompt="a b"),
                    lambda m: ("POST", "/v1/completions", {"model": m, "prompt": "a b"})),
    "completions-stream": (lambda c, m: list(c.completions.create(model=m, prompt="a b", stream=True)),
                           lambda m: ("POST", "/v1/completions", {"model": m, "prompt": "a b", "stream": True})),
    "completions-batch": (lambda c, m: c.completions.create(model=m, prompt=["a", "b"], max_tokens=2),
                          lambda m: ("POST", "/v1/completions", {"model": m, "prompt": ["a", "b"], "max_tokens": 2})),
    "embeddings": (lambda c, m: c.embeddings.create(model=m, input=["a b"]),
                   lambda m: ("POST", "/v1/embeddings", {"model": m, "input": ["a b"]})),
    "models-retrieve": (lambda c, m: c.models.retrieve(m), lambda m: ("GET", f"/v1/models/{m}", None)),
}
# (project of the key, a model that exists but that project may not use)
REFUSED = [("team-b", "tiny"), ("team-b", "warming"), ("team-a", "tiny:chat"), ("adapters", "tiny"),
           ("team-a", "other")]


def not_found(model: str) -> dict:
    return {"error": {"message": f"The model '{model}' does not exist or you do not have access to it.",
                      "type": "invalid_request_error", "param": None, "code": "model_not_found"}}


def test_models_list_shows_only_the_projects_models(stack):
    def listed(project: str) -> list[str]:
        return [m.id for m in sdk(stack, project).models.list().data]

    assert listed("team-a") == ["tiny", "tiny:sql"]
    assert listed("team-b") == ["other"]
    assert listed("adapters") == ["tiny:chat", "tiny:sql"]
    assert listed("default") == ["other", "tiny", "tiny:chat", "tiny:sql"]  # keys without a project: everything


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
def test_a_model_of_another_project_is_answered_as_one_that_does_not_exist(stack, endpoint):
    call, raw = ENDPOINTS[endpoint]
    fake = stack["fake"]
    before = len(fake.calls)
    for project, model in REFUSED:
        with pytest.raises(openai.NotFoundError) as refused:
            call(sdk(stack, project), model)
        assert refused.value.status_code == 404 and refused.value.code == "model_not_found", (project, model)
        method, path, body = raw(model)
        headers = {"authorization": f"Bearer {stack['keys'][project]}"}
        r = stack["http"].request(method, path, json=body, headers=headers)
        assert (r.status_code, r.json()) == (404, not_found(model)), (project, model, r.text)
    # word for word what a model that does not exist gets
    method, path, body = raw("no-such-model")
    absent = stack["http"].request(method, path, json=body, headers={"authorization": f"Bearer {stack['keys']['default']}"})
    assert (absent.status_code, absent.json()) == (404, not_found("no-such-model"))
    assert len(fake.calls) == before  # nothing reached the inference service


@pytest.mark.parametrize("project, model", [("team-a", "tiny"), ("team-a", "tiny:sql"), ("adapters", "tiny:chat"),
                                            ("team-b", "other"), ("default", "tiny:chat")])
def test_allowed_models_are_served(stack, project, model):
    client = sdk(stack, project)
    assert client.chat.completions.create(model=model, messages=MESSAGES).choices[0].message.content
    assert client.completions.create(model=model, prompt="a", max_tokens=1).choices[0].text == "Hello"
    assert client.models.retrieve(model).id == model


def test_allowed_models_change_at_once_and_admin_errors_name_the_field(stack):
    admin, client = stack["admin"], sdk(stack, "team-b")
    r = admin.put("/admin/projects/team-b/models", json={"models": ["other", "tiny"]})
    assert r.status_code == 200 and r.json()["models"] == ["other", "tiny"]
    assert r.json()["created_at"].endswith("Z") or "+00:00" in r.json()["created_at"]
    assert client.chat.completions.create(model="tiny", messages=MESSAGES).choices[0].message.content
    r = admin.patch("/admin/projects/team-b/models", json={"remove_models": ["tiny"], "add_models": ["tiny:sql"]})
    assert r.json()["models"] == ["other", "tiny:sql"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="tiny", messages=MESSAGES)
    assert [m.id for m in client.models.list().data] == ["other", "tiny:sql"]
    admin.put("/admin/projects/team-b/models", json={"models": ["other"]})

    bad = admin.put("/admin/projects/team-b/models", json={"models": ["other", "no spaces"]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "models[1]"
    assert admin.post("/admin/projects", json={"name": "team-a"}).json()["error"]["code"] == "project_exists"
    missing = admin.get("/admin/projects/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "project_not_found"
    orphan = admin.post("/admin/keys", json={"name": "x", "project": "nope"})
    assert orphan.status_code == 400 and orphan.json()["error"]["param"] == "project"
    assert admin.post("/admin/projects", json={"name": "Bad Name"}).json()["error"]["param"] == "name"
    listed = admin.get("/admin/keys", params={"project": "team-a"}).json()["data"]
    assert [(k["name"], k["project"]) for k in listed] == [("team-a", "team-a")]
    names = [p["name"] for p in admin.get("/admin/projects").json()["data"]]
    assert {"default", "team-a", "team-b", "adapters"} <= set(names)


def test_usage_is_reported_per_project_and_the_cli_manages_projects(stack):
    env = {"YARD_GATEWAY_URL": stack["url"], "YARD_GATEWAY_ADMIN_TOKEN": ADMIN}
    runner = CliRunner()
    made = runner.invoke(projects_app, ["create", "usage-p", "-m", "tiny"], env=env)
    assert made.exit_code == 0, made.output
    allowed = runner.invoke(projects_app, ["allow", "usage-p", "tiny:sql", "tiny:*"], env=env)
    assert allowed.exit_code == 0 and "tiny, tiny:sql, tiny:*" in allowed.output, allowed.output
    denied = runner.invoke(projects_app, ["deny", "usage-p", "tiny:*"], env=env)
    assert denied.exit_code == 0 and "tiny:*" not in denied.output
    created = runner.invoke(keys_app, ["create", "--name", "u", "--project", "usage-p"], env=env)
    assert created.exit_code == 0 and "in project usage-p" in created.output, created.output
    secret = created.output.strip().splitlines()[-1]
    client = openai.OpenAI(base_url=stack["url"] + "/v1", api_key=secret, max_retries=0, timeout=20)
    for model in ("tiny", "tiny:sql"):
        client.chat.completions.create(model=model, messages=MESSAGES)  # 2 prompt + 4 completion tokens
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=MESSAGES)

    rows = stack["admin"].get("/admin/usage", params={"group_by": "project", "project": "usage-p"}).json()["data"]
    assert rows == [{"project": "usage-p", "model": m, "requests": 1, "prompt_tokens": 2, "completion_tokens": 4,
                     "total_tokens": 6} for m in ("tiny", "tiny:sql")]
    per_key = stack["admin"].get("/admin/usage", params={"project": "usage-p"}).json()["data"]
    assert [(r["model"], r["requests"]) for r in per_key] == [("tiny", 1), ("tiny:sql", 1)] and "key_id" in per_key[0]

    import typer

    usage_app = typer.Typer()
    usage_app.command()(usage)
    shown = runner.invoke(usage_app, ["--by", "project", "--project", "usage-p"], env=env)
    assert shown.exit_code == 0, shown.output
    assert "usage-p" in shown.output and "tiny:sql" in shown.output
    listed = runner.invoke(keys_app, ["list", "--project", "usage-p"], env=env)
    assert listed.exit_code == 0 and "usage-p" in listed.output and secret not in listed.output
    missing = runner.invoke(projects_app, ["show", "nope"], env=env)
    assert missing.exit_code == 1 and "project_not_found" in missing.output


# The gateway's tables as release 1 created them (before projects), to upgrade from.
V1 = MetaData()
Table("gateway_api_keys", V1, Column("id", String(32), primary_key=True), Column("name", String(200), nullable=False),
      Column("key_hash", String(64), nullable=False, unique=True), Column("prefix", String(20), nullable=False),
      Column("rpm", Integer, nullable=False), Column("tpm", Integer, nullable=False),
      Column("created_at", DateTime(timezone=True), nullable=False),
      Column("revoked_at", DateTime(timezone=True), nullable=True))
Table("gateway_usage", V1, Column("request_id", String(128), primary_key=True),
      Column("key_id", String(32), nullable=False), Column("model", String(300), nullable=False),
      Column("endpoint", String(40), nullable=False), Column("prompt_tokens", Integer, nullable=False),
      Column("completion_tokens", Integer, nullable=False), Column("created_at", DateTime(timezone=True), nullable=False),
      Index("ix_gateway_usage_key_model", "key_id", "model"))


def test_keys_made_before_projects_land_in_the_default_project_that_allows_everything(db_url):
    old = Database(db_url)  # creates the migrations table
    with old.engine.begin() as conn:
        V1.create_all(conn)
        conn.execute(V1.tables["gateway_api_keys"].insert().values(
            id="key_old", name="old", key_hash=hash_key("sk-yard-old"), prefix="sk-yard-old", rpm=0, tpm=0,
            created_at=utcnow()))
        conn.execute(V1.tables["gateway_usage"].insert().values(
            request_id="r1", key_id="key_old", model="tiny", endpoint="chat.completions", prompt_tokens=2,
            completion_tokens=3, created_at=utcnow()))
        conn.exec_driver_sql("INSERT INTO schema_migrations (component, version, description, applied_at) "
                             "VALUES ('gateway', 1, 'api keys and usage records', CURRENT_TIMESTAMP)")
    old.dispose()

    db = open_database(db_url)
    assert db.schema_version("gateway") == len(MIGRATIONS)  # every migration since the first ran
    old_key = KeyStore(db).lookup("sk-yard-old")
    assert old_key is not None and old_key.project == "default"
    default = ProjectStore(db).get("default")
    assert default.models == ("*",) and default.allows("anything") and default.allows("tiny:sql")
    assert UsageRecorder(db, 1.0).totals(by="project") == [
        {"project": "default", "model": "tiny", "requests": 1, "prompt_tokens": 2, "completion_tokens": 3,
         "total_tokens": 5}]
    key, _ = KeyStore(db).create("new")  # a key made without a project joins the default one
    assert key.project == "default"
    db.dispose()
    again = open_database(db_url)  # opening again changes nothing
    assert again.schema_version("gateway") == len(MIGRATIONS) and len(KeyStore(again).list()) == 2
    again.dispose()
