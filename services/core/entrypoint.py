"""The one entry point of every gRPC service: ``python -m services.<name>`` calls ``run_service``.

``run_service(build_app, XxxSettings)`` builds the settings once (from the environment, through the
settings class only), configures logging, builds the app, starts it, freezes the startup heap and
serves until SIGTERM/SIGINT, when the server drains (health NOT_SERVING, in-flight calls get their
grace period) and the process exits 0. A startup error that is the operator's to fix (a port in
use, an unreachable database...) is one clear line on stderr and exit status 1; settings that do
not validate are exit status 2.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Protocol, TypeVar

from pydantic import ValidationError

from .errors import DomainError
from .grpc_server import GrpcServer
from .logging import configure_logging, get_logger
from .runtime import freeze_startup_heap
from .settings import EventLoop, ServiceSettings

log = get_logger("modelyard.service")

S = TypeVar("S", bound=ServiceSettings)


class ServiceApp(Protocol):
    """What ``build_app`` returns: something that starts and has the gRPC server to serve on."""

    @property
    def server(self) -> GrpcServer: ...

    async def start(self) -> None: ...


def service_name_of(settings_cls: type[ServiceSettings]) -> str:
    """``registry`` for a settings class with env prefix ``YARD_REGISTRY_``."""
    prefix = str(settings_cls.model_config.get("env_prefix", ""))
    return prefix.removeprefix("YARD_").strip("_").lower() or "service"


def loop_factory(event_loop: EventLoop) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed and not turned off (as for the gateway under uvicorn); None: asyncio's."""
    if event_loop == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def serve(app: ServiceApp) -> None:
    """Start ``app``, then serve until a termination signal has drained and stopped its server."""
    await app.start()
    freeze_startup_heap()
    await app.server.wait_for_termination()


def run_service(app_factory: Callable[[S], ServiceApp], settings_cls: type[S], *, service: str | None = None) -> None:
    """Run a service process to its end (see the module docstring); ``service`` names it in the logs
    (default: from the settings class's env prefix)."""
    name = service or service_name_of(settings_cls)
    try:
        settings = settings_cls()
    except ValidationError as err:
        print(f"error: invalid {name} settings:\n{err}", file=sys.stderr)
        sys.exit(2)
    configure_logging(level=settings.log_level, json=settings.log_json, service=name)

    async def main() -> None:
        await serve(app_factory(settings))

    try:
        with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
            runner.run(main())
    except DomainError as err:
        log.error("service_failed_to_start", error=err.message, reason=err.reason)
        print(f"error: {err.message}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        pass
