"""OpenAI error JSON, and the one table that maps typed DomainErrors to HTTP statuses.

Every error the gateway answers, whether raised here or returned by the inference service
(``services.core.grpc_client.error_from_rpc_error``), goes through ``error_body``/``error_response``:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse

from services.core import errors as e


@dataclass(frozen=True)
class HttpError:
    status: int
    type: str
    code: str | None  # used when the error carries only its class's default reason


# DomainError class -> HTTP status, OpenAI error type, default code. The one place this lives.
HTTP_ERRORS: dict[type[e.DomainError], HttpError] = {
    e.InvalidArgument: HttpError(400, "invalid_request_error", None),
    e.FailedPrecondition: HttpError(400, "invalid_request_error", None),
    e.Unauthenticated: HttpError(401, "invalid_request_error", "invalid_api_key"),
    e.PermissionDenied: HttpError(403, "permission_error", None),
    e.NotFound: HttpError(404, "invalid_request_error", "not_found"),
    e.AlreadyExists: HttpError(409, "invalid_request_error", "already_exists"),
    e.Aborted: HttpError(409, "invalid_request_error", "aborted"),
    e.ResourceExhausted: HttpError(429, "rate_limit_error", "rate_limit_exceeded"),
    e.Cancelled: HttpError(499, "invalid_request_error", "cancelled"),
    e.Internal: HttpError(500, "server_error", None),
    e.DataLoss: HttpError(500, "server_error", None),
    e.Unimplemented: HttpError(501, "invalid_request_error", "unsupported"),
    e.Unavailable: HttpError(503, "server_error", "service_unavailable"),
    e.DeadlineExceeded: HttpError(504, "server_error", "timeout"),
}


class RateLimited(e.ResourceExhausted):
    """A key's rpm/tpm limit is reached; carries the x-ratelimit-* and Retry-After headers."""

    def __init__(self, message: str, *, limit: str, headers: dict[str, str]) -> None:
        super().__init__(message, reason="RATE_LIMIT_EXCEEDED", metadata={"limit": limit})
        self.headers = headers


def http_error_for(err: e.DomainError) -> HttpError:
    for cls in type(err).__mro__:
        if cls in HTTP_ERRORS:
            return HTTP_ERRORS[cls]
    return HTTP_ERRORS[e.Internal]


def error_body(err: e.DomainError) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI error JSON) for a domain error."""
    mapped = http_error_for(err)
    code = mapped.code if err.reason == type(err).default_reason or err.reason == err.code.name else err.reason.lower()
    err_type = mapped.type
    if isinstance(err, RateLimited):
        err_type = err.metadata["limit"]  # OpenAI: "requests" or "tokens"
    param = err.violations[0].field if err.violations else None
    return mapped.status, {"error": {"message": err.message, "type": err_type, "param": param, "code": code}}


def error_response(err: e.DomainError, headers: dict[str, str] | None = None) -> JSONResponse:
    status, body = error_body(err)
    all_headers = dict(headers or {})
    if isinstance(err, RateLimited):
        all_headers.update(err.headers)
    return JSONResponse(body, status_code=status, headers=all_headers)


def raw_error(status: int, message: str, err_type: str, code: str | None, param: str | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": err_type, "param": param, "code": code}}, status_code=status
    )


def finite(value: float) -> float | None:
    """JSON has no NaN: a log-probability the engine could not give (NaN) becomes null."""
    return value if math.isfinite(value) else None


def token_logprob(lp: Any) -> float | None:
    """A TokenLogprob's log-probability; unset (the first token of an echoed prompt) becomes null."""
    return finite(lp.logprob) if lp.HasField("logprob") else None


def sse_event(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()
