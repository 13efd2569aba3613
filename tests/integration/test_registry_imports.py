"""Imports as jobs, through a real registry (gRPC on loopback, nanio S3, SQLite): cancel while queued or
running, attempts used up by a replica that vanished, and an attempt that finds its version already READY.
Each ends with nothing of an unfinished version left: no version row, no model it created, no S3 object."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from cli.demo_models import build_tiny_model
from modelyard.client import FailedPrecondition, NotFound, RegistryClient
from modelyard.common.v1 import common_pb2 as cpb
from services.core.artifacts import S3ArtifactStore
from services.core.jobs.context import Channel, JobContext
from services.core.settings import GrpcServerSettings
from services.registry import import_job
from services.registry.app import build_app
from services.registry.imports import KIND, child_env
from services.registry.settings import RegistrySettings
from tests.integration.test_registry import _Hub, expect, wait_import


class GatedHub(_Hub):
    """The loopback hub; the first download of the weights waits for ``gate`` (set at teardown)."""

    arrived = threading.Event()
    gate = threading.Event()
    weight_gets = 0
    lock = threading.Lock()

    def do_GET(self) -> None:  # noqa: N802
        if self.path.split("?")[0].endswith("/model.safetensors"):
            with self.lock:
                GatedHub.weight_gets += 1
                first = GatedHub.weight_gets == 1
            if first:
                GatedHub.arrived.set()
                GatedHub.gate.wait(300)
        super().do_GET()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def gated_hub(tiny_model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the import child reads it
    GatedHub.files = {p.name: p.read_bytes() for p in tiny_model.iterdir() if p.is_file()}
    GatedHub.requests = []
    GatedHub.weight_gets = 0
    GatedHub.arrived = threading.Event()
    GatedHub.gate = threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", 0), GatedHub)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    GatedHub.gate.set()
    server.shutdown()
    server.server_close()


async def _start(tmp_path, s3_settings, **overrides):
    values = dict(
        data_dir=tmp_path / "data", s3=s3_settings, grpc=GrpcServerSettings(port=0), import_workers=1,
        worker_poll_interval_s=0.1, heartbeat_s=0.5, heartbeat_timeout_s=5.0, cancel_grace_s=2.0,
        reconcile_interval_s=0.3, hf_endpoint="http://127.0.0.1:9", hf_token=None)
    settings = RegistrySettings(**{**values, **overrides})
    app = build_app(settings, metrics=False, default_port=0)
    await app.start()
    client = RegistryClient(f"127.0.0.1:{app.server.port}", timeout=120)
    client.app = app  # type: ignore[attr-defined]
    return app, client


@pytest.fixture
async def queue_only(tmp_path, s3_settings):
    """A registry replica that serves but runs no imports (they stay QUEUED)."""
    app, client = await _start(tmp_path, s3_settings, worker_enabled=False)
    yield client
    await client.close()
    await app.stop(grace=1)


@pytest.fixture
async def registry(tmp_path, s3_settings, gated_hub):
    app, client = await _start(tmp_path, s3_settings, hf_endpoint=gated_hub)
    yield client
    GatedHub.gate.set()
    await client.close()
    await app.stop(grace=1)


async def _gone(registry: RegistryClient, version: str, model: str, store: S3ArtifactStore, prefix: str, timeout_s: float = 60) -> None:
    """Poll (generous timeout) until the version, its model and every object under its prefix are gone."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await registry.get_model_version(version)
            left = "version"
        except NotFound:
            left = "objects" if store.list(prefix) else ""
        if not left:
            break
        assert time.monotonic() < deadline, f"{left} of {version} still there after {timeout_s}s"
        await asyncio.sleep(0.1)
    await expect(registry.get_model(model), NotFound, "MODEL_NOT_FOUND")


def _prefix(registry: RegistryClient, version: str) -> str:
    with registry.app.db.session() as s:  # type: ignore[attr-defined]
        from services.registry.tables import VersionRow

        return s.get(VersionRow, version).artifact_prefix


