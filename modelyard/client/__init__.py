"""The ModelYard Python SDK: one typed async client per service.

    from modelyard.client import RegistryClient, NotFound

    async with RegistryClient("127.0.0.1:50051") as registry:
        version = await registry.get_model_version("models/smollm2/versions/v1")

Methods take keyword arguments and return the proto resources of ``protos/modelyard/*/v1``;
each call has a deadline (the client's ``timeout``, or ``timeout=`` per call), forwards the
current ``x-request-id``, retries UNAVAILABLE only when the call is safe to repeat, and raises the
service's typed error (``NotFound``, ``InvalidArgument`` with ``.violations``...), never a raw
``grpc.aio.AioRpcError``. See README.md next to this file.
"""

from services.core.credentials import ClientCredentials
from services.core.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    DomainError,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from services.core.status import error_from_status_proto as error_from_status

from ._base import ServiceClient, is_safe_to_retry, resolve_credentials
from .evaluation import EvaluationClient
from .inference import InferenceClient
from .pipeline import PipelineClient
from .quantization import QuantizationClient
from .registry import RegistryClient
from .training import TrainingClient

__all__ = [
    "RegistryClient",
    "TrainingClient",
    "QuantizationClient",
    "EvaluationClient",
    "InferenceClient",
    "PipelineClient",
    "ServiceClient",
    "ClientCredentials",
    "resolve_credentials",
    "is_safe_to_retry",
    "DomainError",
    "FieldViolation",
    "InvalidArgument",
    "NotFound",
    "AlreadyExists",
    "FailedPrecondition",
    "Aborted",
    "Unavailable",
    "Unauthenticated",
    "PermissionDenied",
    "ResourceExhausted",
    "DeadlineExceeded",
    "Cancelled",
    "DataLoss",
    "Internal",
    "Unimplemented",
    "error_from_status",
]
