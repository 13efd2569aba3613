"""What a service reads of registry resources before it queues a job: model and dataset versions as
plain records, fetched through the SDK with errors that name the request field they came from.
Used by the preflight of the training and quantization services."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from modelyard.registry.v1 import registry_pb2 as rpb

from .errors import DomainError, FailedPrecondition, FieldViolation, NotFound


class RegistryReader(Protocol):
    """The registry calls preflight makes: ``modelyard.client.RegistryClient`` (or a fake in a unit test)."""

    async def get_model_version(self, name: str) -> rpb.ModelVersion: ...
    async def get_dataset_version(self, name: str) -> rpb.DatasetVersion: ...
    async def validate_dataset(self, name: str, *, expected_format: str = "") -> rpb.ValidateDatasetResponse: ...


@dataclass(frozen=True)
class ModelVersionInfo:
    """What a job needs of a registry model version."""

    name: str
    ready: bool
    kind: str  # base | adapter | merged | quantized
    artifact_prefix: str
    files: list[dict] = field(default_factory=list)  # {path, size, sha256}
    parameter_count: int = 0
    context_length: int = 0
    base_model_version: str = ""  # lineage parent
    dataset_versions: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, v: rpb.ModelVersion) -> ModelVersionInfo:
        return cls(
            name=v.name,
            ready=v.state == rpb.MODEL_VERSION_STATE_READY,
            kind=rpb.ModelKind.Name(v.kind).removeprefix("MODEL_KIND_").lower(),
            artifact_prefix=v.artifact_prefix,
            files=[{"path": f.path, "size": f.size_bytes, "sha256": f.sha256} for f in v.files],
            parameter_count=v.metadata.parameter_count,
            context_length=v.metadata.context_length,
            base_model_version=v.lineage.base_model_version,
            dataset_versions=list(v.lineage.dataset_versions),
        )


@dataclass(frozen=True)
class DatasetVersionInfo:
    """What a job needs of a registry dataset version."""

    name: str
    key: str
    sha256: str
    format: str
    filename: str
    row_count: int

    @classmethod
    def of(cls, d: rpb.DatasetVersion) -> DatasetVersionInfo:
        return cls(d.name, d.artifact_key, d.sha256, d.format, d.filename, d.row_count)


async def ready_model_version(registry: RegistryReader, name: str, field_name: str) -> ModelVersionInfo:
    """A READY registry model version; errors name ``field_name``."""
    try:
        version = ModelVersionInfo.of(await registry.get_model_version(name))
    except DomainError as err:
        raise naming(err, field_name) from None
    if not version.ready:
        raise FailedPrecondition(
            f"{field_name}: model version {name} is not READY",
            reason="MODEL_VERSION_NOT_READY",
            metadata={"name": name},
            violations=[FieldViolation(field_name, "not READY")],
        )
    return version


def naming(err: DomainError, field_name: str) -> DomainError:
    """The registry's error, its message prefixed with the request field it is about."""
    description = err.message
    if isinstance(err, NotFound):
        description = f"{err.message} (not found in the registry)"
    return type(err)(
        f"{field_name}: {description}",
        reason=err.reason,
        domain=err.domain,
        metadata=err.metadata,
        violations=[FieldViolation(field_name, err.message)],
    )
