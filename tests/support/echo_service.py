"""A small gRPC service for testing the chassis, built from generic handlers over
google.protobuf.StringValue so it needs no generated code."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.wrappers_pb2 import StringValue
from pydantic_settings import SettingsConfigDict

from services.core.context import current_request_id
from services.core.entrypoint import run_service
from services.core.errors import InvalidArgument, NotFound
from services.core.grpc_client import make_channel
from services.core.grpc_server import GrpcServer
from services.core.settings import ServiceSettings

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

    async def LogStdlib(self, request: StringValue, context) -> StringValue:
        """Logs through the standard library, as a third-party library (grpc, uvicorn...) does."""
        logging.getLogger("thirdparty.lib").warning("library says %s", request.value, extra={"detail": 7})
        return StringValue(value="logged")

    async def Crash(self, request: StringValue, context) -> StringValue:
        secret = {"db_password": "hunter2"}
        return StringValue(value=str(1 / 0) + str(secret))

    async def Slow(self, request: StringValue, context) -> StringValue:
        await asyncio.sleep(float(request.value))
        return StringValue(value="done")

    async def Gate(self, request: StringValue, context) -> StringValue:
        """A call held in flight by the test: creates ``<dir>/entered``, returns once ``<dir>/release`` exists."""
        gate = Path(request.value)
        (gate / "entered").touch()
        while not (gate / "release").exists():
            await asyncio.sleep(0.01)
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

    unary_names = ("Echo", "Fail", "Crash", "Slow", "Gate", "Relay", "LogStdlib")
    handlers = {name: unary(getattr(servicer, name)) for name in unary_names}
    for name in ("Count", "Ticks"):
        handlers[name] = grpc.unary_stream_rpc_method_handler(
            getattr(servicer, name), StringValue.FromString, StringValue.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def stub(channel: grpc.aio.Channel, method: str, stream: bool = False):
    factory = channel.unary_stream if stream else channel.unary_unary
    return factory(f"/{SERVICE}/{method}", request_serializer=StringValue.SerializeToString,
                   response_deserializer=StringValue.FromString)


class EchoSettings(ServiceSettings):
    """Settings of the echo process (env prefix ``YARD_ECHO_``), as a real service has."""

    model_config = SettingsConfigDict(env_prefix="YARD_ECHO_", env_nested_delimiter="__", extra="ignore")


@dataclass
class EchoApp:
    server: GrpcServer

    async def start(self) -> None:
        await self.server.start()
        print(self.server.port, flush=True)  # the test reads the port from the first line of stdout


def build_app(settings: EchoSettings) -> EchoApp:
    server = GrpcServer(settings.grpc, service="echo", metrics=False, auth=settings.auth, tls=settings.tls)
    server.add_servicer(add_to_server, EchoServicer(), SERVICE)
    return EchoApp(server)


if __name__ == "__main__":  # python -m tests.support.echo_service: a real service process (SIGTERM, logging tests)
    run_service(build_app, EchoSettings)
    print("exited-cleanly", flush=True)
