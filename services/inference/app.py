"""Wiring of the inference process: settings -> database, S3, registry client -> deployments -> gRPC."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from modelyard.client import RegistryClient
from modelyard.inference.v1 import inference_pb2, inference_pb2_grpc
from services.core.artifacts import S3ArtifactStore
from services.core.db import Database
from services.core.grpc_server import GrpcServer
from services.core.logging import get_logger
from services.core.settings import DEFAULT_PORTS

from .cache import ModelCache
from .deployments import Deployments
from .metrics import TASK_ERRORS
from .servicer import InferenceServicer
from .settings import InferenceSettings
from .tables import COMPONENT, MIGRATIONS

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name

log = get_logger(__name__)


class HealthPublisher:
    """Keeps the gRPC health of the inference service in step with its deployments: the service's
    name (``modelyard.inference.v1.InferenceService``, what a readiness probe asks) is SERVING only
    while every deployment is READY (KServe's rule for a server's readiness; none counts as ready),
    and ``deployments/{id}`` is SERVING while that deployment is READY (NOT_SERVING once it is gone).
    The empty name stays the process's liveness. From SIGTERM on, every name answers NOT_SERVING
    (the server's drain) whatever the deployments do."""

    def __init__(self, server: GrpcServer, deployments: Deployments) -> None:
        self._server = server
        self._deployments = deployments
        self._changed = asyncio.Event()
        self._published: dict[str, bool] = {}
        self._task: asyncio.Task | None = None
        deployments.on_change(self._changed.set)

    def start(self) -> None:
        self._changed.set()
        self._task = asyncio.create_task(self._run(), name="health-publisher")

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.wait({self._task})

    async def _run(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            try:
                await self.publish()
            except Exception as exc:  # noqa: BLE001 - logged and counted; the next change publishes again
                TASK_ERRORS.labels("health_publisher", type(exc).__name__).inc()
                log.exception("health_publish_failed")

    async def publish(self) -> None:
        ready = self._deployments.readiness()
        wanted = {SERVICE_NAME: all(ready.values()), **ready}
        for name in self._published.keys() - wanted.keys():
            wanted[name] = False  # undeployed
        for name, serving in wanted.items():
            if self._published.get(name) != serving:
                await self._server.set_health(name, serving)
                self._published[name] = serving


@dataclass
class InferenceApp:
    settings: InferenceSettings
    db: Database
    deployments: Deployments
    server: GrpcServer
    health: HealthPublisher = field(init=False)

    def __post_init__(self) -> None:
        self.health = HealthPublisher(self.server, self.deployments)

    async def start(self) -> None:
        """Listen, then bring back the stored deployments (their engines start in the background);
        the service's health follows the deployments from then on."""
        await self.server.start()
        await self.deployments.recover()
        self.health.start()
        self.server.on_shutdown(self.health.stop)

    async def stop(self, grace: float | None = None) -> None:
        await self.server.stop(grace)


def build_app(settings: InferenceSettings, *, metrics: bool = True,
              default_port: int = DEFAULT_PORTS["inference"]) -> InferenceApp:
    """Build every component (connects to the database and S3; does not listen yet)."""
    db = Database(settings.db_url_for("inference"))
    db.migrate(COMPONENT, MIGRATIONS)
    store = S3ArtifactStore.connect(settings.s3)
    registry = RegistryClient(settings.registry_addr, credentials=settings.client_credentials())
    deployments = Deployments(db, registry, ModelCache(store, settings.cache_dir()), settings)
    server = GrpcServer(settings.grpc, service="inference", default_port=default_port, metrics=metrics,
                        auth=settings.auth, tls=settings.tls)
    servicer = InferenceServicer(deployments, settings.pacing().pacer())
    server.add_servicer(inference_pb2_grpc.add_InferenceServiceServicer_to_server, servicer, SERVICE_NAME)

    async def _shutdown() -> None:
        await deployments.close()
        await registry.close()
        db.dispose()

    server.on_shutdown(_shutdown)
    return InferenceApp(settings, db, deployments, server)
