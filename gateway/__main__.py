"""``python -m gateway``: the OpenAI-compatible REST gateway under uvicorn, with its drain on
SIGTERM (gateway/drain.py)."""

from __future__ import annotations

import math
import sys
import time
from types import FrameType

import uvicorn

from services.core.logging import configure_logging, get_logger
from services.core.runtime import freeze_startup_heap

from .app import create_app
from .drain import Drain
from .settings import GatewaySettings

log = get_logger("modelyard.gateway")


class DrainingServer(uvicorn.Server):
    """uvicorn whose first SIGTERM/SIGINT starts the gateway's drain: ``drain_notice_s`` of 503s
    and a failing /readyz, then uvicorn's graceful shutdown (``timeout_graceful_shutdown``); the
    process exits 0. A second signal exits at once (SIGINT twice: without waiting for requests)."""

    def __init__(self, config: uvicorn.Config, drain: Drain, notice_s: float) -> None:
        super().__init__(config)
        self._drain = drain
        self._notice_s = notice_s
        self._exit_at: float | None = None
        self._announced = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # runs in a signal handler: set flags only
        if self._drain.draining:
            super().handle_exit(sig, frame)
            return
        self._drain.begin()
        if self._notice_s > 0:
            self._exit_at = time.monotonic() + self._notice_s
        else:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self._drain.draining and not self._announced:
            self._announced = True
            log.info("gateway_draining", notice_s=self._notice_s, grace_s=self.config.timeout_graceful_shutdown)
        if self._exit_at is not None and time.monotonic() >= self._exit_at:
            self.should_exit = True
        return await super().on_tick(counter)


def main() -> None:
    settings = GatewaySettings()
    configure_logging(level=settings.log_level, json=settings.log_json, service="gateway")
    app = create_app(settings)
    freeze_startup_heap()
    # log_config=None: uvicorn keeps its hands off logging, so its records reach the root handler
    # that configure_logging installed and come out in the service's format (JSON).
    config = uvicorn.Config(
        app,
        host=settings.http.host,
        port=settings.http.port,
        log_level="warning",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=math.ceil(settings.http.grace_period_s),
        timeout_keep_alive=int(settings.http.keep_alive_s),
        loop="asyncio" if settings.event_loop == "asyncio" else "auto",
    )
    server = DrainingServer(config, app.state.drain, settings.http.drain_notice_s)
    server.run()
    if not server.started:
        sys.exit(3)  # as uvicorn.run: the app did not start (its error is logged)
    log.info("gateway_stopped")


if __name__ == "__main__":
    main()
