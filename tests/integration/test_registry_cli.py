"""``python -m services.registry`` as its own process, driven by the ``yard models/datasets`` commands."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import yaml
from typer.testing import CliRunner

from cli.demo_models import build_tiny_model
from cli.registry_cmds import datasets_app, models_app
from cli.s3server import free_port


@pytest.fixture
def registry_process(tmp_path, s3_settings):
    port = free_port()
    env = dict(os.environ, YARD_REGISTRY_DATA_DIR=str(tmp_path / "data"), YARD_REGISTRY_GRPC__PORT=str(port),
               YARD_REGISTRY_S3__ENDPOINT=s3_settings.endpoint, YARD_REGISTRY_S3__BUCKET=s3_settings.bucket,
               YARD_REGISTRY_S3__ACCESS_KEY=s3_settings.access_key,
               YARD_REGISTRY_S3__SECRET_KEY=s3_settings.secret_key.get_secret_value(),
               YARD_REGISTRY_GRPC__METRICS_PORT=str(free_port()), OMP_NUM_THREADS="1")
    with open(tmp_path / "log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.registry"], env=env, stderr=log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # polls until the port answers (generous: start-up on 2 busy cores)
        assert proc.poll() is None, (tmp_path / "log").read_text()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    assert proc.wait(30) == 0


def test_cli_imports_lists_shows_and_reports_errors_without_traces(registry_process, tmp_path):
    runner = CliRunner()
    env = {"YARD_REGISTRY_ADDR": registry_process}
    model = build_tiny_model(tmp_path / "tiny")
    result = runner.invoke(models_app, ["import", str(model), "--name", "tiny"], env=env)
    assert result.exit_code == 0, result.output
    assert "models/tiny/versions/v1" in result.output and "Qwen2ForCausalLM" in result.output

    listed = runner.invoke(models_app, ["list", "tiny"], env=env)
    assert listed.exit_code == 0 and "models/tiny/versions/v1" in listed.output

    missing = runner.invoke(models_app, ["show", "tiny/v9"], env=env)
    assert missing.exit_code == 1
    assert "not found" in missing.output and "VERSION_NOT_FOUND" in missing.output and "Traceback" not in missing.output

    (model / "config.json").unlink()
    failed = runner.invoke(models_app, ["import", str(model), "--name", "broken"], env=env)
    assert failed.exit_code == 1 and "CONFIG_MISSING" in failed.output

    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 3
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"messages\": 5}\n")
    up = runner.invoke(datasets_app, ["upload", str(data), "--name", "chat"], env=env)
    assert up.exit_code == 0 and "datasets/chat/versions/v1" in up.output, up.output
    local = runner.invoke(datasets_app, ["validate", str(data)])
    assert local.exit_code == 1 and "4" in local.output and "messages" in local.output


LONG_MODEL = "a-model-whose-name-is-longer-than-a-60-column-terminal-is-wide"  # 63 characters: the most allowed


def _yard(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The real ``yard`` entry point in a child process, its stdout a pipe (as in ``yard ... | grep``)."""
    return subprocess.run([sys.executable, "-m", "cli.main", *args], env=dict(os.environ, COLUMNS="60", **env),
                          capture_output=True, text=True, timeout=120)


def test_cli_output_json_yaml_and_whole_names_in_a_pipe(registry_process, tmp_path):
    env = {"YARD_REGISTRY_ADDR": registry_process}
    model = build_tiny_model(tmp_path / "tiny")
    imported = CliRunner().invoke(models_app, ["import", str(model), "--name", LONG_MODEL, "--label", "team=nlp"],
                                  env=env)
    assert imported.exit_code == 0, imported.output
    version = f"models/{LONG_MODEL}/versions/v1"

    table = _yard(env, "models", "list", LONG_MODEL)
    assert table.returncode == 0, table.stderr
    assert [line for line in table.stdout.splitlines() if version in line], table.stdout  # whole, on one line
    assert "…" not in table.stdout

    as_json = _yard(env, "models", "list", LONG_MODEL, "-o", "json")
    assert as_json.returncode == 0, as_json.stderr
    versions = json.loads(as_json.stdout)
    assert [v["name"] for v in versions] == [version]
    assert versions[0]["labels"] == {"team": "nlp"} and versions[0]["state"] == "MODEL_VERSION_STATE_READY"
    assert versions[0]["metadata"]["architecture"] == "Qwen2ForCausalLM"
    assert {f["path"] for f in versions[0]["files"]} >= {"config.json"}

    shown = yaml.safe_load(_yard(env, "models", "show", f"{LONG_MODEL}/v1", "--output", "yaml").stdout)
    assert shown["name"] == version and shown["kind"] == "MODEL_KIND_BASE"
    models = json.loads(_yard(env, "models", "list", "-o", "json").stdout)
    assert [m["name"] for m in models] == [f"models/{LONG_MODEL}"] and models[0]["version_count"] == 1
    lineage = json.loads(_yard(env, "models", "lineage", f"{LONG_MODEL}/v1", "-o", "json").stdout)
    assert lineage["nodes"][0]["name"] == version

    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    assert CliRunner().invoke(datasets_app, ["upload", str(data), "--name", "chat"], env=env).exit_code == 0
    datasets = yaml.safe_load(_yard(env, "datasets", "list", "chat", "-o", "yaml").stdout)
    assert [d["name"] for d in datasets] == ["datasets/chat/versions/v1"] and datasets[0]["row_count"] == "1"
    detail = json.loads(_yard(env, "datasets", "show", "chat/v1", "-o", "json").stdout)
    assert detail["dataset_version"]["format"] == "messages" and detail["validation"]["row_count"] == "1"

    bad = _yard(env, "models", "list", LONG_MODEL, "-o", "xml")
    assert bad.returncode == 2 and "xml" in bad.stderr  # typer refuses an unknown format
