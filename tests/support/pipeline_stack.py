"""Every service in-process on loopback (port 0): registry, training, quantization, inference, evaluation and
the pipeline service, for the pipeline tests. Each is the real one (gRPC, nanio S3, SQLite or PostgreSQL); jobs
and engines run as child processes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from modelyard.client import NotFound, PipelineClient, QuantizationClient
from modelyard.common.v1 import common_pb2 as cpb
from modelyard.pipeline.v1 import pipeline_pb2 as ppb
from services.core.settings import GrpcServerSettings, S3Settings
from services.pipeline.app import PipelineApp
from services.pipeline.app import build_app as build_pipeline
from services.pipeline.settings import PipelineSettings
from services.quantization.app import build_app as build_quantization
from services.quantization.settings import QuantizationSettings

from .databases import Databases, service_url
from .evaluation_stack import EvalStack, evaluation_stack

TERMINAL = {cpb.JOB_STATE_SUCCEEDED, cpb.JOB_STATE_FAILED, cpb.JOB_STATE_CANCELLED}


@dataclass
class PipelineStack:
    services: EvalStack
    quantization: QuantizationClient
    pipeline: PipelineClient
    pipeline_addr: str
    app: PipelineApp


@asynccontextmanager
async def pipeline_stack(data_dir: Path, s3: S3Settings, *, databases: Databases | None = None,
                         **pipeline) -> AsyncIterator[PipelineStack]:
    """Databases as in ``training_stack``."""
    async with evaluation_stack(data_dir, s3, databases=databases) as ev:
        registry_addr = ev.app.settings.registry_addr
        training_addr = ev.training.target
        q_settings = QuantizationSettings(
            data_dir=data_dir / "quantization", s3=s3, grpc=GrpcServerSettings(port=0), registry_addr=registry_addr,
            training_addr=training_addr, worker_poll_interval_s=0.1, heartbeat_s=0.5, heartbeat_timeout_s=10,
            cancel_grace_s=5, omp_num_threads=1, eval_tokens=256, eval_seq_len=64, verify_engine="transformers",
            database_url=service_url("quantization", databases),
        )  # fmt: skip
        q_app = build_quantization(q_settings, metrics=False, default_port=0)
        await q_app.start()
        settings = PipelineSettings(
            data_dir=data_dir / "pipeline", s3=s3, grpc=GrpcServerSettings(port=0), registry_addr=registry_addr,
            training_addr=training_addr, quantization_addr=q_app.server.address, evaluation_addr=ev.evaluation_addr,
            inference_addr=ev.inference.target, worker_poll_interval_s=0.1, heartbeat_s=0.5, heartbeat_timeout_s=10,
            cancel_grace_s=20, database_url=service_url("pipeline", databases), **pipeline,
        )  # fmt: skip
        app = build_pipeline(settings, metrics=False, default_port=0)
        await app.start()
        quantization = QuantizationClient(q_app.server.address, timeout=120)
        client = PipelineClient(app.server.address, timeout=120)
        try:
            yield PipelineStack(ev, quantization, client, app.server.address, app)
        finally:
            await client.close()
            await quantization.close()
            await app.stop(grace=1)
            await q_app.stop(grace=1)


async def wait_run(client: PipelineClient, name: str, states: set[int] = TERMINAL, timeout: float = 600,
                   until=None) -> ppb.PipelineRun:  # fmt: skip
    """Poll the run until it is in ``states`` (or ``until(run)`` holds)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            run = await client.get_pipeline_run(name)
        except NotFound:  # not created yet (a CLI process is about to)
            run = ppb.PipelineRun(name=name)
        if run.create_time.seconds and (until(run) if until is not None else run.state in states):
            return run
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{name}: not there after {timeout}s: state {run.state}, steps "
                                 f"{[(s.id, s.state) for s in run.steps]}")  # fmt: skip
        await asyncio.sleep(0.3)
