"""The registry service through real gRPC on loopback: a server started in-process on port 0,
a real nanio S3 server, real SQLite, real tiny models; called through the SDK's ``RegistryClient``,
errors checked by their typed class and ErrorInfo reason (one test reads the raw wire). The tests marked
``db_backend`` run on a real PostgreSQL database too."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import shutil
import threading
from collections.abc import Awaitable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2
from safetensors import safe_open
from safetensors.numpy import save_file

from cli.demo_models import build_tiny_model, smollm2_gguf_path
from modelyard.client import (
    AlreadyExists,
    DataLoss,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RegistryClient,
)
from modelyard.common.v1 import common_pb2 as cpb
from modelyard.registry.v1 import registry_pb2 as pb
from modelyard.registry.v1 import registry_pb2_grpc
from services.core.artifacts import S3ArtifactStore, file_key
from services.core.settings import GrpcServerSettings
from services.core.status import STATUS_DETAILS_KEY
from services.registry.app import build_app
from services.registry.settings import RegistrySettings
from tests.support import databases

TERMINAL = (cpb.JOB_STATE_SUCCEEDED, cpb.JOB_STATE_FAILED, cpb.JOB_STATE_CANCELLED)

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def store(s3_settings) -> S3ArtifactStore:
    return S3ArtifactStore.connect(s3_settings)


@pytest.fixture
async def registry(request, tmp_path, s3_settings, store):
    """A running registry and an SDK client connected to it (``.app`` is the server). Its database: SQLite, or
    the backend of a test that asks for ``db_backend`` (both) or ``postgres_backend``."""
    settings = RegistrySettings(
        data_dir=tmp_path / "data", s3=s3_settings, grpc=GrpcServerSettings(port=0), import_workers=1,
        worker_poll_interval_s=0.1, hf_endpoint="http://127.0.0.1:9", hf_token=None,
        database_url=databases.service_url("registry", databases.of_request(request)),
    )
    app = build_app(settings, metrics=False, default_port=0)
    await app.start()
    client = RegistryClient(f"127.0.0.1:{app.server.port}", timeout=120)
    client.app = app  # type: ignore[attr-defined]
    yield client
    await client.close()
    await app.stop(grace=1)


async def expect(call: Awaitable[object], error: type[DomainError], reason: str) -> DomainError:
    """Await ``call`` expecting it to raise ``error`` with ErrorInfo ``reason``; the error."""
    with pytest.raises(error) as info:
        await call
    assert info.value.reason == reason, info.value.message
    return info.value


async def first_chunk(stream) -> object:
    """The first message of a stream (a failed stream raises at its first read)."""
    async for message in stream:
        return message
    raise AssertionError("the stream ended without a message")


async def wait_import(registry: RegistryClient, name: str) -> pb.ModelImport:
    """Follow WatchImport to its end (a terminal state change), then the import as it is."""
    states = []
    async for event in registry.watch_import(name, timeout=600):
        if event.HasField("state_change"):
            states.append(event.state_change.state)
    assert states and states[-1] in TERMINAL, states
    done = await registry.get_import(name)
    assert done.state == states[-1]
    return done


async def import_model(registry: RegistryClient, parent: str, source: str, **kw) -> pb.ModelImport:
    started = await registry.import_model(parent=parent, source_uri=source, **kw)
    assert started.state == cpb.JOB_STATE_QUEUED and started.stage == "queued"
    return await wait_import(registry, started.name)


def safetensors_param_count(folder: Path) -> int:
    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "np") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 - safe_open is not a dict
    return total


def make_adapter(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "tiny", "r": 2}))
    save_file({"base_model.model.lora_A.weight": np.zeros((2, 64), np.float32),
               "base_model.model.lora_B.weight": np.zeros((64, 2), np.float32)}, str(folder / "adapter_model.safetensors"))
    return folder


async def create_base(registry: RegistryClient, store, tiny_model: Path, parent="models/tiny",
                      version_id="base") -> pb.ModelVersion:
    store.upload_dir(f"uploads/{parent}/{version_id}", tiny_model)
    return await registry.create_model_version(
        parent=parent, version_id=version_id,
        model_version=pb.ModelVersion(artifact_prefix=f"uploads/{parent}/{version_id}", description="tiny base"))


# ----------------------------------------------------------------------------- models and versions


@pytest.mark.usefixtures("db_backend")
async def test_import_tiny_model_from_local_folder_inspects_and_serves_files(registry, tiny_model, tmp_path):
    done = await import_model(registry, "models/tiny", str(tiny_model), version_id="v1", labels={"team": "a"})
    assert done.state == cpb.JOB_STATE_SUCCEEDED, done.error
    assert done.progress.fraction == 1.0 and done.model_version == "models/tiny/versions/v1"

    v = await registry.get_model_version("models/tiny/versions/v1")
    assert v.state == pb.MODEL_VERSION_STATE_READY
    assert (v.kind, v.format) == (pb.MODEL_KIND_BASE, pb.MODEL_FORMAT_SAFETENSORS)
    assert v.metadata.architecture == "Qwen2ForCausalLM"
    assert v.metadata.parameter_count == safetensors_param_count(tiny_model) > 0
    assert v.metadata.context_length == 512 and v.metadata.has_chat_template
    assert v.metadata.dtype == "float32"
    local = {p.name: p for p in tiny_model.iterdir() if p.is_file()}
    assert {f.path for f in v.files} == set(local)
    assert v.metadata.total_size_bytes == sum(p.stat().st_size for p in local.values())
    assert v.lineage.source_uri == str(tiny_model) and v.labels["team"] == "a"

    chunks = [r async for r in registry.download_file(v.name, path="config.json")]
    assert chunks[0].file.path == "config.json"
    assert b"".join(c.chunk for c in chunks[1:]) == local["config.json"].read_bytes()
    saved = await registry.download_to(v.name, path="config.json", dest=tmp_path / "config.json")
    assert saved.read_bytes() == local["config.json"].read_bytes()

    urls = (await registry.get_download_urls(v.name, verify_checksums=True)).urls
    by_path = {u.file.path: u for u in urls}
    body = httpx.get(by_path["model.safetensors"].url).content
    assert hashlib.sha256(body).hexdigest() == by_path["model.safetensors"].file.sha256

    model = await registry.get_model("models/tiny")
    assert model.version_count == 1
    updated = await registry.update_model_version(
        pb.ModelVersion(name=v.name, description="new", labels={"x": "y"}), update_mask=["description"])
    assert updated.description == "new" and dict(updated.labels) == {"team": "a"}


async def test_failed_imports_leave_no_version_and_name_the_problem(registry, tiny_model, tmp_path, store):
    no_config = tmp_path / "no-config"
    shutil.copytree(tiny_model, no_config)
    (no_config / "config.json").unlink()
    failed = await import_model(registry, "models/broken", str(no_config))
    assert failed.state == cpb.JOB_STATE_FAILED
    assert failed.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "config.json" in failed.error.message

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_model, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    failed2 = await import_model(registry, "models/broken", str(truncated))
    assert failed2.state == cpb.JOB_STATE_FAILED
    assert failed2.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "model.safetensors" in failed2.error.message and "truncated" in failed2.error.message
    info = error_details_pb2.ErrorInfo()
    assert failed2.error.details[0].Unpack(info) and info.reason == "SAFETENSORS_TRUNCATED"

    # Nothing is left behind: no version, no implicitly created model, no artifacts.
    await expect(registry.get_model("models/broken"), NotFound, "MODEL_NOT_FOUND")
    assert store.list("models") == []
    imports = (await registry.list_imports(filter="state = FAILED")).model_imports
    assert {i.name for i in imports} == {failed.name, failed2.name}


@pytest.mark.usefixtures("db_backend")
async def test_bad_requests_get_precise_codes_and_reasons(registry, tiny_model, store):
    await create_base(registry, store, tiny_model)
    cases = [
        (registry.get_model("models/nope"), NotFound, "MODEL_NOT_FOUND"),
        (registry.get_model_version("models/tiny/versions/nope"), NotFound, "VERSION_NOT_FOUND"),
        (registry.get_model("model/Bad Name"), InvalidArgument, "INVALID_NAME"),
        (registry.get_model_version("models/tiny/v1"), InvalidArgument, "INVALID_NAME"),
        (registry.create_model(model_id="tiny"), AlreadyExists, "MODEL_EXISTS"),
        (registry.create_model_version(parent="models/tiny", version_id="base",
                                       model_version=pb.ModelVersion(artifact_prefix="uploads/models/tiny/base")),
         AlreadyExists, "VERSION_EXISTS"),
        (registry.list_model_versions(parent="models/tiny", page_size=-1), InvalidArgument, "INVALID_ARGUMENT"),
        (registry.list_models(page_token="garbage"), InvalidArgument, "INVALID_ARGUMENT"),
        (registry.list_model_versions(parent="models/-", filter="colour = red"), InvalidArgument, "INVALID_ARGUMENT"),
        (registry.import_model(parent="models/x", source_uri="/does/not/exist"), InvalidArgument, "SOURCE_NOT_ALLOWED"),
        (registry.import_model(parent="models/x", source_uri="modelscope://qwen/Qwen2-0.5B"),
         FailedPrecondition, "MODELSCOPE_NOT_INSTALLED"),
        (registry.create_model_version(parent="models/tiny",
                                       model_version=pb.ModelVersion(artifact_prefix="uploads/nothing-here")),
         InvalidArgument, "MANIFEST_NOT_FOUND"),
        (registry.register_derived_version(
            parent="models/tiny", kind=pb.MODEL_KIND_ADAPTER, artifact_prefix="uploads/models/tiny/base",
            lineage=pb.Lineage(base_model_version="models/tiny/versions/missing")),
         NotFound, "VERSION_NOT_FOUND"),
        (registry.register_derived_version(  # longer than the column: refused, not stored cut (or INTERNAL)
            parent="models/tiny-x", kind=pb.MODEL_KIND_ADAPTER, artifact_prefix="uploads/models/tiny/base",
            lineage=pb.Lineage(base_model_version="models/tiny/versions/base", job="trainingJobs/" + "j" * 300)),
         InvalidArgument, "INVALID_ARGUMENT"),
        (first_chunk(registry.download_file("models/tiny/versions/base", path="nope.bin")), NotFound, "FILE_NOT_FOUND"),
    ]
    for call, error, reason in cases:
        await expect(call, error, reason)
    err = await expect(registry.list_model_versions(parent="models/tiny", page_size=-1), InvalidArgument,
                       "INVALID_ARGUMENT")
    assert "page_size" in err.message
    assert [v.field for v in err.violations] == ["page_size"]


async def test_a_bad_request_carries_error_info_and_bad_request_on_the_wire(registry):
    """What any gRPC client (not only the SDK) gets: the google.rpc.Status in the trailers."""
    async with grpc.aio.insecure_channel(registry.target) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ListModelVersions(pb.ListModelVersionsRequest(parent="models/tiny", page_size=-1), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_size" in info.value.details()
    raw = dict(info.value.trailing_metadata() or ())[STATUS_DETAILS_KEY]
    status = status_pb2.Status.FromString(raw)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    error_info, bad_request = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    assert status.details[0].Unpack(error_info) and error_info.reason == "INVALID_ARGUMENT"
    assert error_info.domain == "modelyard.registry"
    assert status.details[1].Unpack(bad_request)
    assert [(v.field, "must not be negative" in v.description) for v in bad_request.field_violations] == [
        ("page_size", True)]


async def test_paging_over_250_versions_visits_each_once(registry, tiny_model, store, tmp_path):
    base = await create_base(registry, store, tiny_model)
    store.upload_dir("uploads/adapter", make_adapter(tmp_path / "adapter"))
    for i in range(250):
        await registry.register_derived_version(
            parent="models/tiny-lora", version_id=f"a{i:03d}", kind=pb.MODEL_KIND_ADAPTER,
            artifact_prefix="uploads/adapter", labels={"parity": "even" if i % 2 == 0 else "odd"},
            lineage=pb.Lineage(base_model_version=base.name, job=f"trainingJobs/j{i}"))
    seen, token, pages = [], "", 0
    while True:
        resp = await registry.list_model_versions(parent="models/tiny-lora", page_size=100, page_token=token,
                                                  order_by="name desc")
        assert resp.total_size == 250
        seen += [v.name for v in resp.model_versions]
        pages += 1
        token = resp.next_page_token
        if not token:
            break
    assert pages == 3 and len(seen) == len(set(seen)) == 250
    assert seen == sorted(seen, reverse=True)
    followed = [v.name async for v in registry.iter_model_versions(parent="models/tiny-lora", page_size=100,
                                                                   order_by="name desc")]
    assert followed == seen
    v = await registry.get_model_version(seen[0])
    assert v.format == pb.MODEL_FORMAT_PEFT_ADAPTER and v.metadata.parameter_count == 256

    default = await registry.list_model_versions(parent="models/-", page_size=0)
    assert len(default.model_versions) == 50 and default.total_size == 251
    even = await registry.list_model_versions(parent="models/-", filter='kind = ADAPTER AND labels.parity = "even"',
                                              page_size=1000)
    assert even.total_size == 125 and not even.next_page_token
    await expect(registry.list_model_versions(parent="models/tiny", page_token=default.next_page_token),
                 InvalidArgument, "INVALID_ARGUMENT")


@pytest.mark.usefixtures("db_backend")
async def test_concurrent_registrations_into_one_new_model_get_distinct_version_numbers(registry, tiny_model, store,
                                                                                        tmp_path):
    """Eight versions registered at once into a model that does not exist yet, and six dataset versions uploaded
    at once into a new dataset: each parent is created once and each version gets its own automatic number (no
    VERSION_EXISTS, no INTERNAL from a lost race)."""
    base = await create_base(registry, store, tiny_model)
    store.upload_dir("uploads/adapter", make_adapter(tmp_path / "adapter"))
    made = await asyncio.gather(*(registry.register_derived_version(
        parent="models/race", kind=pb.MODEL_KIND_ADAPTER, artifact_prefix="uploads/adapter",
        lineage=pb.Lineage(base_model_version=base.name, job=f"trainingJobs/r{i}")) for i in range(8)))
    assert sorted(v.name for v in made) == sorted(f"models/race/versions/v{i}" for i in range(1, 9))
    assert (await registry.get_model("models/race")).version_count == 8

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a", "completion": "b"}\n')
    uploaded = await asyncio.gather(*(registry.upload_dataset(rows, parent="datasets/race") for _ in range(6)))
    assert sorted(v.name for v in uploaded) == sorted(f"datasets/race/versions/v{i}" for i in range(1, 7))


@pytest.mark.usefixtures("db_backend")
async def test_lineage_guards_delete_and_force_removes_artifacts(registry, tiny_model, store, tmp_path):
    base = await create_base(registry, store, tiny_model)
    store.upload_dir("jobs/j1/adapter", make_adapter(tmp_path / "adapter"))
    adapter = await registry.register_derived_version(
        parent="models/tiny-chat", kind=pb.MODEL_KIND_ADAPTER, artifact_prefix="jobs/j1/adapter",
        lineage=pb.Lineage(base_model_version=base.name, job="trainingJobs/j1"))
    assert adapter.name == "models/tiny-chat/versions/v1"
    store.upload_dir("jobs/j2/merged", tiny_model)
    merged = await registry.register_derived_version(
        parent="models/tiny-chat", kind=pb.MODEL_KIND_MERGED, artifact_prefix="jobs/j2/merged",
        lineage=pb.Lineage(base_model_version=adapter.name, job="trainingJobs/j2"))

    graph = await registry.get_lineage(merged.name, direction=pb.LINEAGE_DIRECTION_ANCESTORS)
    assert [n.name for n in graph.nodes] == [merged.name, adapter.name, base.name]
    assert {(e.parent, e.child, e.job) for e in graph.edges} == {
        (base.name, adapter.name, "trainingJobs/j1"), (adapter.name, merged.name, "trainingJobs/j2")}
    one_hop = await registry.get_lineage(base.name, direction=pb.LINEAGE_DIRECTION_DESCENDANTS, depth=1)
    assert [n.name for n in one_hop.nodes] == [base.name, adapter.name]

    err = await expect(registry.delete_model_version(base.name), FailedPrecondition, "VERSION_HAS_DESCENDANTS")
    assert adapter.name in err.message
    await registry.set_deployment_marker(merged.name, deployment="deployments/chat", deployed=True)
    await expect(registry.delete_model_version(merged.name), FailedPrecondition, "VERSION_DEPLOYED")
    assert store.list("uploads/models/tiny/base")

    await registry.delete_model_version(base.name, force=True)
    assert store.list("uploads/models/tiny/base") == []
    await expect(registry.get_model_version(base.name), NotFound, "VERSION_NOT_FOUND")
    history = await registry.get_lineage(adapter.name, direction=pb.LINEAGE_DIRECTION_ANCESTORS)
    assert [(n.name, n.deleted) for n in history.nodes] == [(adapter.name, False), (base.name, True)]


async def test_corrupted_artifact_is_data_loss_on_every_download_path(registry, tiny_model, store):
    v = await create_base(registry, store, tiny_model)
    key = file_key(v.artifact_prefix, "config.json")
    original = store.get_bytes(key)
    store.put_bytes(key, original.replace(b"{", b"[", 1))  # same size, different bytes
    await expect(first_chunk(registry.download_file(v.name, path="config.json")), DataLoss, "CHECKSUM_MISMATCH")
    await expect(registry.get_download_urls(v.name, verify_checksums=True), DataLoss, "CHECKSUM_MISMATCH")
    store.put_bytes(key, original + b" ")  # size change is caught without reading the bytes
    await expect(registry.get_download_urls(v.name), DataLoss, "CHECKSUM_MISMATCH")


# ----------------------------------------------------------------------------- hub import


class _Hub(BaseHTTPRequestHandler):
    """A tiny model repository in the hub's HTTP layout (the endpoints huggingface_hub uses)."""

    repo = "acme/tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    files: dict[str, bytes] = {}
    requests: list[str] = []

    def log_message(self, *args) -> None:  # quiet
        pass

    def _json(self, doc) -> None:
        body = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _file(self, send_body: bool) -> None:
        prefix = f"/{self.repo}/resolve/"
        rev, _, path = self.path[len(prefix):].partition("/")
        data = self.files.get(path)
        if data is None or rev not in ("main", self.commit):
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", self.commit)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if send_body:
            self.wfile.write(data)

    def do_HEAD(self) -> None:  # noqa: N802
        self.requests.append(f"HEAD {self.path}")
        self._file(send_body=False)

    def do_GET(self) -> None:  # noqa: N802
        self.requests.append(f"GET {self.path}")
        path = self.path.split("?")[0]
        if path in (f"/api/models/{self.repo}/revision/main", f"/api/models/{self.repo}/revision/{self.commit}"):
            self._json({"id": self.repo, "modelId": self.repo, "sha": self.commit, "private": False,
                        "siblings": [{"rfilename": name} for name in sorted(self.files)]})
        elif path == f"/api/models/{self.repo}/tree/{self.commit}":
            self._json([{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                        for name, data in sorted(self.files.items())])
        elif path.startswith(f"/{self.repo}/resolve/"):
            self._file(send_body=True)
        else:
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()


@pytest.fixture
def loopback_hub(tiny_model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the import child process reads it
    _Hub.files = {p.name: p.read_bytes() for p in tiny_model.iterdir() if p.is_file()}
    _Hub.files["pytorch_model.bin"] = b"pickle weights the registry must not fetch"
    _Hub.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


async def test_hub_import_through_a_loopback_hub(registry, loopback_hub, tiny_model):
    registry.app.settings.hf_endpoint = loopback_hub
    done = await import_model(registry, "models/hub-tiny", "hf://acme/tiny@main")
    assert done.state == cpb.JOB_STATE_SUCCEEDED, done.error
    v = await registry.get_model_version(done.model_version)
    assert "pytorch_model.bin" not in {f.path for f in v.files}
    assert {f.path for f in v.files} == {p.name for p in tiny_model.iterdir() if p.is_file()}
    assert v.metadata.parameter_count == safetensors_param_count(tiny_model)
    assert any(r.startswith("GET /acme/tiny/resolve/") and r.endswith("model.safetensors") for r in _Hub.requests)

    missing = await import_model(registry, "models/hub-missing", "hf://acme/absent")
    assert missing.state == cpb.JOB_STATE_FAILED
    assert missing.error.code == grpc.StatusCode.NOT_FOUND.value[0], missing.error.message


# ----------------------------------------------------------------------------- datasets


def _chat_rows(bad: set[int], n: int = 10) -> bytes:
    lines = []
    for i in range(1, n + 1):
        if i in bad:
            lines.append(json.dumps({"messages": [{"role": "wizard", "content": "?"}]}))
        else:
            lines.append(json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                                  {"role": "assistant", "content": f"answer {i}"}]}))
    return ("\n".join(lines) + "\n").encode()


