"""``python -m services.inference``: serve deployments until SIGTERM (engines are stopped with it)."""

from __future__ import annotations

from services.core.grpc_server import run_service
from services.core.logging import configure_logging
from services.core.runtime import freeze_startup_heap

from .app import build_app
from .settings import InferenceSettings


async def main() -> None:
    settings = InferenceSettings()
    configure_logging(level=settings.log_level, json=settings.log_json, service="inference")
    app = build_app(settings)
    await app.start()
    freeze_startup_heap()
    await app.server.wait_for_termination()


if __name__ == "__main__":
    run_service(main)
