"""Wiring of the quantization process: settings -> hardware, database, S3, registry client -> domain ->
gRPC server, and the job worker next to it (stopped by the server's shutdown)."""

from __future__ import annotations

import asyncio

from modelyard.client import RegistryClient
from modelyard.quantization.v1 import quantization_pb2, quantization_pb2_grpc
from services.core.artifacts import S3ArtifactStore
from services.core.db import Database
from services.core.grpc_server import GrpcServer
from services.core.hardware import Hardware, detect_hardware
from services.core.jobs import JobStore
from services.core.jobs.worker import JobServiceApp, service_worker
from services.core.logging import get_logger
from services.core.settings import DEFAULT_PORTS

from .domain import JOB_KINDS, QuantizationJobs
from .preflight import Preflight, PreflightOptions
from .servicer import QuantizationServicer
from .settings import QuantizationSettings

log = get_logger(__name__)

SERVICE_NAME = quantization_pb2.DESCRIPTOR.services_by_name["QuantizationService"].full_name


QuantizationApp = JobServiceApp[QuantizationSettings, QuantizationJobs]


def build_app(
    settings: QuantizationSettings,
    *,
    hardware: Hardware | None = None,
    metrics: bool = True,
    default_port: int = DEFAULT_PORTS["quantization"],
) -> QuantizationApp:
    """Build every component (connects to the database and S3; does not listen yet)."""
    hardware = hardware or detect_hardware()
    log.info(
        "hardware_detected",
        accelerator=hardware.accelerator,
        devices=hardware.device_count,
        cpu_cores=hardware.cpu_cores,
        ram_bytes=hardware.ram_total_bytes,
        quant_venv=str(settings.quant_venv),
        quant_venv_present=(settings.quant_venv / "bin" / "python").exists(),
    )
    db = Database(settings.db_url_for("quantization"))
    store = JobStore(db)
    artifacts = S3ArtifactStore.connect(settings.s3)
    registry = RegistryClient(settings.registry_addr, timeout=120, credentials=settings.client_credentials())
    options = PreflightOptions(
        s3=settings.s3,
        registry_addr=settings.registry_addr,
        training_addr=settings.training_addr,
        quant_venv=settings.quant_venv,
        vllm_venv=settings.vllm_venv,
        verify_engine=settings.verify_engine,
        memory_headroom=settings.memory_headroom,
        memory_check=settings.memory_check,
        omp_num_threads=settings.omp_num_threads,
        eval_tokens=settings.eval_tokens,
        eval_seq_len=settings.eval_seq_len,
    )
    jobs = QuantizationJobs(
        store, Preflight(registry, artifacts, hardware, options), max_attempts=settings.max_attempts
    )
    worker = service_worker(settings, store, JOB_KINDS, "quantization")
    server = GrpcServer(
        settings.grpc,
        service="quantization",
        default_port=default_port,
        metrics=metrics,
        auth=settings.auth,
        tls=settings.tls,
    )
    server.add_servicer(
        quantization_pb2_grpc.add_QuantizationServiceServicer_to_server, QuantizationServicer(jobs), SERVICE_NAME
    )

    async def _shutdown() -> None:
        if worker is not None:
            await worker.stop()  # running attempts are requeued
        await registry.close()
        await asyncio.to_thread(db.dispose)

    server.on_shutdown(_shutdown)
    return QuantizationApp(settings, jobs, worker, server)
