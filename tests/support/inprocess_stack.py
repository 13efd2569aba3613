"""The services of a serving test in this process, on a ``BackgroundLoop``: a bucket of the session's
nanio server, the registry and the inference service on free ports, and a deployment waited for until
READY. The OpenAI-API tests (tools, embeddings, fine-tuning) build on these instead of each starting
them their own way; the gateway comes from ``tests.integration.test_gateway_real_stack`` or
``GatewayServer``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from modelyard.client import InferenceClient
from modelyard.inference.v1 import inference_pb2 as pb
from services.core.settings import GrpcServerSettings, S3Settings
from services.inference.app import build_app as build_inference
from services.inference.settings import InferenceSettings
from services.registry.app import build_app as build_registry
from services.registry.settings import RegistrySettings
from tests.support.fake_inference import BackgroundLoop
from tests.support.s3 import s3_bucket

__all__ = ["deploy_ready", "inference_service", "registry_service", "s3_bucket"]


async def _started(build: Any, settings: Any) -> Any:
    app = build(settings, metrics=False, default_port=0)
    await app.start()
    return app


@contextmanager
def registry_service(bg: BackgroundLoop, work: Path, s3: S3Settings) -> Iterator[str]:
    """The registry on a free port (no model hub: imports are local folders); yields its address."""
    settings = RegistrySettings(
        data_dir=work / "registry",
        s3=s3,
        grpc=GrpcServerSettings(port=0),
        import_workers=1,
        hf_endpoint="http://127.0.0.1:9",
        hf_token=None,
    )
    registry = bg.run(_started(build_registry, settings), timeout=60)
    try:
        yield f"127.0.0.1:{registry.server.port}"
    finally:
        bg.run(registry.stop(grace=1), timeout=60)


@contextmanager
def inference_service(
    bg: BackgroundLoop,
    work: Path,
    s3: S3Settings,
    registry_addr: str,
    *,
    vllm_python: Path | None = None,
    engine_start_timeout_s: float = 300,
) -> Iterator[tuple[str, InferenceClient]]:
    """The inference service on a free port (engines get one OpenMP thread); yields its address and a
    client made on ``bg``'s loop."""
    settings = InferenceSettings(
        data_dir=work / "inference",
        s3=s3,
        grpc=GrpcServerSettings(port=0),
        registry_addr=registry_addr,
        vllm_python=vllm_python or work / "no-vllm" / "bin" / "python",
        restart_backoff_initial_s=0.5,
        health_interval_s=0.5,
        engine_start_timeout_s=engine_start_timeout_s,
        omp_threads=1,
        stream_interval_ms=0,
    )
    inference = bg.run(_started(build_inference, settings), timeout=60)
    addr = f"127.0.0.1:{inference.server.port}"

    async def connect() -> InferenceClient:  # built in the loop that uses it
        return InferenceClient(addr, timeout=60)

    client = bg.run(connect(), timeout=10)
    try:
        yield addr, client
    finally:
        bg.run(client.close())
        bg.run(inference.stop(grace=1), timeout=60)


async def deploy_ready(
    client: InferenceClient, deployment: pb.Deployment, deployment_id: str, timeout_s: float = 300
) -> pb.Deployment:
    """Deploy and wait until READY (a FAILED deployment fails the test with its error)."""
    await client.deploy(deployment, deployment_id=deployment_id, timeout=120)
    deadline = time.monotonic() + timeout_s
    while True:
        dep = await client.get_deployment(f"deployments/{deployment_id}")
        if dep.state == pb.DEPLOYMENT_STATE_READY:
            return dep
        assert dep.state != pb.DEPLOYMENT_STATE_FAILED, dep.error.message
        assert time.monotonic() < deadline, f"deployment stayed {pb.DeploymentState.Name(dep.state)}"
        await asyncio.sleep(0.2)
