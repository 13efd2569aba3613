"""An in-process registry + training service pair on loopback (port 0), for the training tests.

``Stack.registry`` and ``Stack.training`` are the SDK's ``RegistryClient`` and ``TrainingClient``:
the tests call the services the way platform teams do, and failures are the typed ``DomainError``s.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from modelyard.client import DomainError, RegistryClient, TrainingClient
from modelyard.common.v1 import common_pb2 as cpb
from modelyard.training.v1 import training_pb2 as tpb
from services.core.settings import GrpcServerSettings, S3Settings
from services.registry.app import build_app as build_registry
from services.registry.settings import RegistrySettings
from services.training.app import TrainingApp
from services.training.app import build_app as build_training
from services.training.settings import TrainingSettings

from .databases import Databases, service_url


@dataclass
class Stack:
    registry: RegistryClient
    training: TrainingClient
    training_addr: str
    app: TrainingApp


@asynccontextmanager
async def training_stack(data_dir: Path, s3: S3Settings, *, worker: bool = True, databases: Databases | None = None,
                         **training) -> AsyncIterator[Stack]:
    """Registry and training servers (training's worker runs jobs in child processes when ``worker``).

    Each service's database: a fresh one of ``databases`` (the ``db_backend`` / ``postgres_backend`` fixtures),
    else its SQLite file in its data dir (see tests/support/databases.py)."""
    reg_app = build_registry(RegistrySettings(data_dir=data_dir / "registry", s3=s3, grpc=GrpcServerSettings(port=0),
                                              import_workers=1, watch_interval_s=0.05,
                                              database_url=service_url("registry", databases)),
                             metrics=False, default_port=0)
    await reg_app.start()
    registry_addr = f"127.0.0.1:{reg_app.server.port}"
    settings = TrainingSettings(
        data_dir=data_dir / "training", s3=s3, grpc=GrpcServerSettings(port=0), registry_addr=registry_addr,
        worker_enabled=worker, worker_poll_interval_s=0.1, heartbeat_s=0.5, heartbeat_timeout_s=10,
        cancel_grace_s=5, database_url=service_url("training", databases), **training)
    app = build_training(settings, metrics=False, default_port=0)
    await app.start()
    registry = RegistryClient(registry_addr, timeout=120)
    training = TrainingClient(app.server.address, timeout=120)
    try:
        yield Stack(registry, training, app.server.address, app)
    finally:
        await training.close()
        await registry.close()
        await app.stop(grace=1)
        await reg_app.stop(grace=1)


async def import_model(registry: RegistryClient, folder: Path, parent: str = "models/tiny",
                       version_id: str = "base") -> str:
    """Import a local model folder into the registry; its version name once READY."""
    started = await registry.import_model(parent=parent, version_id=version_id, source_uri=str(folder))
    done = await registry.wait_import(started.name, timeout=300)
    assert done.state == cpb.JOB_STATE_SUCCEEDED, done.error
    return done.model_version


async def upload_dataset(registry: RegistryClient, parent: str, path: Path) -> str:
    """Upload a local dataset file as a new version of ``parent``; the version name."""
    return (await registry.upload_dataset(path, parent=parent, chunk_bytes=1 << 16)).name


async def fails(call: Awaitable[object], error: type[DomainError]) -> DomainError:
    """Await SDK ``call`` expecting it to raise ``error`` (the class stands for the gRPC code); the error,
    with its ``reason``, ``message``, ``metadata`` and ``violations`` to check."""
    with pytest.raises(error) as info:
        await call
    return info.value


def lora_job(base: str, datasets: list[str], method: int = tpb.TRAINING_METHOD_LORA, **spec) -> tpb.TrainingJob:
    """A small LoRA job on the tiny model (overrides go to the spec; ``hyperparameters`` is a dict)."""
    hp = {"max_steps": 4, "batch_size": 2, "gradient_accumulation_steps": 1, "max_length": 64, "learning_rate": 1e-3,
          "lora_rank": 4, "precision": tpb.PRECISION_FP32, **spec.pop("hyperparameters", {})}
    return tpb.TrainingJob(display_name=spec.pop("display_name", "test job"), spec=tpb.TrainingJobSpec(
        base_model_version=base, dataset_versions=datasets, method=method, hyperparameters=tpb.Hyperparameters(**hp),
        **spec))


async def wait_state(training: TrainingClient, name: str, states: set[int], timeout: float = 120) -> tpb.TrainingJob:
    """Poll the job (generous ``timeout``) until it is in one of ``states``; the job."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        job = await training.get_training_job(name)
        if job.state in states:
            return job
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{name} still in state {job.state} after {timeout}s")
        await asyncio.sleep(0.1)
