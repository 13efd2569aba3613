"""DomainError <-> google.rpc.Status (with ErrorInfo and BadRequest details)."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from .errors import DomainError, FieldViolation, error_class_for

STATUS_DETAILS_KEY = "grpc-status-details-bin"


def to_status_proto(err: DomainError) -> status_pb2.Status:
    details = []
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=err.domain, metadata=err.metadata)
    packed = any_pb2.Any()
    packed.Pack(info)
    details.append(packed)
    if err.violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in err.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        details.append(packed)
    return status_pb2.Status(code=err.code.value[0], message=err.message, details=details)


def error_from_status_proto(status: status_pb2.Status, code: grpc.StatusCode | None = None) -> DomainError:
    code = code or next((c for c in grpc.StatusCode if c.value[0] == status.code), grpc.StatusCode.UNKNOWN)
    reason, domain, metadata, violations = None, "modelyard", {}, []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = [FieldViolation(v.field, v.description) for v in bad.field_violations]
    return error_class_for(code)(
        status.message, reason=reason or code.name, domain=domain, metadata=metadata, violations=violations
    )


def error_from_rpc_error(exc: grpc.RpcError) -> DomainError:
    """The typed DomainError a failed call stands for (ErrorInfo reason kept when the server sent one)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    message = exc.details() if hasattr(exc, "details") else str(exc)
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == STATUS_DETAILS_KEY:
            status = status_pb2.Status.FromString(value)
            return error_from_status_proto(status, code)
    return error_class_for(code)(message or code.name, reason=code.name)
