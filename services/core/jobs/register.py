"""Register a job's outputs in the registry (RegisterDerivedVersion, with lineage) through the SDK."""

from __future__ import annotations

import asyncio
from typing import Any

from modelyard.client import RegistryClient
from modelyard.registry.v1 import registry_pb2 as pb

KINDS = {"adapter": pb.MODEL_KIND_ADAPTER, "merged": pb.MODEL_KIND_MERGED, "quantized": pb.MODEL_KIND_QUANTIZED}


async def _register(addr: str, **fields: Any) -> str:
    async with RegistryClient(addr, timeout=300) as registry:
        return (await registry.register_derived_version(**fields)).name


def register_version(
    addr: str,
    *,
    parent: str,
    kind: str,
    artifact_prefix: str,
    base_model_version: str,
    dataset_versions: list[str],
    job: str,
    parameters: dict[str, Any],
    description: str = "",
    labels: dict[str, str] | None = None,
) -> str:
    """Register the files under ``artifact_prefix`` as the next version of ``parent``; returns its name.

    Failures raise the registry's typed ``DomainError``.
    """
    lineage = pb.Lineage(
        base_model_version=base_model_version, dataset_versions=dataset_versions, job=job, parameters=parameters
    )
    return asyncio.run(
        _register(
            addr,
            parent=parent,
            kind=KINDS[kind],
            artifact_prefix=artifact_prefix,
            description=description,
            lineage=lineage,
            labels=labels,
        )
    )
