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
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from google.rpc import error_details_pb2

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
    async with make_channel(f"127.0.0.1:{port}", retry_attempts=8, retry_backoff_s=0.1) as ch:
        reply = json.loads((await stub(ch, "Echo")(StringValue(value="late"))).value)
    server = await starter
    await server.stop(grace=0)
    assert reply["value"] == "late"


async def test_deadline_is_applied_by_default():
    server = await _start()
    try:
        async with make_channel(server.address, default_timeout_s=0.3) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub(ch, "Slow")(StringValue(value="2"))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        await server.stop(grace=0)


def test_sigterm_drains_an_in_flight_call():
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.echo_service", "1.0"], stdout=subprocess.PIPE,
                            text=True, cwd=os.getcwd())
    try:
        port = int(proc.stdout.readline())
        address = f"127.0.0.1:{port}"

        async def scenario():
            async with make_channel(address, retry_attempts=1) as ch:
                slow = asyncio.ensure_future(stub(ch, "Slow")(StringValue(value="2.5")))
                await asyncio.sleep(0.5)
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                health = health_pb2_grpc.HealthStub(ch)
                during = (await health.Check(health_pb2.HealthCheckRequest(service=""))).status
                await asyncio.sleep(1.2)  # past the drain notice: new calls are refused
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub(ch, "Echo")(StringValue(value="late"))
                return during, (await slow).value, refused.value.code()

        during, slow_result, refused_code = asyncio.run(scenario())
        assert during == health_pb2.HealthCheckResponse.NOT_SERVING
        assert slow_result == "done"
        assert refused_code == grpc.StatusCode.UNAVAILABLE
        out, _ = proc.communicate(timeout=15)
        assert proc.returncode == 0 and "exited-cleanly" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