async def upload(registry: RegistryClient, folder: Path, filename: str, data: bytes, parent: str = "datasets/chat",
                 chunk: int = 7) -> pb.DatasetVersion:
    """Write ``data`` to ``folder/filename`` and upload it in ``chunk``-byte pieces."""
    path = folder / filename
    path.write_bytes(data)
    sent: list[int] = []
    version = await registry.upload_dataset(path, parent=parent, chunk_bytes=chunk, on_progress=sent.append)
    assert sum(sent) == len(data) and max(sent) <= chunk
    return version


@pytest.mark.usefixtures("db_backend")
async def test_dataset_upload_hashes_content_and_validation_reports_exactly_the_bad_rows(registry, tiny_model, store,
                                                                                         tmp_path):
    data = _chat_rows({3, 7})
    first = await upload(registry, tmp_path, "train.jsonl", data)
    second = await upload(registry, tmp_path, "train.jsonl", data, chunk=1000)
    assert first.name == "datasets/chat/versions/v1" and second.name == "datasets/chat/versions/v2"
    assert first.sha256 == second.sha256 == hashlib.sha256(data).hexdigest()
    assert (first.format, first.row_count, first.invalid_row_count) == ("messages", 10, 2)

    report = await registry.validate_dataset(first.name)
    assert sorted({e.row for e in report.errors}) == [3, 7]
    assert report.valid_row_count == 8 and report.format == "messages"

    base = await create_base(registry, store, tiny_model)
    with_tokens = await registry.validate_dataset(first.name, model_version=base.name, max_length=8)
    assert with_tokens.token_stats.rows == 8 and with_tokens.token_stats.max_tokens >= with_tokens.token_stats.min_tokens > 0
    assert with_tokens.token_stats.rows_over_max_length > 0

    await expect(upload(registry, tmp_path, "notes.txt", b"just some prose\n"), InvalidArgument,
                 "DATASET_FORMAT_UNKNOWN")
    listed = await registry.list_dataset_versions(parent="datasets/chat")
    assert listed.total_size == 2

    store.upload_dir("jobs/j1/adapter", make_adapter(tmp_path / "adapter"))
    adapter = await registry.register_derived_version(
        parent="models/tiny-chat", kind=pb.MODEL_KIND_ADAPTER, artifact_prefix="jobs/j1/adapter",
        lineage=pb.Lineage(base_model_version=base.name, dataset_versions=[first.name], job="trainingJobs/j1",
                           parameters={"lr": 1e-4, "method": "lora"}))
    assert dict(adapter.lineage.parameters) == {"lr": 1e-4, "method": "lora"}
    await expect(registry.delete_dataset_version(first.name), FailedPrecondition, "VERSION_HAS_DESCENDANTS")
    graph = await registry.get_lineage(first.name)
    assert {n.name for n in graph.nodes} == {first.name, adapter.name, base.name}


