"""Two registry replicas (two real ``python -m services.registry`` processes, each with its own import
worker) on one PostgreSQL database, with concurrent imports. The replica running the gated hub import
is SIGKILLed while that import is fetching (it waits at the loopback hub, so the kill lands mid-import
by construction, not by timing): the other replica's imports finish, the killed replica's import is
claimed again by the survivor and succeeds on its second attempt, a failing import fails with its
reason, and S3 holds exactly the files of the READY versions (nothing orphaned)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from google.rpc import error_details_pb2

from modelyard.client import DeadlineExceeded, NotFound, RegistryClient, Unavailable
from modelyard.common.v1 import common_pb2 as cpb
from modelyard.registry.v1 import registry_pb2 as pb
from services.core.artifacts import S3ArtifactStore
from services.core.db import Database
from services.core.jobs import JobStore
from services.registry.tables import COMPONENT, MIGRATIONS
from tests.integration.test_registry import expect, wait_import
from tests.integration.test_registry_imports import GatedHub, gated_hub, tiny_model  # noqa: F401 - fixtures
from tests.support import databases

# How long a silent worker keeps its jobs. Generous: on 2 busy cores a live replica's heartbeat can be late by
# seconds, and a lease lost that way costs an extra attempt (correct, but not what this test is about).
HEARTBEAT_TIMEOUT_S = 20


@pytest.fixture
def pg_url():
    with databases.pg_database() as url:
        db = Database(url)  # the schema once, before the replicas start
        db.migrate(COMPONENT, MIGRATIONS)
        JobStore(db)
        db.dispose()
        yield url


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replica:
    def __init__(self, worker_id: str, pg_url: str, s3_settings, hub: str, data_dir: Path) -> None:
        self.worker_id = worker_id
        self.port = _free_port()
        env = {
            **os.environ, "HF_HUB_OFFLINE": "0",
            "YARD_REGISTRY_DATABASE_URL": pg_url, "YARD_REGISTRY_DATA_DIR": str(data_dir),
            "YARD_REGISTRY_GRPC__PORT": str(self.port), "YARD_REGISTRY_WORKER_ID": worker_id,
            "YARD_REGISTRY_IMPORT_WORKERS": "2", "YARD_REGISTRY_WORKER_POLL_INTERVAL_S": "0.2",
            "YARD_REGISTRY_HEARTBEAT_S": "0.5", "YARD_REGISTRY_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S),
            "YARD_REGISTRY_RECONCILE_INTERVAL_S": "1", "YARD_REGISTRY_HF_ENDPOINT": hub,
            "YARD_REGISTRY_S3__ENDPOINT": s3_settings.endpoint, "YARD_REGISTRY_S3__BUCKET": s3_settings.bucket,
            "YARD_REGISTRY_S3__ACCESS_KEY": s3_settings.access_key,
            "YARD_REGISTRY_S3__SECRET_KEY": s3_settings.secret_key.get_secret_value(),
            "YARD_REGISTRY_LOG_JSON": "true",
        }
        data_dir.mkdir(parents=True)
        self.log = (data_dir.parent / f"{worker_id}.log").open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "services.registry"], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.client = RegistryClient(f"127.0.0.1:{self.port}", timeout=120)

    async def ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, f"replica {self.worker_id} exited with {self.proc.returncode}"
            try:
                await self.client.list_imports(timeout=2)
                return
            except (Unavailable, DeadlineExceeded):  # not serving yet
                assert time.monotonic() < deadline, f"replica {self.worker_id} not serving after {timeout_s}s"
                await asyncio.sleep(0.2)

    async def close(self) -> None:
        await self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
async def replicas(pg_url, s3_settings, gated_hub, tmp_path):  # noqa: F811
    S3ArtifactStore.connect(s3_settings)  # the bucket
    pair = [Replica(w, pg_url, s3_settings, gated_hub, tmp_path / w / "data") for w in ("replica-a", "replica-b")]
    try:
        await asyncio.gather(*(r.ready() for r in pair))
        yield pair
    finally:
        GatedHub.gate.set()
        for r in pair:
            await r.close()


async def test_a_replica_killed_mid_import_loses_only_its_attempt(replicas, pg_url, tiny_model, s3_settings,  # noqa: F811
                                                                  tmp_path):
    a, b = replicas
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_model, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    gated = await a.client.import_model(parent="models/hub", source_uri="hf://acme/tiny")
    assert await asyncio.to_thread(GatedHub.arrived.wait, 120), "the hub import never started fetching"
    others = [
        await b.client.import_model(parent="models/local", source_uri=str(tiny_model)),
        await a.client.import_model(parent="models/local", source_uri=str(tiny_model)),
        await b.client.import_model(parent="models/broken", source_uri=str(truncated)),
    ]

    db = Database(pg_url)
    jobs = JobStore(db)
    try:
        holder = jobs.get(gated.name).worker
        assert holder in ("replica-a", "replica-b")
        victim, survivor = (a, b) if holder == a.worker_id else (b, a)
        victim.proc.send_signal(signal.SIGKILL)
        assert victim.proc.wait(60) == -signal.SIGKILL

        results = {i.name: await wait_import(survivor.client, i.name) for i in [gated, *others]}
        hub, local1, local2, broken = (results[i.name] for i in [gated, *others])
        assert hub.state == cpb.JOB_STATE_SUCCEEDED, hub.error
        # the killed attempt was retried (each attempt fetched the weights once); a further lost lease on an
        # overloaded machine would add attempts, never skip the retry
        assert hub.attempt_count >= 2 and GatedHub.weight_gets == hub.attempt_count
        events = [e async for e in survivor.client.watch_import(gated.name)]
        states = [e.state_change.state for e in events if e.HasField("state_change")]
        retried = [cpb.JOB_STATE_QUEUED, cpb.JOB_STATE_RUNNING] * hub.attempt_count
        assert states == [*retried, cpb.JOB_STATE_SUCCEEDED]
        assert [jobs.get(gated.name).worker] == [survivor.worker_id]
        for done in (local1, local2):
            assert done.state == cpb.JOB_STATE_SUCCEEDED, done.error
        assert broken.state == cpb.JOB_STATE_FAILED
        info = error_details_pb2.ErrorInfo()
        assert broken.error.details[0].Unpack(info) and info.reason == "SAFETENSORS_TRUNCATED"

        ready = (await survivor.client.list_model_versions(parent="models/-")).model_versions
        assert sorted(v.name for v in ready) == sorted([hub.model_version, local1.model_version, local2.model_version])
        assert all(v.state == pb.MODEL_VERSION_STATE_READY for v in ready)
        store = S3ArtifactStore(s3_settings)
        stored = {o.key for o in store.list("models")}
        expected = {f"{v.artifact_prefix}/files/{f.path}" for v in ready for f in v.files}
        expected |= {f"{v.artifact_prefix}/manifest.json" for v in ready}
        assert stored == expected  # the failed import and the killed attempt left nothing
        await expect(survivor.client.get_model("models/broken"), NotFound, "MODEL_NOT_FOUND")
        assert survivor.proc.poll() is None
    finally:
        db.dispose()
