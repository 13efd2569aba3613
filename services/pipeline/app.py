"""Wiring of the pipeline process: settings -> database -> domain -> gRPC server, the job worker next to it.

Runs execute in job children like every other job, so a run survives its client, and the worker's
heartbeat/requeue gives a run whose service died a new attempt that re-attaches to its running step.
"""

from __future__ import annotations

import asyncio

from modelyard.pipeline.v1 import pipeline_pb2, pipeline_pb2_grpc
from services.core.db import Database
from services.core.grpc_server import GrpcServer
from services.core.jobs import JobStore
from services.core.jobs.worker import JobServiceApp, service_worker
from services.core.local_paths import LocalPathPolicy
from services.core.settings import DEFAULT_PORTS

from .domain import JOB_KINDS, PipelineRuns
from .servicer import PipelineServicer
from .settings import ALLOWED_ROOTS_SETTING, PipelineSettings

SERVICE_NAME = pipeline_pb2.DESCRIPTOR.services_by_name["PipelineService"].full_name

PipelineApp = JobServiceApp[PipelineSettings, PipelineRuns]


def build_app(
    settings: PipelineSettings, *, metrics: bool = True, default_port: int = DEFAULT_PORTS["pipeline"]
) -> PipelineApp:
    """Build every component (connects to the database; does not listen yet)."""
    db = Database(settings.db_url_for("pipeline"))
    store = JobStore(db)
    addrs = {
        "registry": settings.registry_addr,
        "training": settings.training_addr,
        "quantization": settings.quantization_addr,
        "evaluation": settings.evaluation_addr,
        "inference": settings.inference_addr,
    }
    policy = LocalPathPolicy.effective(settings.imports.allowed_roots, settings.grpc.host, ALLOWED_ROOTS_SETTING)
    runs = PipelineRuns(store, addrs, max_attempts=settings.max_attempts, local_policy=policy)
    worker = service_worker(settings, store, JOB_KINDS, "pipeline")
    server = GrpcServer(
        settings.grpc,
        service="pipeline",
        default_port=default_port,
        metrics=metrics,
        auth=settings.auth,
        tls=settings.tls,
    )
    server.add_servicer(pipeline_pb2_grpc.add_PipelineServiceServicer_to_server, PipelineServicer(runs), SERVICE_NAME)
    app = PipelineApp(settings, runs, worker, server)

    async def _shutdown() -> None:
        if worker is not None:
            await worker.stop()  # running attempts are requeued
        await asyncio.to_thread(db.dispose)

    server.on_shutdown(_shutdown)
    return app
