"""Register a job's outputs in the registry over gRPC (RegisterDerivedVersion, with lineage)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from modelyard.registry.v1 import registry_pb2 as pb
from modelyard.registry.v1 import registry_pb2_grpc
from services.core.grpc_client import error_from_rpc_error, make_channel

KINDS = {"adapter": pb.MODEL_KIND_ADAPTER, "merged": pb.MODEL_KIND_MERGED}


async def _register(addr: str, request: pb.RegisterDerivedVersionRequest) -> str:
    channel = make_channel(addr, default_timeout_s=300)
    try:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        resp = await stub.RegisterDerivedVersion(request)
        return resp.model_version.name
    except grpc.aio.AioRpcError as exc:
        raise error_from_rpc_error(exc) from None
    finally:
        await channel.close()


def register_version(addr: str, *, parent: str, kind: str, artifact_prefix: str, base_model_version: str,
                     dataset_versions: list[str], job: str, parameters: dict[str, Any], description: str = "") -> str:
    """Register the files under ``artifact_prefix`` as the next version of ``parent``; returns its name."""
    request = pb.RegisterDerivedVersionRequest(
        parent=parent, kind=KINDS[kind], artifact_prefix=artifact_prefix, description=description,
        lineage=pb.Lineage(base_model_version=base_model_version, dataset_versions=dataset_versions, job=job,
                           parameters=parameters))
    return asyncio.run(_register(addr, request))
