"""Wiring of the registry process: settings -> database (registry and job tables) -> artifact store ->
domain -> gRPC server, and the import worker and its cleanup sweep next to it."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from modelyard.registry.v1 import registry_pb2, registry_pb2_grpc
from services.core.artifacts import S3ArtifactStore
from services.core.db import Database
from services.core.grpc_server import GrpcServer
from services.core.jobs import JobStore, Worker
from services.core.logging import get_logger
from services.core.settings import DEFAULT_PORTS

from .dataset_store import Datasets
from .domain import Registry
from .imports import JOB_KINDS, Imports, child_env
from .servicer import RegistryServicer
from .settings import RegistrySettings
from .tables import COMPONENT, MIGRATIONS

log = get_logger(__name__)

SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name


@dataclass
class RegistryApp:
    settings: RegistrySettings
    db: Database
    registry: Registry
    imports: Imports
    datasets: Datasets
    worker: Worker | None
    server: GrpcServer
    _stop_sweep: asyncio.Event = field(default_factory=asyncio.Event)
    _sweep: asyncio.Task | None = None

    async def start(self) -> None:
        await self.server.start()
        if self.worker is not None:
            await self.worker.start()
        self._stop_sweep.clear()
        self._sweep = asyncio.create_task(self.imports.reconcile_loop(
            self.worker, self._stop_sweep, interval_s=self.settings.reconcile_interval_s,
            tick_s=min(0.25, self.settings.worker_poll_interval_s)), name="registry-import-sweep")

    async def stop(self, grace: float | None = None) -> None:
        await self.server.stop(grace)

    async def _shutdown(self) -> None:
        self._stop_sweep.set()
        if self._sweep is not None:
            with contextlib.suppress(Exception):
                await self._sweep
            self._sweep = None
        if self.worker is not None:
            await self.worker.stop()  # running imports are requeued for another replica (or the next start)
        await asyncio.to_thread(self.db.dispose)


def build_app(settings: RegistrySettings, *, metrics: bool = True,
              default_port: int = DEFAULT_PORTS["registry"]) -> RegistryApp:
    """Build every component (connects to the database and S3; does not listen yet).

    ``settings.grpc.port`` 0 means ``default_port`` (pass 0 there too for an ephemeral port).
    """
    db_url = settings.db_url_for("registry")
    db = Database(db_url)
    db.migrate(COMPONENT, MIGRATIONS)
    jobs = JobStore(db)  # the job tables live in the registry's own database
    store = S3ArtifactStore.connect(settings.s3)
    registry = Registry(db, store, settings)
    imports = Imports(registry, jobs, max_attempts=settings.import_max_attempts)
    policy = imports.policy
    if policy.local.roots:
        log.info("import_sources", roots=list(policy.local.roots), buckets=list(policy.buckets))
    else:
        log.warning("local_imports_disabled", reason=f"non-loopback listen address and {policy.local.setting} is empty",
                    buckets=list(policy.buckets))
    worker = None
    if settings.worker_enabled:
        worker = Worker(
            jobs, JOB_KINDS, worker_id=settings.worker_id or None, workdir_root=settings.jobs_workdir(),
            slots=settings.import_workers, poll_interval_s=settings.worker_poll_interval_s,
            heartbeat_s=settings.heartbeat_s, heartbeat_timeout_s=settings.heartbeat_timeout_s,
            cancel_grace_s=settings.cancel_grace_s, child_env=child_env(settings, db_url))
    datasets = Datasets(registry)
    servicer = RegistryServicer(registry, imports, datasets, chunk_size=settings.download_chunk_bytes)
    server = GrpcServer(settings.grpc, service="registry", default_port=default_port, metrics=metrics,
                        auth=settings.auth, tls=settings.tls)
    server.add_servicer(registry_pb2_grpc.add_RegistryServiceServicer_to_server, servicer, SERVICE_NAME)
    app = RegistryApp(settings, db, registry, imports, datasets, worker, server)
    server.on_shutdown(app._shutdown)
    return app
