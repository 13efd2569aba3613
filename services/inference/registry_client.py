"""The registry as the inference service sees it: version manifests and deployment markers (gRPC)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import grpc

from modelyard.registry.v1 import registry_pb2 as rpb
from modelyard.registry.v1 import registry_pb2_grpc
from services.core.artifacts import FileEntry, Manifest
from services.core.grpc_client import error_from_rpc_error, make_channel


@dataclass(frozen=True)
class VersionInfo:
    name: str
    is_adapter: bool
    ready: bool
    artifact_prefix: str
    manifest: Manifest


class ModelSource(Protocol):
    async def get_version(self, name: str) -> VersionInfo: ...
    async def set_marker(self, version: str, deployment: str, deployed: bool) -> None: ...
    async def close(self) -> None: ...


class RegistryClient:
    """ModelSource over the registry's gRPC API; errors come back as the registry's DomainErrors."""

    def __init__(self, addr: str) -> None:
        self._channel = make_channel(addr, default_timeout_s=30)
        self._stub = registry_pb2_grpc.RegistryServiceStub(self._channel)

    async def get_version(self, name: str) -> VersionInfo:
        try:
            v = (await self._stub.GetModelVersion(rpb.GetModelVersionRequest(name=name))).model_version
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc_error(exc) from None
        return VersionInfo(
            name=v.name, is_adapter=v.kind == rpb.MODEL_KIND_ADAPTER, ready=v.state == rpb.MODEL_VERSION_STATE_READY,
            artifact_prefix=v.artifact_prefix,
            manifest=Manifest([FileEntry(f.path, f.size_bytes, f.sha256) for f in v.files]),
        )

    async def set_marker(self, version: str, deployment: str, deployed: bool) -> None:
        try:
            await self._stub.SetDeploymentMarker(
                rpb.SetDeploymentMarkerRequest(name=version, deployment=deployment, deployed=deployed))
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc_error(exc) from None

    async def close(self) -> None:
        await self._channel.close()
