"""Wiring of the registry process: settings -> database -> artifact store -> domain -> gRPC server."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from modelyard.registry.v1 import registry_pb2, registry_pb2_grpc
from services.core.artifacts import S3ArtifactStore
from services.core.db import Database
from services.core.grpc_server import GrpcServer
from services.core.logging import get_logger
from services.core.settings import DEFAULT_PORTS

from .dataset_store import Datasets
from .domain import Registry
from .imports import Imports
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
    server: GrpcServer

    async def start(self) -> None:
        await self.server.start()

    async def stop(self, grace: float | None = None) -> None:
        await self.server.stop(grace)


def build_app(settings: RegistrySettings, *, metrics: bool = True,
              default_port: int = DEFAULT_PORTS["registry"]) -> RegistryApp:
    """Build every component (connects to the database and S3; does not listen yet).

    ``settings.grpc.port`` 0 means ``default_port`` (pass 0 there too for an ephemeral port).
    """
    db = Database(settings.db_url_for("registry"))
    db.migrate(COMPONENT, MIGRATIONS)
    store = S3ArtifactStore.connect(settings.s3)
    registry = Registry(db, store, settings)
    imports = Imports(registry, workers=settings.import_workers)
    interrupted = imports.recover()
    if interrupted:
        log.warning("imports_interrupted", count=interrupted)
    datasets = Datasets(registry)
    servicer = RegistryServicer(registry, imports, datasets, chunk_size=settings.download_chunk_bytes,
                                watch_interval_s=settings.watch_interval_s)
    server = GrpcServer(settings.grpc, service="registry", default_port=default_port, metrics=metrics)
    server.add_servicer(registry_pb2_grpc.add_RegistryServiceServicer_to_server, servicer, SERVICE_NAME)

    async def _shutdown() -> None:
        await asyncio.to_thread(imports.close)
        db.dispose()

    server.on_shutdown(_shutdown)
    return RegistryApp(settings, db, registry, imports, datasets, server)
