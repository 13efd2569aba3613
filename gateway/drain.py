"""The gateway's drain on SIGTERM (``python -m gateway``; settings ``http.drain_notice_s`` and
``http.grace_period_s``).

1. The signal marks the process draining: ``/readyz`` answers 503 (``"status": "draining"``) and
   every new request but ``/healthz`` and ``/metrics`` gets 503 in the OpenAI error shape, code
   ``draining``, with ``Connection: close`` and ``Retry-After``, for ``drain_notice_s`` (time for a
   load balancer to see the readiness fail and send new work elsewhere). Requests in flight go on.
2. Then uvicorn's own shutdown: the listening socket closes, idle connections close, requests in
   flight (streams too) get ``grace_period_s`` to finish; whatever still runs then is cancelled (the
   client's stream ends without ``[DONE]``, the engine requests are aborted, usage is billed).

A second SIGTERM or SIGINT skips what is left of the notice.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Receive, Scope, Send

from services.core.logging import get_logger

from .errors import raw_error

log = get_logger("modelyard.gateway.drain")

# Paths that still answer while draining: liveness, metrics (and /readyz, which reports the drain).
PASS_THROUGH = frozenset({"/healthz", "/readyz", "/metrics"})
RETRY_AFTER_S = 1


class Drain:
    """Whether this process is draining; ``begin`` is safe to call from a signal handler."""

    def __init__(self) -> None:
        self.since: float | None = None  # time.monotonic() of the signal

    @property
    def draining(self) -> bool:
        return self.since is not None

    def begin(self) -> None:
        if self.since is None:
            self.since = time.monotonic()


class DrainMiddleware:
    """Pure ASGI: while draining, answers new requests 503 (see the module docstring)."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.drain.draining or scope["path"] in PASS_THROUGH:
            await self.app(scope, receive, send)
            return
        response = raw_error(
            503,
            "This gateway replica is shutting down; retry the request (another replica will take it).",
            "server_error",
            "draining",
        )
        response.headers["Connection"] = "close"
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
        await response(scope, receive, send)