async def test_cancel_while_queued_removes_the_reserved_version_at_once(queue_only, tiny_model, s3_settings):
    store = S3ArtifactStore(s3_settings)
    started = await queue_only.import_model(parent="models/queued", source_uri=str(tiny_model))
    assert started.state == cpb.JOB_STATE_QUEUED and started.model_version == "models/queued/versions/v1"
    prefix = _prefix(queue_only, started.model_version)
    store.put_bytes(f"{prefix}/files/stray.bin", b"left by nobody")  # whatever a lost attempt might leave

    cancelled = await queue_only.cancel_import(started.name)
    assert cancelled.state == cpb.JOB_STATE_CANCELLED and cancelled.end_time.seconds > 0
    assert store.list(prefix) == []
    await _gone(queue_only, started.model_version, "models/queued", store, prefix, timeout_s=0)
    await expect(queue_only.cancel_import(started.name), FailedPrecondition, "JOB_ALREADY_FINISHED")
    events = [e async for e in queue_only.watch_import(started.name)]
    assert [e.state_change.state for e in events if e.HasField("state_change")] == [
        cpb.JOB_STATE_QUEUED, cpb.JOB_STATE_CANCELLED]
    later = [e async for e in queue_only.watch_import(started.name, after_sequence=events[0].sequence)]
    assert [e.sequence for e in later] == [e.sequence for e in events[1:]]


async def test_attempts_used_up_by_a_vanished_replica_are_cleaned_by_the_sweep(queue_only, tiny_model, s3_settings):
    app = queue_only.app
    store = S3ArtifactStore(s3_settings)
    started = await queue_only.import_model(parent="models/lost", source_uri=str(tiny_model))
    prefix = _prefix(queue_only, started.model_version)
    jobs = app.imports.store
    with app.db.engine.begin() as conn:  # one attempt only
        from services.core.jobs.store import jobs as jobs_table

        conn.execute(jobs_table.update().where(jobs_table.c.name == started.name).values(max_attempts=1))
    claimed = jobs.claim("replica-that-dies", [KIND])
    assert claimed is not None and claimed.name == started.name
    store.put_bytes(f"{prefix}/files/model.safetensors", b"half an upload")
    assert jobs.requeue_stale(0.0) == [started.name]  # its heartbeat is older than any timeout

    failed = await queue_only.get_import(started.name)
    assert failed.state == cpb.JOB_STATE_FAILED and "no attempts left" in failed.error.message
    from google.rpc import error_details_pb2

    info = error_details_pb2.ErrorInfo()
    assert failed.error.details[0].Unpack(info) and info.reason == "JOB_ATTEMPTS_EXHAUSTED"
    await _gone(queue_only, started.model_version, "models/lost", store, prefix)  # the periodic sweep


async def test_cancel_while_running_stops_the_child_and_leaves_nothing(registry, s3_settings):
    store = S3ArtifactStore(s3_settings)
    started = await registry.import_model(parent="models/hub", source_uri="hf://acme/tiny")
    prefix = _prefix(registry, started.model_version)
    assert await asyncio.to_thread(GatedHub.arrived.wait, 120), "the import never reached the hub"
    running = await registry.get_import(started.name)
    assert running.state == cpb.JOB_STATE_RUNNING and running.stage == "fetching" and running.attempt_count == 1

    await registry.cancel_import(started.name)
    done = await wait_import(registry, started.name)
    assert done.state == cpb.JOB_STATE_CANCELLED
    await _gone(registry, started.model_version, "models/hub", store, prefix)


async def test_an_attempt_that_finds_its_version_ready_returns_at_once(registry, tiny_model, s3_settings, tmp_path):
    started = await registry.import_model(parent="models/once", source_uri=str(tiny_model))
    done = await wait_import(registry, started.name)
    assert done.state == cpb.JOB_STATE_SUCCEEDED and done.stage == "done" and done.progress.fraction == 1.0
    assert done.progress.metrics["bytes_total"] > 0
    app = registry.app
    job = app.imports.store.get(started.name)
    before = await registry.get_model_version(done.model_version)

    # The same spec run again as a later attempt (a replica that died after marking the version READY).
    out = io.StringIO()
    ctx = JobContext(name=job.name, spec=job.spec, attempt=2, workdir=tmp_path / "w", resume_state=None,
                     channel=Channel(out))
    env = child_env(app.settings, app.db.url)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        assert import_job.run(ctx) == {"model_version": done.model_version}
    assert "version already ready" in out.getvalue() and "import stage" not in out.getvalue()
    after = await registry.get_model_version(done.model_version)
    assert after == before
