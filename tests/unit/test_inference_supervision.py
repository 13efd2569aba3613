"""The inference service's background work with scripted engines: a supervisor whose watch fails
restarts the engine (logged and counted, never left unsupervised), a cancelled caller is never
swallowed (stopping a deployment, closing a paced stream), and the gRPC health follows the
deployments (the service's name SERVING only while every deployment is READY)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core.db import Database
from services.core.grpc_server import GrpcServer
from services.core.settings import GrpcServerSettings
from services.inference.app import SERVICE_NAME, HealthPublisher
from services.inference.deployments import DeploymentRecord, Deployments, State
from services.inference.metrics import ENGINE_RESTARTS, TASK_ERRORS
from services.inference.settings import InferenceSettings
from services.inference.streaming import paced
from services.inference.tables import COMPONENT, MIGRATIONS


class ScriptedEngine:
    """An engine that starts at once and answers; ``health_error`` makes its health check raise."""

    def __init__(self, number: int, health_error: Exception | None = None) -> None:
        self.endpoint = f"http://127.0.0.1:{9000 + number}"
        self.pid = 100 + number
        self.health_error = health_error
        self.stopped = False
        self._exit = asyncio.Event()

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        self.stopped = True
        self._exit.set()

    async def wait_exit(self) -> int:
        await self._exit.wait()
        return 0

    def exit_summary(self) -> str:
        return ""

    async def health(self) -> bool:
        if self.health_error is not None:
            raise self.health_error
        return True

    async def complete(self, body: dict[str, Any], *, interval_s: float = 0.0):
        yield [{"choices": [{"text": "x", "index": 0}]}]


class DirCache:
    def ensure(self, prefix: str, manifest: Any) -> Path:
        return Path("/nonexistent")


def deployments(tmp_path: Path, factory) -> Deployments:
    db = Database(f"sqlite:///{tmp_path / 'inference.db'}")
    db.migrate(COMPONENT, MIGRATIONS)
    settings = InferenceSettings(data_dir=tmp_path, restart_backoff_initial_s=0.01, health_interval_s=0.01,
                                 engine_start_timeout_s=5)
    return Deployments(db, source=None, cache=DirCache(), settings=settings, engine_factory=factory)  # type: ignore[arg-type]


async def wait_state(deps: Deployments, name: str, state: State, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while (await deps.get(name)).state != state:
            await asyncio.sleep(0.01)


async def test_a_failing_watch_restarts_the_engine_and_is_counted(tmp_path):
    engines: list[ScriptedEngine] = []

    class WatchFails(ScriptedEngine):
        checks = 0

        async def health(self) -> bool:  # answers while starting, then raises (a bug in the watch)
            self.checks += 1
            if self.checks > 1:
                raise RuntimeError("boom")
            return True

    def factory(kind, spec):
        engines.append(WatchFails(0) if not engines else ScriptedEngine(len(engines)))
        return engines[-1]

    deps = deployments(tmp_path, factory)
    errors = TASK_ERRORS.labels("supervisor", "RuntimeError")
    before, restarts = errors._value.get(), ENGINE_RESTARTS.labels("d1", "SUPERVISOR_ERROR")._value.get()
    deps._launch(DeploymentRecord(name="deployments/d1", model_version="models/m/versions/1", engine="transformers"))
    async with asyncio.timeout(5):
        while len(engines) < 2 or (await deps.get("deployments/d1")).state != State.READY:
            await asyncio.sleep(0.01)
    assert engines[0].stopped  # the engine whose watch failed was stopped, a new one serves
    assert deps.engine_pids("deployments/d1") == [engines[1].pid]
    assert errors._value.get() == before + 1
    assert ENGINE_RESTARTS.labels("d1", "SUPERVISOR_ERROR")._value.get() == restarts + 1
    await deps.close()
    assert engines[1].stopped


async def test_stopping_a_deployment_passes_on_the_callers_cancellation(tmp_path):
    deps = deployments(tmp_path, lambda kind, spec: ScriptedEngine(0))
    runner = deps._launch(DeploymentRecord(name="deployments/d2", model_version="models/m/versions/1",
                                           engine="transformers"))
    await wait_state(deps, "deployments/d2", State.READY)
    slow_stop = asyncio.Event()
    engine = runner.engine
    assert engine is not None
    original_stop = engine.stop

    async def stop() -> None:
        await slow_stop.wait()
        await original_stop()

    engine.stop = stop  # type: ignore[method-assign]
    closer = asyncio.create_task(deps.close())
    await asyncio.sleep(0.05)
    closer.cancel()  # the caller goes away while the engine is still stopping
    with pytest.raises(asyncio.CancelledError):
        await closer
    slow_stop.set()
    await asyncio.wait({runner.task})  # the supervisor still finishes its own stop


async def test_a_cancellation_while_a_paced_stream_closes_is_not_swallowed():
    """The caller is done with the stream (it closes it) and is cancelled while the engine stream
    is still closing: the cancellation reaches the caller, and the engine stream is closed."""
    closed = asyncio.Event()
    release = asyncio.Event()
    finished = asyncio.Event()

    async def engine_stream():
        try:
            yield [{"n": 1}]
            await asyncio.sleep(3600)
            yield [{"n": 2}]
        finally:
            try:
                await release.wait()  # the engine stream takes a while to close
            finally:
                closed.set()

    async def consume() -> None:
        async with contextlib.aclosing(paced(engine_stream(), lambda: 0.0)) as batches:
            async for _ in batches:
                break  # done: closing the paced stream starts
        finished.set()

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    task.cancel()  # cancelled while the reader is being reaped
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled() and not finished.is_set() and closed.is_set()


async def test_health_follows_the_deployments(tmp_path):
    started = asyncio.Event()
    gate = asyncio.Event()

    class SlowEngine(ScriptedEngine):
        async def health(self) -> bool:
            started.set()
            await gate.wait()
            return True

    deps = deployments(tmp_path, lambda kind, spec: SlowEngine(0))
    server = GrpcServer(GrpcServerSettings(port=0, grace_period_s=0), service="inference", metrics=False)
    await server.start()
    publisher = HealthPublisher(server, deps)
    publisher.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            async def status(name: str) -> int:
                return (await stub.Check(health_pb2.HealthCheckRequest(service=name))).status

            async def becomes(name: str, want: int) -> None:
                async with asyncio.timeout(5):
                    while await status(name) != want:
                        await asyncio.sleep(0.01)

            serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
            await becomes(SERVICE_NAME, serving)  # no deployment: ready
            deps._launch(DeploymentRecord(name="deployments/d3", model_version="models/m/versions/1",
                                          engine="transformers"))
            await started.wait()
            await becomes(SERVICE_NAME, not_serving)  # CREATING
            await becomes("deployments/d3", not_serving)
            assert await status("") == serving  # the process itself is live
            gate.set()
            await becomes(SERVICE_NAME, serving)
            await becomes("deployments/d3", serving)
            await deps.close()
            await becomes("deployments/d3", not_serving)  # gone
    finally:
        await publisher.stop()
        await server.stop(0)


async def test_a_request_whose_prefill_fails_gets_an_error_not_silence(tmp_path):
    """A prefill that raises (here a token id outside the vocabulary, which the HTTP layer refuses
    first) fails the requests being admitted with an error event; before, they waited forever."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cli.demo_models import build_tiny_model
    from services.inference.engines.scheduler import GenRequest, Sampling, Scheduler

    folder = build_tiny_model(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    scheduler = Scheduler(model, tok, max_num_seqs=4, eos_ids={tok.eos_token_id})
    scheduler.start()
    try:
        loop = asyncio.get_running_loop()
        bad = GenRequest([1, 10**6], Sampling(max_tokens=4, temperature=0.0), loop=loop)
        scheduler.submit(bad)
        event = await asyncio.wait_for(bad.events.get(), 10)
        assert event.kind == "error" and "engine step failed" in event.message
        good = GenRequest(tok("Hello")["input_ids"], Sampling(max_tokens=2, temperature=0.0), loop=loop)
        scheduler.submit(good)  # the engine goes on serving
        kinds = []
        while "done" not in kinds:
            kinds.append((await asyncio.wait_for(good.events.get(), 10)).kind)
        assert "error" not in kinds
    finally:
        scheduler.stop()
