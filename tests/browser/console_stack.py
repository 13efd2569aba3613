"""The stack the console's browser tests look at: the gateway (uvicorn on a free loopback port) in front of the
real services in this process (registry, training, inference, evaluation from tests/support/evaluation_stack.py;
nanio S3; SQLite; the tiny random model on the transformers engine).

The stack is built once per test module. Its scenario runs in the background while the tests run, and each test
waits for the milestone it needs (``stack.wait("deployment")``): the tiny model imported, a dataset uploaded,
a short LoRA job that registers an adapter (the lineage), a long one that keeps running (the live chart), a
READY deployment (the playground) and two small evaluations of it (the comparison). The pipeline service runs
in this process too (its runs call the services above); the quantization service is not started: the console
must say it is down.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from cli.demo_models import build_tiny_model
from gateway.app import create_app
from gateway.settings import GatewaySettings
from modelyard.client import PipelineClient
from modelyard.common.v1 import common_pb2 as cpb
from modelyard.inference.v1 import inference_pb2 as ipb
from services.core.settings import GrpcServerSettings, S3Settings
from services.pipeline.app import build_app as build_pipeline
from services.pipeline.settings import PipelineSettings
from tests.support.evaluation_stack import EvalStack, evaluation, evaluation_stack, wait_evaluation
from tests.support.fake_inference import BackgroundLoop, GatewayServer
from tests.support.training_stack import import_model, lora_job, upload_dataset, wait_state

CHROMIUM = Path("/usr/bin/chromium")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = PROJECT_ROOT / "test-artifacts" / "console"
DATA = PROJECT_ROOT / "tests" / "data"
ADMIN_TOKEN = "admin-console-browser-test"
BBH_MC = "bbh_mc:boolean_expressions"

MILESTONES = ("base", "dataset", "long_job_created", "deployment", "adapter", "evaluations")


def closed_port() -> int:
    """A loopback port nothing listens on (a service that is down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ConsoleStack:
    bg: BackgroundLoop
    url: str
    services: EvalStack
    pipeline: PipelineClient
    api_key: dict
    down: dict[str, str]  # service -> the address the gateway has for it, where nothing answers
    milestones: dict[str, concurrent.futures.Future] = field(default_factory=dict)

    def milestone(self, name: str) -> concurrent.futures.Future:
        return self.milestones.setdefault(name, concurrent.futures.Future())

    def wait(self, name: str, timeout: float = 180) -> Any:
        """The value of milestone ``name`` of the scenario once reached (its error if the scenario failed)."""
        return self.milestone(name).result(timeout)

    def run(self, coro, timeout: float = 60) -> Any:
        """Run a coroutine in the services' loop (the SDK clients live there)."""
        return self.bg.run(coro, timeout)


async def scenario(stack: ConsoleStack, model_dir: Path) -> None:
    """What the tests look at, in the order they need it; each milestone is set as soon as it is reached."""
    s = stack.services
    reached = stack.milestone
    try:
        base = await import_model(s.registry, model_dir, parent="models/tiny", version_id="base")
        reached("base").set_result(base)
        dataset = await upload_dataset(s.registry, "datasets/shout", DATA / "training" / "shout_train.jsonl")
        reached("dataset").set_result(dataset)
        short = await s.training.create_training_job(
            lora_job(base, [dataset], display_name="shout adapter", output_model="models/tiny-shout",
                     hyperparameters={"max_steps": 12}),
            training_job_id="shout-lora")  # fmt: skip
        # Queued behind the short one (one worker slot); runs until the chart test cancels it.
        long = await s.training.create_training_job(
            lora_job(base, [dataset], display_name="long run", output_model="models/tiny-long",
                     hyperparameters={"max_steps": 100_000}, log_every_steps=1),
            training_job_id="long-lora")  # fmt: skip
        reached("long_job_created").set_result(long.name)
        await s.inference.deploy(
            ipb.Deployment(model_version=base, engine=ipb.ENGINE_TRANSFORMERS), deployment_id="tiny"
        )
        dep = await wait_state_deployment(s, "deployments/tiny")
        reached("deployment").set_result(dep.name)
        names = []
        for ev_id, shots in (("bbh-3shot", 3), ("bbh-0shot", 0)):
            ev = evaluation(dep.name, BBH_MC, limit=4, num_fewshot=shots)
            ev.display_name = f"{BBH_MC}, {shots}-shot"
            names.append((await s.evaluation.create_evaluation(ev, evaluation_id=ev_id)).name)
        done_short = await wait_state(s.training, short.name, {cpb.JOB_STATE_SUCCEEDED, cpb.JOB_STATE_FAILED}, 300)
        assert done_short.state == cpb.JOB_STATE_SUCCEEDED, done_short.error.message
        reached("adapter").set_result((short.name, done_short.outputs.model_version))
        for name in names:
            ev = await wait_evaluation(s.evaluation, name, timeout=300)
            assert ev.state == cpb.JOB_STATE_SUCCEEDED, ev.error.message
        reached("evaluations").set_result(names)
    except BaseException as exc:  # every test waiting on a milestone not reached yet sees why
        for name in MILESTONES:
            if not stack.milestone(name).done():
                stack.milestone(name).set_exception(exc)
        raise


async def wait_state_deployment(s: EvalStack, name: str, timeout: float = 300) -> ipb.Deployment:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        dep = await s.inference.get_deployment(name)
        if dep.state == ipb.DEPLOYMENT_STATE_READY:
            return dep
        assert dep.state != ipb.DEPLOYMENT_STATE_FAILED, dep.error.message
        assert asyncio.get_running_loop().time() < deadline, f"{name} still {ipb.DeploymentState.Name(dep.state)}"
        await asyncio.sleep(0.2)


async def _client(cls: type, address: str) -> Any:
    return cls(address, timeout=120)


@contextmanager
def console_stack(work: Path, s3: S3Settings) -> Iterator[ConsoleStack]:
    """The services, the gateway with the console, an API key; the scenario started in the background."""
    model_dir = build_tiny_model(work / "tiny")
    bg = BackgroundLoop()
    services_cm = evaluation_stack(work / "services", s3)
    gateway = None
    scenario_task = None
    try:
        services = bg.run(services_cm.__aenter__(), timeout=120)
        pipeline_app = None
        pipeline = None
        try:
            down = {"quantization": f"127.0.0.1:{closed_port()}"}
            pipeline_settings = PipelineSettings(
                data_dir=work / "pipeline", s3=s3, grpc=GrpcServerSettings(port=0),
                registry_addr=services.registry.target, training_addr=services.training.target,
                quantization_addr=down["quantization"], evaluation_addr=services.evaluation_addr,
                inference_addr=services.inference.target, worker_poll_interval_s=0.1, heartbeat_s=0.5,
                heartbeat_timeout_s=10, cancel_grace_s=20,
            )  # fmt: skip
            pipeline_app = build_pipeline(pipeline_settings, metrics=False, default_port=0)
            bg.run(pipeline_app.start(), timeout=60)
            pipeline = bg.run(_client(PipelineClient, pipeline_app.server.address))  # on the loop it is used on
            settings = GatewaySettings(
                data_dir=work / "gateway", admin_token=ADMIN_TOKEN, log_json=False,
                inference_addr=services.inference.target, registry_addr=services.registry.target,
                training_addr=services.training.target, evaluation_addr=services.evaluation_addr,
                quantization_addr=down["quantization"], pipeline_addr=pipeline_app.server.address,
                routing={"refresh_interval_s": 0.5}, quota={"usage_flush_s": 0.2}, auth={"cache_ttl_s": 0.5},
                console={"rpc_timeout_s": 10},
            )  # fmt: skip
            gateway = GatewayServer(bg, create_app(settings))
            gateway.wait_started()
            created = httpx.post(f"{gateway.url}/admin/keys", json={"name": "console-test"},
                                 headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)  # fmt: skip
            assert created.status_code == 201, created.text
            console = ConsoleStack(bg, gateway.url, services, pipeline, created.json(), down)
            scenario_task = asyncio.run_coroutine_threadsafe(scenario(console, model_dir), bg.loop)
            yield console
        finally:
            if scenario_task is not None and not scenario_task.done():
                scenario_task.cancel()
                concurrent.futures.wait([scenario_task], timeout=30)
            if gateway is not None:
                gateway.stop()
            if pipeline is not None:
                bg.run(pipeline.close(), timeout=30)
            if pipeline_app is not None:
                bg.run(pipeline_app.stop(grace=1), timeout=60)  # a run still going is stopped with its worker
            bg.run(services_cm.__aexit__(None, None, None), timeout=120)  # stops running jobs and engines too
    finally:
        bg.close()
