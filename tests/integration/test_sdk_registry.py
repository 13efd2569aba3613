"""modelyard.client.RegistryClient against the real registry service (in-process, real S3 and SQLite)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.demo_models import build_tiny_model
from modelyard.client import FailedPrecondition, InvalidArgument, NotFound, RegistryClient, error_from_status
from modelyard.common.v1 import common_pb2 as cpb
from modelyard.registry.v1 import registry_pb2 as pb
from services.core.settings import GrpcServerSettings
from services.registry.app import build_app
from services.registry.settings import RegistrySettings


@pytest.fixture
async def registry(tmp_path, s3_settings):
    app = build_app(RegistrySettings(data_dir=tmp_path / "registry", s3=s3_settings, grpc=GrpcServerSettings(port=0),
                                     import_workers=1, watch_interval_s=0.05), metrics=False, default_port=0)
    await app.start()
    try:
        async with RegistryClient(f"127.0.0.1:{app.server.port}", timeout=120) as client:
            yield client
    finally:
        await app.stop(grace=1)


async def test_a_platform_teams_flow_through_the_sdk(registry: RegistryClient, tmp_path: Path):
    model = build_tiny_model(tmp_path / "tiny")
    started = await registry.import_model(parent="models/tiny", source_uri=str(model), labels={"team": "nlp"})
    assert started.name.startswith("imports/") and started.model_version == "models/tiny/versions/v1"
    events: list[cpb.JobEvent] = []
    done = await registry.wait_import(started.name, on_event=events.append)
    assert done.state == cpb.JOB_STATE_SUCCEEDED, done.error
    assert [e.sequence for e in events] == sorted({e.sequence for e in events}) and events

    version = await registry.get_model_version(done.model_version)
    assert version.state == pb.MODEL_VERSION_STATE_READY and version.labels["team"] == "nlp"
    assert [v.name async for v in registry.iter_model_versions(parent="models/tiny", page_size=1)] == [version.name]
    assert [m.name async for m in registry.iter_models()] == ["models/tiny"]

    config = await registry.download_to(version.name, path="config.json", dest=tmp_path / "config.json")
    assert json.loads(config.read_text()) == json.loads((model / "config.json").read_text())
    lineage = await registry.get_lineage(version.name)
    assert lineage.nodes[0].name == version.name

    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 3
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dataset = await registry.upload_dataset(data, parent="datasets/chat", chunk_bytes=64)
    assert dataset.name == "datasets/chat/versions/v1" and dataset.row_count == 3
    report = await registry.validate_dataset(dataset.name, expected_format="messages")
    assert report.row_count == 3 and not report.errors


async def test_registry_errors_arrive_as_typed_errors(registry: RegistryClient, tmp_path: Path):
    with pytest.raises(NotFound) as missing:
        await registry.get_model_version("models/tiny/versions/v9")
    assert missing.value.reason.endswith("NOT_FOUND")
    with pytest.raises(InvalidArgument) as bad:
        await registry.list_models(page_size=-1)
    assert bad.value.violations and bad.value.violations[0].field == "page_size"

    model = build_tiny_model(tmp_path / "tiny")
    (model / "config.json").unlink()
    started = await registry.import_model(parent="models/broken", source_uri=str(model))
    failed = await registry.wait_import(started.name)
    assert failed.state == cpb.JOB_STATE_FAILED
    err = error_from_status(failed.error)
    assert err.reason == "CONFIG_MISSING", err
    with pytest.raises((NotFound, FailedPrecondition)):
        await registry.get_model_version(started.model_version)  # a failed import leaves no version behind
