"""The registry as the training service needs it (an adapter over its gRPC API)."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from modelyard.registry.v1 import registry_pb2 as rpb
from modelyard.registry.v1 import registry_pb2_grpc
from services.core.grpc_client import error_from_rpc_error, make_channel


@dataclass(frozen=True)
class ModelVersionInfo:
    name: str
    ready: bool
    kind: str  # base | adapter | merged | quantized
    artifact_prefix: str
    files: list[dict] = field(default_factory=list)  # {path, size, sha256}
    parameter_count: int = 0
    context_length: int = 0
    base_model_version: str = ""  # lineage parent
    dataset_versions: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DatasetVersionInfo:
    name: str
    key: str
    sha256: str
    format: str
    filename: str
    row_count: int


@dataclass(frozen=True)
class RowProblem:
    row: int
    field: str
    reason: str


class RegistryClient:
    """Async calls to the registry; failures come back as the registry's typed DomainErrors."""

    def __init__(self, addr: str, timeout_s: float = 120) -> None:
        self.addr = addr
        self._channel = make_channel(addr, default_timeout_s=timeout_s)
        self._stub = registry_pb2_grpc.RegistryServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def model_version(self, name: str) -> ModelVersionInfo:
        try:
            v = (await self._stub.GetModelVersion(rpb.GetModelVersionRequest(name=name))).model_version
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc_error(exc) from None
        return ModelVersionInfo(
            name=v.name, ready=v.state == rpb.MODEL_VERSION_STATE_READY,
            kind=rpb.ModelKind.Name(v.kind).removeprefix("MODEL_KIND_").lower(),
            artifact_prefix=v.artifact_prefix,
            files=[{"path": f.path, "size": f.size_bytes, "sha256": f.sha256} for f in v.files],
            parameter_count=v.metadata.parameter_count, context_length=v.metadata.context_length,
            base_model_version=v.lineage.base_model_version, dataset_versions=list(v.lineage.dataset_versions),
        )

    async def dataset_version(self, name: str) -> DatasetVersionInfo:
        try:
            d = (await self._stub.GetDatasetVersion(rpb.GetDatasetVersionRequest(name=name))).dataset_version
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc_error(exc) from None
        return DatasetVersionInfo(d.name, d.artifact_key, d.sha256, d.format, d.filename, d.row_count)

    async def validate_dataset(self, name: str, expected_format: str) -> tuple[int, list[RowProblem]]:
        """(row count, every bad row) of the stored dataset read as ``expected_format``."""
        try:
            r = await self._stub.ValidateDataset(rpb.ValidateDatasetRequest(name=name, expected_format=expected_format))
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc_error(exc) from None
        return r.row_count, [RowProblem(e.row, e.field, e.reason) for e in r.errors]
