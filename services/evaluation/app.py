"""Wiring of the evaluation process: settings -> database, S3, registry and inference clients -> domain ->
gRPC server, the job worker next to it, and the sweep that removes temporary deployments an evaluation
left behind (a child killed before its own cleanup ran)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from modelyard.client import InferenceClient, NotFound, RegistryClient
from modelyard.evaluation.v1 import evaluation_pb2, evaluation_pb2_grpc
from modelyard.inference.v1 import inference_pb2 as ipb
from services.core.artifacts import S3ArtifactStore
from services.core.db import Database
from services.core.grpc_server import GrpcServer
from services.core.jobs import JobState, JobStore
from services.core.jobs.worker import JobServiceApp, service_worker
from services.core.listing import parse
from services.core.logging import get_logger
from services.core.settings import DEFAULT_PORTS

from .domain import JOB_KINDS, JOB_SCHEMA, Evaluations, Preflight, PreflightOptions, temporary_deployment_id
from .servicer import EvaluationServicer
from .settings import EvaluationSettings

log = get_logger(__name__)

SERVICE_NAME = evaluation_pb2.DESCRIPTOR.services_by_name["EvaluationService"].full_name
SWEEP_INTERVAL_S = 20.0

EvaluationApp = JobServiceApp[EvaluationSettings, Evaluations]


class DeploymentSweeper:
    """Removes the temporary deployment of every evaluation that ended in the last two hours and still has
    one (the job's own ``finally`` removes it; this covers a child killed before that ran)."""

    def __init__(self, store: JobStore, inference: InferenceClient, interval_s: float = SWEEP_INTERVAL_S) -> None:
        self.store = store
        self.inference = inference
        self.interval_s = interval_s
        self._done: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="evaluation-deployment-sweep")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.sweep()
            except Exception as exc:  # the sweep is retried next tick; the error is logged, never hidden
                log.warning("deployment_sweep_failed", error=str(exc))

    async def sweep(self) -> list[str]:
        """Undeploy leftovers now; the deployments removed."""
        since = (datetime.now(UTC) - timedelta(hours=2)).isoformat()
        query = parse(JOB_SCHEMA, filter=f'labels.target = "model_version" AND end_time > "{since}"', page_size=200)
        page = await asyncio.to_thread(self.store.list, query, JOB_SCHEMA, kinds=list(JOB_KINDS))
        removed = []
        for job in page.items:
            if job.state not in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED) or job.name in self._done:
                continue
            name = f"deployments/{temporary_deployment_id(job.name)}"
            try:
                dep = await self.inference.get_deployment(name, timeout=10)
            except NotFound:
                self._done.add(job.name)
                continue
            if dep.state != ipb.DEPLOYMENT_STATE_DELETING:
                await self.inference.undeploy(name, timeout=30)
                log.info("temporary_deployment_swept", evaluation=job.name, deployment=name)
                removed.append(name)
        return removed


def build_app(
    settings: EvaluationSettings, *, metrics: bool = True, default_port: int = DEFAULT_PORTS["evaluation"]
) -> EvaluationApp:
    """Build every component (connects to the database and S3; does not listen yet)."""
    db = Database(settings.db_url_for("evaluation"))
    store = JobStore(db)
    artifacts = S3ArtifactStore.connect(settings.s3)
    credentials = settings.client_credentials()
    registry = RegistryClient(settings.registry_addr, timeout=60, credentials=credentials)
    inference = InferenceClient(settings.inference_addr, timeout=60, credentials=credentials)
    options = PreflightOptions(
        s3=settings.s3,
        registry_addr=settings.registry_addr,
        inference_addr=settings.inference_addr,
        deploy_engine=settings.deploy_engine,
        deploy_timeout_s=settings.deploy_timeout_s,
        deploy_options={
            "max_model_len": settings.deploy_max_model_len,
            "max_num_seqs": settings.deploy_max_num_seqs,
            "kv_cache_bytes": settings.deploy_kv_cache_bytes,
        },
        default_concurrency=settings.default_concurrency,
        data={
            "cache_dir": str(settings.cache_path()),
            "hf_endpoint": settings.hf_endpoint,
            "modelscope_endpoint": settings.modelscope_endpoint,
            "hub": settings.benchmark_hub,
        },
        sandbox={
            "timeout_s": settings.sandbox_timeout_s,
            "memory_bytes": settings.sandbox_memory_bytes,
            "allow_degraded": settings.sandbox_allow_degraded,
        },
    )
    evaluations = Evaluations(store, Preflight(registry, inference, options), max_attempts=settings.max_attempts)
    worker = service_worker(settings, store, JOB_KINDS, "evaluation")
    if worker is not None and settings.hf_token:  # the hub token reaches the child through its environment only
        worker.child_env["YARD_JOB_HF_TOKEN"] = settings.hf_token
    sweeper = DeploymentSweeper(store, inference)

    async def load_samples(key: str) -> list[dict[str, Any]]:
        data = await asyncio.to_thread(artifacts.get_bytes, key)
        return [json.loads(line) for line in data.decode().splitlines() if line.strip()]

    server = GrpcServer(
        settings.grpc,
        service="evaluation",
        default_port=default_port,
        metrics=metrics,
        auth=settings.auth,
        tls=settings.tls,
    )
    server.add_servicer(
        evaluation_pb2_grpc.add_EvaluationServiceServicer_to_server,
        EvaluationServicer(evaluations, load_samples),
        SERVICE_NAME,
    )
    app = EvaluationApp(settings, evaluations, worker, server)

    async def _shutdown() -> None:
        await sweeper.stop()
        if worker is not None:
            await worker.stop()  # running attempts are requeued
        await registry.close()
        await inference.close()
        await asyncio.to_thread(db.dispose)

    server.on_shutdown(_shutdown)
    original_start = app.start

    async def start() -> None:
        await original_start()
        sweeper.start()

    app.start = start  # type: ignore[method-assign]
    app.sweeper = sweeper  # type: ignore[attr-defined]
    return app