# ----------------------------------------------------------------------------- the real SmolLM2


@pytest.mark.slow
async def test_import_smollm2_from_gguf_counts_its_parameters_and_the_stored_model_answers(registry, tmp_path):
    done = await import_model(registry, "models/smollm2-135m", str(smollm2_gguf_path()))
    assert done.state == cpb.JOB_STATE_SUCCEEDED, done.error
    v = await registry.get_model_version(done.model_version)
    # 134,515,008: the count of the model loaded with transformers (tied embeddings counted once).
    assert abs(v.metadata.parameter_count - 134_515_008) <= 134_515_008 * 0.01
    assert v.metadata.architecture == "LlamaForCausalLM" and v.metadata.context_length == 8192
    assert v.metadata.has_chat_template and "model.safetensors" in {f.path for f in v.files}

    # The registry's own conversion output, fetched back through its verified download path, loads
    # with transformers and answers.
    folder = tmp_path / "downloaded"
    for f in v.files:
        dest = folder / f.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        await registry.download_to(v.name, path=f.path, dest=dest)
        assert hashlib.sha256(dest.read_bytes()).hexdigest() == f.sha256
    answer = await asyncio.to_thread(_ask, folder, "What is the capital of France?")
    assert "Paris" in answer, answer


def _ask(folder: Path, question: str) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_dict=True, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
