"""The gRPC chassis through real servers on loopback: error mapping, request ids across hops,
health, reflection, metrics, message limits, retries and the SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import grpc
import httpx
import pytest
from google.protobuf.wrappers_pb2 import StringValue
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from cli.s3server import free_port
from services.core.errors import InvalidArgument, NotFound, Unavailable
from services.core.grpc_client import error_from_rpc_error, make_channel
from services.core.grpc_server import GrpcServer
from services.core.settings import GrpcServerSettings
from tests.support.echo_service import SERVICE, EchoServicer, add_to_server, stub


async def _start(next_hop=None, **settings) -> GrpcServer:
    server = GrpcServer(GrpcServerSettings(port=settings.pop("port", 0), **settings), service="echo")
    server.add_servicer(add_to_server, EchoServicer(next_hop), SERVICE)
    await server.start()
    return server


@pytest.fixture
async def echo_server():
    server = await _start()
    yield server
    await server.stop(grace=0)


async def test_domain_not_found_reaches_client_with_error_info(echo_server):
    async with make_channel(echo_server.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub(ch, "Fail")(StringValue(value="llama-9"))
    exc = info.value
    assert exc.code() == grpc.StatusCode.NOT_FOUND
    assert "llama-9" in exc.details()
    status = rpc_status.from_call(exc)
    error_info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(error_info)
    assert error_info.reason == "MODEL_NOT_FOUND"
    assert error_info.domain == "modelyard.echo"
    assert error_info.metadata["name"] == "llama-9"
    typed = error_from_rpc_error(exc)
    assert isinstance(typed, NotFound) and typed.reason == "MODEL_NOT_FOUND"


async def test_invalid_argument_carries_field_violation(echo_server):
    async with make_channel(echo_server.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub(ch, "Fail")(StringValue(value="invalid"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    typed = error_from_rpc_error(info.value)
    assert isinstance(typed, InvalidArgument)
    assert [(v.field, v.description) for v in typed.violations] == [("page_size", "must be >= 0, got -1")]


async def test_unexpected_exception_is_internal_without_leaking(echo_server):
    async with make_channel(echo_server.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub(ch, "Crash")(StringValue(value="x"), metadata=(("x-request-id", "rid-crash"),))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "hunter2" not in info.value.details() and "ZeroDivision" not in info.value.details()
    assert "rid-crash" in info.value.details()


async def test_error_mid_stream_arrives_after_the_items(echo_server):
    async with make_channel(echo_server.address) as ch:
        got = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for item in stub(ch, "Count", stream=True)(StringValue(value="3")):
                got.append(item.value)
    assert got == ["0", "1", "2"]
    assert error_from_rpc_error(info.value).reason == "STREAM_ENDED_BADLY"


async def test_client_cancelling_a_yielding_stream_leaves_the_server_healthy(echo_server):
    import gc

    async with make_channel(echo_server.address) as ch:
        for size in ("", "big", "", "big"):
            call = stub(ch, "Ticks", stream=True)(StringValue(value=size))
            seen = 0
            async for _item in call:
                seen += 1
                if seen == 3:
                    break
            await asyncio.sleep(0.3)  # the server fills the flow-control window and waits
            call.cancel()
        await asyncio.sleep(0.2)
        gc.collect()  # finalises the abandoned server-side generators
        await asyncio.sleep(0.2)
        reply = json.loads((await stub(ch, "Echo")(StringValue(value="still here"))).value)
    assert reply["value"] == "still here"


async def test_request_id_propagates_across_two_hops():
    back = await _start()
    front = await _start(next_hop=back.address)
    try:
        async with make_channel(front.address) as ch:
            call = stub(ch, "Relay")(StringValue(value="hi"), metadata=(("x-request-id", "req-abc-123"),))
            reply = json.loads((await call).value)
            initial = dict(await call.initial_metadata())
        assert reply == {"here": "req-abc-123", "next": "req-abc-123"}
        assert initial["x-request-id"] == "req-abc-123"
        # without an id from the caller, the client helper makes one and both hops share it
        async with make_channel(front.address) as ch:
            reply = json.loads((await stub(ch, "Relay")(StringValue(value="hi"))).value)
        assert reply["here"] and reply["here"] == reply["next"]
    finally:
        await front.stop(grace=0)
        await back.stop(grace=0)


async def test_health_reflection_and_metrics(echo_server):
    async with make_channel(echo_server.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        assert (await health.Check(health_pb2.HealthCheckRequest(service=""))).status == health_pb2.HealthCheckResponse.SERVING
        assert (await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))).status == health_pb2.HealthCheckResponse.SERVING
        await stub(ch, "Echo")(StringValue(value="m"))
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    def list_services() -> set[str]:  # the sync client runs in a thread: the server shares this event loop
        with grpc.insecure_channel(echo_server.address) as sync_ch:
            return set(ProtoReflectionDescriptorDatabase(sync_ch).get_services())

    services = await asyncio.to_thread(list_services)
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    text = httpx.get(f"http://127.0.0.1:{echo_server.metrics_port}/metrics").text
    assert 'grpc_server_handled_total{code="OK",method="Echo",service="modelyard.testing.v1.EchoService"}' in text


async def test_oversized_message_is_resource_exhausted():
    server = await _start(max_message_bytes=4096)
    try:
        async with make_channel(server.address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub(ch, "Echo")(StringValue(value="x" * 10_000))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await server.stop(grace=0)


async def test_port_in_use_is_a_clear_error(echo_server):
    with pytest.raises(Unavailable) as info:
        await _start(port=echo_server.port)
    assert info.value.reason == "PORT_IN_USE" and str(echo_server.port) in info.value.message


async def test_client_retries_unavailable_until_the_server_is_up():
    port = free_port()

    async def late_start():
        await asyncio.sleep(0.6)
        return await _start(port=port)

    starter = asyncio.create_task(late_start())
    # the retries span ~35 s (backoff up to 2 s): far more than a late start on a loaded machine needs
    async with make_channel(f"127.0.0.1:{port}", retry_attempts=20, retry_backoff_s=0.1) as ch:
        reply = json.loads((await stub(ch, "Echo")(StringValue(value="late"))).value)
    server = await starter
    await server.stop(grace=0)
    assert reply["value"] == "late"


async def test_deadline_is_applied_by_default():
    server = await _start()
    try:
        async with make_channel(server.address, default_timeout_s=0.3) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub(ch, "Slow")(StringValue(value="60"))  # the deadline, not the call, ends it
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        await server.stop(grace=0)


def _wait_for(predicate, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


def _echo_process(tmp_path, **env: str) -> subprocess.Popen:
    """``python -m tests.support.echo_service`` (run_service with its own settings class)."""
    full_env = {**os.environ, "YARD_ECHO_DATA_DIR": str(tmp_path / "data"), **env}
    return subprocess.Popen([sys.executable, "-m", "tests.support.echo_service"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=os.getcwd(), env=full_env)


def test_sigterm_drains_an_in_flight_call(tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    # Health is NOT_SERVING for the drain notice before new calls are refused; the in-flight call
    # has the grace period. Both are far longer than this test needs: no step races a clock.
    proc = _echo_process(tmp_path, YARD_ECHO_GRPC__DRAIN_NOTICE_S="3", YARD_ECHO_GRPC__GRACE_PERIOD_S="60")
    try:
        port = int(proc.stdout.readline())
        address = f"127.0.0.1:{port}"

        async def scenario():
            async with make_channel(address, retry_attempts=1) as ch:
                held = asyncio.ensure_future(stub(ch, "Gate")(StringValue(value=str(gate))))
                await asyncio.to_thread(_wait_for, (gate / "entered").exists, what="the call to be in flight")
                proc.send_signal(signal.SIGTERM)
                health = health_pb2_grpc.HealthStub(ch)
                deadline = time.monotonic() + 30
                during = None
                while during != health_pb2.HealthCheckResponse.NOT_SERVING and time.monotonic() < deadline:
                    during = (await health.Check(health_pb2.HealthCheckRequest(service=""))).status
                    await asyncio.sleep(0.02)
                refused = None
                while refused is None and time.monotonic() < deadline:  # past the drain notice: refused
                    try:
                        await stub(ch, "Echo")(StringValue(value="late"))
                        await asyncio.sleep(0.05)
                    except grpc.aio.AioRpcError as exc:
                        refused = exc.code()
                assert not held.done()  # still held by the gate through the whole drain
                (gate / "release").touch()
                return during, (await held).value, refused

        during, held_result, refused_code = asyncio.run(scenario())
        assert during == health_pb2.HealthCheckResponse.NOT_SERVING
        assert held_result == "done"
        assert refused_code == grpc.StatusCode.UNAVAILABLE
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "exited-cleanly" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_service_process_logs_library_records_as_json(tmp_path):
    proc = _echo_process(tmp_path, YARD_ECHO_GRPC__GRACE_PERIOD_S="5")
    try:
        port = int(proc.stdout.readline())

        async def call() -> str:
            async with make_channel(f"127.0.0.1:{port}") as ch:
                return (await stub(ch, "LogStdlib")(StringValue(value="hi"), metadata=(("x-request-id", "rid-7"),))).value

        assert asyncio.run(call()) == "logged"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "exited-cleanly" in out
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]  # every line is JSON
    library = [line for line in lines if line.get("logger") == "thirdparty.lib"]
    assert len(library) == 1, err
    record = library[0]
    assert record["event"] == "library says hi" and record["level"] == "warning" and record["detail"] == 7
    assert record["service"] == "echo" and record["request_id"] == "rid-7" and record["timestamp"]
    assert any(line.get("event") == "server_started" for line in lines)


def test_service_with_invalid_settings_exits_with_a_clear_error(tmp_path):
    proc = _echo_process(tmp_path, YARD_ECHO_EVENT_LOOP="tornado")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and out == ""
    assert "invalid echo settings" in err and "event_loop" in err
