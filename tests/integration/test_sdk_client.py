"""modelyard.client over real gRPC: typed errors, deadlines, request ids, retries only where safe.

The server is the real chassis (``GrpcServer`` with its error interceptor) serving a scripted
RegistryService, so each failure the client must handle can be produced on demand.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cli.s3server import free_port
from modelyard.client import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    RegistryClient,
    Unavailable,
)
from modelyard.common.v1 import common_pb2 as cpb
from modelyard.registry.v1 import registry_pb2 as pb
from modelyard.registry.v1 import registry_pb2_grpc
from services.core.context import current_request_id, request_id_var
from services.core.errors import FieldViolation
from services.core.grpc_server import GrpcServer
from services.core.settings import GrpcServerSettings

SERVICE = pb.DESCRIPTOR.services_by_name["RegistryService"].full_name


class ScriptedRegistry(registry_pb2_grpc.RegistryServiceServicer):
    """Answers as scripted by the test and records every call (method, request id)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []
        self.unavailable: dict[str, int] = {}  # method -> failures left before it answers
        self.watched_after: list[int] = []
        self.never = asyncio.Event()  # GetModelVersion waits on it (never set): a call that outlives its deadline

    def _enter(self, method: str) -> None:
        self.calls.append((method, current_request_id()))
        if self.unavailable.get(method, 0) > 0:
            self.unavailable[method] -= 1
            raise Unavailable(f"{method}: restarting")

    def count(self, method: str) -> int:
        return sum(1 for m, _ in self.calls if m == method)

    async def GetModel(self, request, context):
        self._enter("GetModel")
        if request.name == "models/missing":
            raise NotFound("model 'missing' not found", reason="MODEL_NOT_FOUND", metadata={"name": request.name})
        return pb.Model(name=request.name, version_count=2)

    async def CreateModel(self, request, context):
        self._enter("CreateModel")
        if not request.model_id.islower():
            raise InvalidArgument("invalid model", reason="INVALID_MODEL_ID",
                                  violations=[FieldViolation("model_id", "must be lowercase")])
        return pb.Model(name=f"models/{request.model_id}")

    async def ListModels(self, request, context):
        self._enter("ListModels")
        pages = {"": (["a", "b"], "p2"), "p2": (["c"], "")}
        names, token = pages[request.page_token]
        return pb.ListModelsResponse(models=[pb.Model(name=f"models/{n}") for n in names], next_page_token=token)

    async def GetModelVersion(self, request, context):
        self._enter("GetModelVersion")
        await self.never.wait()
        return pb.ModelVersion(name=request.name)

    async def WatchImport(self, request, context):
        self._enter("WatchImport")
        self.watched_after.append(request.after_sequence)
        for seq in range(request.after_sequence + 1, 4):
            yield cpb.JobEvent(sequence=seq, log=cpb.JobLogLine(line=f"line {seq}"))

    async def GetImport(self, request, context):
        self._enter("GetImport")
        running = self.count("GetImport") == 1  # the first look finds it still running
        return pb.ModelImport(name=request.name, state=cpb.JOB_STATE_RUNNING if running else cpb.JOB_STATE_SUCCEEDED)

    async def DownloadFile(self, request, context):
        self._enter("DownloadFile")
        yield pb.DownloadFileResponse(chunk=b"first")
        raise Unavailable("connection to S3 lost")

    async def UploadDataset(self, request_iterator, context):
        self._enter("UploadDataset")
        metadata, size = None, 0
        async for message in request_iterator:
            if message.HasField("metadata"):
                metadata = message.metadata
            else:
                size += len(message.chunk)
        assert metadata is not None
        return pb.DatasetVersion(name=f"{metadata.parent}/versions/v1", filename=metadata.filename, size_bytes=size)


@pytest.fixture
async def registry() -> AsyncIterator[tuple[ScriptedRegistry, str]]:
    servicer = ScriptedRegistry()
    server = GrpcServer(GrpcServerSettings(port=0), service="registry", metrics=False)
    server.add_servicer(registry_pb2_grpc.add_RegistryServiceServicer_to_server, servicer, SERVICE)
    await server.start()
    try:
        yield servicer, server.address
    finally:
        servicer.never.set()
        await server.stop(grace=0)


def _client(address: str, **kwargs) -> RegistryClient:
    return RegistryClient(address, retry_backoff_s=0.01, retry_max_backoff_s=0.02, **kwargs)


