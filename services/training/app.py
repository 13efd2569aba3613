"""Wiring of the training process: settings -> hardware, database, S3, registry client -> domain ->
gRPC server, and the job worker next to it (stopped by the server's shutdown)."""

from __future__ import annotations

import asyncio

from modelyard.client import RegistryClient
from modelyard.training.v1 import training_pb2, training_pb2_grpc
from services.core.artifacts import S3ArtifactStore
from services.core.db import Database
from services.core.grpc_server import GrpcServer
from services.core.hardware import Hardware, detect_hardware
from services.core.jobs import JobStore
from services.core.jobs.worker import JobServiceApp, service_worker
from services.core.logging import get_logger
from services.core.settings import DEFAULT_PORTS

from .domain import JOB_KINDS, TrainingJobs
from .preflight import Preflight, PreflightOptions
from .servicer import TrainingServicer
from .settings import TrainingSettings

log = get_logger(__name__)

SERVICE_NAME = training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name


TrainingApp = JobServiceApp[TrainingSettings, TrainingJobs]


def build_app(settings: TrainingSettings, *, hardware: Hardware | None = None, metrics: bool = True,
              default_port: int = DEFAULT_PORTS["training"]) -> TrainingApp:
    """Build every component (connects to the database and S3; does not listen yet).

    ``hardware`` defaults to what this node has (``detect_hardware``).
    """
    hardware = hardware or detect_hardware()
    log.info("hardware_detected", accelerator=hardware.accelerator, devices=hardware.device_count,
             cpu_cores=hardware.cpu_cores, ram_bytes=hardware.ram_total_bytes)
    db = Database(settings.db_url_for("training"))
    store = JobStore(db)
    artifacts = S3ArtifactStore.connect(settings.s3)
    credentials = settings.client_credentials()
    registry = RegistryClient(settings.registry_addr, timeout=120, credentials=credentials)
    options = PreflightOptions(
        s3=settings.s3, registry_addr=settings.registry_addr,
        default_checkpoint_every_steps=settings.default_checkpoint_every_steps, max_processes=settings.max_processes,
        memory_headroom=settings.memory_headroom, memory_check=settings.memory_check,
        omp_num_threads=settings.omp_num_threads, evaluation_addr=settings.evaluation_addr, credentials=credentials)
    jobs = TrainingJobs(store, Preflight(registry, artifacts, hardware, options), artifacts,
                        max_attempts=settings.max_attempts)
    worker = service_worker(settings, store, JOB_KINDS, "training")
    server = GrpcServer(settings.grpc, service="training", default_port=default_port, metrics=metrics,
                        auth=settings.auth, tls=settings.tls)
    server.add_servicer(training_pb2_grpc.add_TrainingServiceServicer_to_server, TrainingServicer(jobs), SERVICE_NAME)

    async def _shutdown() -> None:
        if worker is not None:
            await worker.stop()  # running attempts are requeued, to resume from their checkpoints
        await registry.close()
        await asyncio.to_thread(db.dispose)

    server.on_shutdown(_shutdown)
    return TrainingApp(settings, jobs, worker, server)
