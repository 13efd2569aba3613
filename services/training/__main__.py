"""``python -m services.training``: serve the training API and run its job worker until SIGTERM."""

from __future__ import annotations

from services.core.grpc_server import run_service
from services.core.logging import configure_logging
from services.core.runtime import freeze_startup_heap

from .app import build_app
from .settings import TrainingSettings


async def main() -> None:
    settings = TrainingSettings()
    configure_logging(level=settings.log_level, json=settings.log_json, service="training")
    app = build_app(settings)
    await app.start()
    freeze_startup_heap()
    await app.server.wait_for_termination()


if __name__ == "__main__":
    run_service(main)
