"""An in-process registry + training + inference + evaluation stack on loopback (port 0), for the evaluation
tests. Every service is the real one (gRPC, nanio S3, SQLite or PostgreSQL); engines run as child processes,
evaluations as job children."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from modelyard.client import EvaluationClient, InferenceClient, RegistryClient, TrainingClient
from modelyard.common.v1 import common_pb2 as cpb
from modelyard.evaluation.v1 import evaluation_pb2 as epb
from modelyard.inference.v1 import inference_pb2 as ipb
from services.core.settings import GrpcServerSettings, S3Settings
from services.evaluation.app import EvaluationApp
from services.evaluation.app import build_app as build_evaluation
from services.evaluation.settings import EvaluationSettings
from services.inference.app import build_app as build_inference
from services.inference.settings import InferenceSettings

from .databases import Databases, service_url
from .training_stack import training_stack

PROJECT_ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = PROJECT_ROOT / ".venv-vllm" / "bin" / "python"
TERMINAL = {cpb.JOB_STATE_SUCCEEDED, cpb.JOB_STATE_FAILED, cpb.JOB_STATE_CANCELLED}


@dataclass
class EvalStack:
    registry: RegistryClient
    training: TrainingClient
    inference: InferenceClient
    evaluation: EvaluationClient
    evaluation_addr: str
    app: EvaluationApp


@asynccontextmanager
async def evaluation_stack(
    data_dir: Path, s3: S3Settings, *, vllm: bool = False, inference: dict | None = None,
    databases: Databases | None = None, **evaluation,
) -> AsyncIterator[EvalStack]:
    """The four services; temporary deployments use the transformers engine unless ``vllm``. Databases as in
    ``training_stack``."""
    evaluation.setdefault("deploy_engine", "vllm" if vllm else "transformers")
    async with training_stack(data_dir, s3, databases=databases) as stack:
        registry_addr = stack.app.settings.registry_addr
        inf_settings = InferenceSettings(
            data_dir=data_dir / "inference", s3=s3, grpc=GrpcServerSettings(port=0), registry_addr=registry_addr,
            vllm_python=VLLM_PYTHON if vllm else data_dir / "no-vllm" / "bin" / "python",
            restart_backoff_initial_s=0.5, health_interval_s=0.5, engine_start_timeout_s=420, omp_threads=1,
            database_url=service_url("inference", databases), **(inference or {}),
        )  # fmt: skip
        inf_app = build_inference(inf_settings, metrics=False, default_port=0)
        await inf_app.start()
        inference_addr = f"127.0.0.1:{inf_app.server.port}"
        settings = EvaluationSettings(
            data_dir=data_dir / "evaluation", s3=s3, grpc=GrpcServerSettings(port=0), registry_addr=registry_addr,
            inference_addr=inference_addr, worker_poll_interval_s=0.1, heartbeat_s=0.5, heartbeat_timeout_s=10,
            cancel_grace_s=30, deploy_timeout_s=420, database_url=service_url("evaluation", databases), **evaluation,
        )  # fmt: skip
        app = build_evaluation(settings, metrics=False, default_port=0)
        await app.start()
        # The training service was built before the evaluation service had a port: point its eval_after there.
        preflight = stack.app.jobs.preflight
        preflight.options = dataclasses.replace(preflight.options, evaluation_addr=app.server.address)
        inference = InferenceClient(inference_addr, timeout=120)
        client = EvaluationClient(app.server.address, timeout=120)
        try:
            yield EvalStack(stack.registry, stack.training, inference, client, app.server.address, app)
        finally:
            await client.close()
            await app.stop(grace=1)
            for dep in (await inference.list_deployments(page_size=100)).deployments:
                try:
                    await inference.undeploy(dep.name)
                except Exception:  # noqa: BLE001 - teardown: the service stops its engines anyway
                    pass
            await inference.close()
            await inf_app.stop(grace=1)


def evaluation(target: str, *benchmarks: str | epb.BenchmarkRun, **spec) -> epb.Evaluation:
    """An evaluation of ``target`` (a model version, ``deployments/X`` or an endpoint dict)."""
    runs = [b if isinstance(b, epb.BenchmarkRun) else epb.BenchmarkRun(benchmark=f"benchmarks/{b}") for b in benchmarks]
    s = epb.EvaluationSpec(benchmarks=runs, **spec)
    if isinstance(target, dict):
        s.endpoint.CopyFrom(epb.OpenAIEndpoint(**target))
    elif target.startswith("deployments/"):
        s.deployment = target
    else:
        s.model_version = target
    return epb.Evaluation(spec=s, display_name="test evaluation")


async def wait_evaluation(client: EvaluationClient, name: str, states: set[int] = TERMINAL,
                          timeout: float = 600) -> epb.Evaluation:  # fmt: skip
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        ev = await client.get_evaluation(name)
        if ev.state in states:
            return ev
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{name} still in state {ev.state} after {timeout}s: {ev.progress}")
        await asyncio.sleep(0.3)


async def deployment_gone(inference: InferenceClient, name: str, timeout: float = 60) -> bool:
    """True once GetDeployment says NOT_FOUND (within ``timeout``)."""
    from modelyard.client import NotFound

    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        try:
            d = await inference.get_deployment(name)
        except NotFound:
            return True
        assert d.state in (ipb.DEPLOYMENT_STATE_DELETING, ipb.DEPLOYMENT_STATE_READY, ipb.DEPLOYMENT_STATE_CREATING,
                           ipb.DEPLOYMENT_STATE_FAILED, ipb.DEPLOYMENT_STATE_DEGRADED)  # fmt: skip
        await asyncio.sleep(0.3)
    return False