async def test_errors_come_back_typed_with_reason_metadata_and_field_violations(registry):
    servicer, address = registry
    async with _client(address) as client:
        with pytest.raises(NotFound) as missing:
            await client.get_model("models/missing")
        assert missing.value.reason == "MODEL_NOT_FOUND"
        assert missing.value.metadata == {"name": "models/missing"}
        with pytest.raises(InvalidArgument) as bad:
            await client.create_model(model_id="Upper")
        assert bad.value.reason == "INVALID_MODEL_ID"
        assert [(v.field, v.description) for v in bad.value.violations] == [("model_id", "must be lowercase")]


async def test_reads_are_retried_through_unavailable_and_writes_are_not(registry):
    servicer, address = registry
    servicer.unavailable = {"GetModel": 2, "CreateModel": 1}
    async with _client(address) as client:
        model = await client.get_model("models/tiny")
        assert model.version_count == 2
        assert servicer.count("GetModel") == 3
        with pytest.raises(Unavailable):
            await client.create_model(model_id="tiny")
        assert servicer.count("CreateModel") == 1  # never sent twice: it may have been done


async def test_watch_is_retried_before_its_first_message_only(registry):
    servicer, address = registry
    servicer.unavailable = {"WatchImport": 1}
    async with _client(address) as client:
        events = [e async for e in client.watch_import("imports/i1")]
        assert [e.sequence for e in events] == [1, 2, 3]
        assert servicer.count("WatchImport") == 2
        chunks = []
        with pytest.raises(Unavailable, match="S3 lost"):
            async for part in client.download_file("models/m/versions/v", path="config.json"):
                chunks.append(part.chunk)
        assert chunks == [b"first"]
        assert servicer.count("DownloadFile") == 1  # it had sent a message: not replayed


async def test_per_call_timeout_overrides_the_client_default(registry):
    servicer, address = registry
    async with _client(address, timeout=60) as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(DeadlineExceeded):
            await client.get_model_version("models/m/versions/v", timeout=0.5)
        assert loop.time() - started < 30  # the call's 0.5 s, not the client's 60 s


async def test_the_request_id_follows_unary_and_streaming_calls(registry):
    servicer, address = registry
    token = request_id_var.set("req-sdk-1")
    try:
        async with _client(address) as client:
            await client.get_model("models/tiny")
            [e async for e in client.watch_import("imports/i1")]
    finally:
        request_id_var.reset(token)
    assert ("GetModel", "req-sdk-1") in servicer.calls
    assert ("WatchImport", "req-sdk-1") in servicer.calls


async def test_iter_follows_page_tokens_and_stops_at_the_limit(registry):
    servicer, address = registry
    async with _client(address) as client:
        assert [m.name async for m in client.iter_models()] == ["models/a", "models/b", "models/c"]
        assert [m.name async for m in client.iter_models(limit=2)] == ["models/a", "models/b"]
    assert servicer.count("ListModels") == 3  # 2 pages, then 1 page for the limited walk


async def test_upload_streams_the_file_in_chunks_and_reports_progress(registry, tmp_path: Path):
    servicer, address = registry
    data = tmp_path / "rows.jsonl"
    data.write_bytes(b'{"messages": []}\n' * 5000)
    sent: list[int] = []
    async with _client(address) as client:
        version = await client.upload_dataset(data, parent="datasets/chat", chunk_bytes=16 * 1024,
                                              on_progress=sent.append)
    assert version.filename == "rows.jsonl"
    assert version.size_bytes == data.stat().st_size == sum(sent)
    assert len(sent) == -(-data.stat().st_size // (16 * 1024))


async def test_an_unreachable_server_reads_as_unavailable():
    async with _client(f"127.0.0.1:{free_port()}", retry_attempts=2, timeout=5) as client:
        with pytest.raises(Unavailable):
            await client.get_model("models/tiny")


async def test_wait_follows_a_job_through_a_watch_that_ends_early(registry):
    """A watch that ends before its job (a server draining) is resumed after the last event seen."""
    servicer, address = registry
    seen: list[int] = []
    async with _client(address) as client:
        done = await client.wait_import("imports/i1", on_event=lambda e: seen.append(e.sequence))
    assert done.state == cpb.JOB_STATE_SUCCEEDED
    assert seen == [1, 2, 3]  # each event once
    assert servicer.watched_after == [0, 3]
