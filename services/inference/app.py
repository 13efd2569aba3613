"""Wiring of the inference process: settings -> database, S3, registry client -> deployments -> gRPC."""

from __future__ import annotations

from dataclasses import dataclass

from modelyard.client import RegistryClient
from modelyard.inference.v1 import inference_pb2, inference_pb2_grpc
from services.core.artifacts import S3ArtifactStore
from services.core.db import Database
from services.core.grpc_server import GrpcServer
from services.core.settings import DEFAULT_PORTS

from .cache import ModelCache
from .deployments import Deployments
from .servicer import InferenceServicer
from .settings import InferenceSettings
from .tables import COMPONENT, MIGRATIONS

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


@dataclass
class InferenceApp:
    settings: InferenceSettings
    db: Database
    deployments: Deployments
    server: GrpcServer

    async def start(self) -> None:
        """Listen, then bring back the stored deployments (their engines start in the background)."""
        await self.server.start()
        await self.deployments.recover()

    async def stop(self, grace: float | None = None) -> None:
        await self.server.stop(grace)


def build_app(settings: InferenceSettings, *, metrics: bool = True,
              default_port: int = DEFAULT_PORTS["inference"]) -> InferenceApp:
    """Build every component (connects to the database and S3; does not listen yet)."""
    db = Database(settings.db_url_for("inference"))
    db.migrate(COMPONENT, MIGRATIONS)
    store = S3ArtifactStore.connect(settings.s3)
    registry = RegistryClient(settings.registry_addr)
    deployments = Deployments(db, registry, ModelCache(store, settings.cache_dir()), settings)
    server = GrpcServer(settings.grpc, service="inference", default_port=default_port, metrics=metrics)
    servicer = InferenceServicer(deployments, settings.pacing().pacer())
    server.add_servicer(inference_pb2_grpc.add_InferenceServiceServicer_to_server, servicer, SERVICE_NAME)

    async def _shutdown() -> None:
        await deployments.close()
        await registry.close()
        db.dispose()

    server.on_shutdown(_shutdown)
    return InferenceApp(settings, db, deployments, server)
