"""``python -m gateway``: the OpenAI-compatible REST gateway under uvicorn."""

from __future__ import annotations

import uvicorn

from services.core.logging import configure_logging
from services.core.runtime import freeze_startup_heap

from .app import create_app
from .settings import GatewaySettings


def main() -> None:
    settings = GatewaySettings()
    configure_logging(level=settings.log_level, json=settings.log_json, service="gateway")
    app = create_app(settings)
    freeze_startup_heap()
    # log_config=None: uvicorn keeps its hands off logging, so its records reach the root handler
    # that configure_logging installed and come out in the service's format (JSON).
    uvicorn.run(
        app,
        host=settings.http.host,
        port=settings.http.port,
        log_level="warning",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=20,
        timeout_keep_alive=int(settings.http.keep_alive_s),
        loop="asyncio" if settings.event_loop == "asyncio" else "auto",
    )


if __name__ == "__main__":
    main()
