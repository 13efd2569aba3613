"""Errors the code catches and goes on after (a best-effort step that failed): each one is logged with
its reason and counted, so that none disappears silently.

``modelyard_errors_suppressed_total{where, error}`` counts them by place (a short stable name such as
``rpc_request_id_echo``) and exception type; the log event is ``error_suppressed`` with the same fields
and the message. Without prometheus_client (the SDK / CLI install, no server extra) they are logged only.
"""

from __future__ import annotations

from typing import Any

try:
    from prometheus_client import Counter
except ImportError:  # pragma: no cover - the client-only install
    ERRORS_SUPPRESSED: Any = None
else:
    ERRORS_SUPPRESSED = Counter(
        "modelyard_errors_suppressed_total",
        "Errors caught and not re-raised (the operation went on), by place and exception type",
        ["where", "error"],
    )


def record_suppressed(logger: Any, where: str, exc: BaseException, *, level: str = "warning", **fields: Any) -> None:
    """Count ``exc`` under ``where`` and log it at ``level`` with its type and message."""
    if ERRORS_SUPPRESSED is not None:
        ERRORS_SUPPRESSED.labels(where, type(exc).__name__).inc()
    getattr(logger, level)("error_suppressed", where=where, error=type(exc).__name__, reason=str(exc), **fields)


__all__ = ["ERRORS_SUPPRESSED", "record_suppressed"]
