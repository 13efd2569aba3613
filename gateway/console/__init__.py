"""The web console: a single-page app at ``/console`` and its JSON API at ``/console/api``.

Signed in with an API key or the admin token (``auth``), it shows models with their lineage and
scores, datasets with their validation report, jobs of every service with live charts (SSE from the
Watch RPCs), deployments, evaluations side by side and a chat playground that streams through the
gateway's own /v1/chat/completions. ``install_console`` adds it to the gateway app.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from ..settings import GatewaySettings
from . import api, auth, pages
from .auth import ConsoleState


def install_console(app: FastAPI, settings: GatewaySettings) -> None:
    """Mount the console's routes on ``app``. Its clients of the services are made on first use and
    closed when the app stops (the router's lifespan, nested in the app's)."""
    app.state.console = ConsoleState.create(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await app.state.console.services.close()

    router = APIRouter(lifespan=lifespan)
    router.include_router(auth.router, prefix="/console/api")
    router.include_router(api.router, prefix="/console/api")
    router.include_router(pages.router)
    app.include_router(router)


__all__ = ["install_console", "ConsoleState"]
