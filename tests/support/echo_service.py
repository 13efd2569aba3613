"""A small gRPC service for testing the chassis, built from generic handlers over
google.protobuf.StringValue so it needs no generated code."""

from __future__ import annotations

import asyncio
import json
import sys

import grpc
from google.protobuf.wrappers_pb2 import StringValue

from services.core.context import current_request_id
from services.core.errors import InvalidArgument, NotFound
from services.core.grpc_client import make_channel

SERVICE = "modelyard.testing.v1.EchoService"


class EchoServicer:
    def __init__(self, next_hop: str | None = None) -> None:
        self.next_hop = next_hop

    async def Echo(self, request: StringValue, context) -> StringValue:
        return StringValue(value=json.dumps({"value": request.value, "request_id": current_request_id()}))

    async def Fail(self, request: StringValue, context) -> StringValue:
        if request.value == "invalid":
            raise InvalidArgument.for_field("page_size", "must be >= 0, got -1")
        raise NotFound(f"model {request.value!r} not found", reason="MODEL_NOT_FOUND", metadata={"name": request.value})

    async def Crash(self, request: StringValue, context) -> StringValue:
        secret = {"db_password": "hunter2"}
        return StringValue(value=str(1 / 0) + str(secret))

    async def Slow(self, request: StringValue, context) -> StringValue:
        await asyncio.sleep(float(request.value))
        return StringValue(value="done")

    async def Relay(self, request: StringValue, context) -> StringValue:
        async with make_channel(self.next_hop) as channel:
            echo = channel.unary_unary(f"/{SERVICE}/Echo", request_serializer=StringValue.SerializeToString,
                                       response_deserializer=StringValue.FromString)
            inner = json.loads((await echo(request)).value)
        return StringValue(value=json.dumps({"here": current_request_id(), "next": inner["request_id"]}))

    async def Count(self, request: StringValue, context):
        n = int(request.value)
        for i in range(n):
            yield StringValue(value=str(i))
        raise NotFound("ran out", reason="STREAM_ENDED_BADLY")


    async def Ticks(self, request: StringValue, context):
        """Yields forever (until the client cancels)."""
        i = 0
        pad = "x" * 65536 if request.value == "big" else ""
        while True:
            yield StringValue(value=f"{i}{pad}")  # big: blocks in flow control, paused at this yield
            i += 1
            if not pad:
                await asyncio.sleep(0.01)


def add_to_server(servicer: EchoServicer, server) -> None:
    def unary(fn):
        return grpc.unary_unary_rpc_method_handler(fn, StringValue.FromString, StringValue.SerializeToString)

    handlers = {name: unary(getattr(servicer, name)) for name in ("Echo", "Fail", "Crash", "Slow", "Relay")}
    for name in ("Count", "Ticks"):
        handlers[name] = grpc.unary_stream_rpc_method_handler(
            getattr(servicer, name), StringValue.FromString, StringValue.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def stub(channel: grpc.aio.Channel, method: str, stream: bool = False):
    factory = channel.unary_stream if stream else channel.unary_unary
    return factory(f"/{SERVICE}/{method}", request_serializer=StringValue.SerializeToString,
                   response_deserializer=StringValue.FromString)


async def _main() -> None:  # python -m tests.support.echo_service: a real server process for SIGTERM tests
    from services.core.grpc_server import GrpcServer
    from services.core.logging import configure_logging
    from services.core.settings import GrpcServerSettings

    configure_logging(level="INFO", json=True, service="echo")
    settings = GrpcServerSettings(port=0, grace_period_s=10, drain_notice_s=float(sys.argv[1]))
    server = GrpcServer(settings, service="echo", metrics=False)
    server.add_servicer(add_to_server, EchoServicer(), SERVICE)
    await server.start()
    print(server.port, flush=True)
    await server.wait_for_termination()
    print("exited-cleanly", flush=True)


if __name__ == "__main__":
    asyncio.run(_main())
