"""Typed domain errors, defined once for every service.

Domain code raises these; the gRPC error interceptor maps them to status codes with
``google.rpc.ErrorInfo`` (reason, domain, metadata) and ``google.rpc.BadRequest`` field
violations, and the client helper turns such a status back into the same typed error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class DomainError(Exception):
    """Base of all errors a caller may see. ``reason`` is UPPER_SNAKE, stable, machine-readable."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        domain: str = "modelyard",
        metadata: dict[str, str] | None = None,
        violations: list[FieldViolation] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.domain = domain
        self.metadata = dict(metadata or {})
        self.violations = list(violations or [])

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"{type(self).__name__}({self.message!r}, reason={self.reason!r})"


class InvalidArgument(DomainError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    @classmethod
    def for_field(cls, field_name: str, description: str, **kw) -> InvalidArgument:
        return cls(f"{field_name}: {description}", violations=[FieldViolation(field_name, description)], **kw)


class NotFound(DomainError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Aborted(DomainError):
    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class Unavailable(DomainError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class Unauthenticated(DomainError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(DomainError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class ResourceExhausted(DomainError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(DomainError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class Cancelled(DomainError):
    code = grpc.StatusCode.CANCELLED
    default_reason = "CANCELLED"


class DataLoss(DomainError):
    """Stored bytes do not match their manifest (checksum or size mismatch)."""

    code = grpc.StatusCode.DATA_LOSS
    default_reason = "CHECKSUM_MISMATCH"


class Internal(DomainError):
    code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"


class Unimplemented(DomainError):
    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "UNIMPLEMENTED"


_BY_CODE: dict[grpc.StatusCode, type[DomainError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Aborted,
        Unavailable,
        Unauthenticated,
        PermissionDenied,
        ResourceExhausted,
        DeadlineExceeded,
        Cancelled,
        DataLoss,
        Internal,
        Unimplemented,
    )
}


def error_class_for(code: grpc.StatusCode) -> type[DomainError]:
    return _BY_CODE.get(code, Internal)


def error_dict(err: DomainError) -> dict[str, Any]:
    """The one stored form of a DomainError (a job's or an import's ``error``): the fields of a
    ``google.rpc.Status`` with its ``ErrorInfo`` and ``BadRequest`` details, as JSON-ready values."""
    return {
        "code": err.code.name,
        "reason": err.reason,
        "message": err.message,
        "domain": err.domain,
        "metadata": dict(err.metadata),
        "violations": [{"field": v.field, "description": v.description} for v in err.violations],
    }


def error_to_domain(error: Mapping[str, Any]) -> DomainError:
    """Back from the stored form to the typed error (unknown codes become Internal)."""
    cls = error_class_for(getattr(grpc.StatusCode, str(error.get("code")), grpc.StatusCode.INTERNAL))
    return cls(
        error.get("message", ""),
        reason=error.get("reason") or None,
        domain=error.get("domain", "modelyard"),
        metadata=dict(error.get("metadata") or {}),
        violations=[FieldViolation(v["field"], v["description"]) for v in error.get("violations") or []],
    )
