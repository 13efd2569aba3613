"""Hardened registry inputs through a real registry (gRPC on loopback, nanio S3, SQLite): local imports only under
the allowed roots (realpath, no '~'), one identical error for a missing, outside or unreadable path, no symbolic
link leading out of an imported folder (checked at the request and again by the import child), s3:// only from
allowed buckets, a dataset upload cap enforced at the chunk that crosses it with nothing stored; and the pipeline
service's local paths under its own roots."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import grpc
import pytest

from cli.demo_models import build_tiny_model, smollm2_gguf_path
from modelyard.client import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PipelineClient,
    RegistryClient,
    ResourceExhausted,
)
from modelyard.common.v1 import common_pb2 as cpb
from modelyard.registry.v1 import registry_pb2 as pb
from modelyard.registry.v1 import registry_pb2_grpc
from services.core.artifacts import S3ArtifactStore
from services.core.jobs.context import Channel, JobContext
from services.core.local_paths import LocalPathPolicy
from services.core.settings import GrpcServerSettings
from services.pipeline.app import build_app as build_pipeline
from services.pipeline.runner import _local
from services.pipeline.settings import PipelineSettings
from services.registry import import_job
from services.registry.app import build_app
from services.registry.imports import child_env
from services.registry.settings import DatasetSettings, ImportSettings, RegistrySettings
from services.registry.sources import ImportPolicy, parse_source
from tests.integration.test_registry import expect, wait_import

CAP = 4096
ROOTS_SETTING = "YARD_REGISTRY_IMPORTS__ALLOWED_ROOTS"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def dirs(tmp_path) -> tuple[Path, Path]:
    """(allowed root, a folder outside it) with a secret file outside."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    (outside / "dir").mkdir(parents=True)
    (outside / "secret.txt").write_text("not for the registry")
    (outside / "dir" / "secret.json").write_text("{}")
    return allowed, outside


async def _registry(tmp_path, s3_settings, allowed: Path, **overrides):
    settings = RegistrySettings(
        data_dir=tmp_path / "data", s3=s3_settings, grpc=GrpcServerSettings(port=0), import_workers=1,
        worker_poll_interval_s=0.1, hf_endpoint="http://127.0.0.1:9", hf_token=None,
        imports=ImportSettings(allowed_roots=[allowed]), datasets=DatasetSettings(max_upload_bytes=CAP), **overrides)
    app = build_app(settings, metrics=False, default_port=0)
    await app.start()
    client = RegistryClient(f"127.0.0.1:{app.server.port}", timeout=120)
    client.app = app  # type: ignore[attr-defined]
    return app, client


@pytest.fixture
async def registry(tmp_path, s3_settings, dirs):
    app, client = await _registry(tmp_path, s3_settings, dirs[0])
    yield client
    await client.close()
    await app.stop(grace=1)


@pytest.fixture
async def queue_only(tmp_path, s3_settings, dirs):
    """A replica that runs no imports (they stay QUEUED until a test runs the child's code itself)."""
    app, client = await _registry(tmp_path, s3_settings, dirs[0], worker_enabled=False)
    yield client
    await client.close()
    await app.stop(grace=1)


def _shape(err, given: str) -> tuple:
    """An error with the path the caller gave taken out: what a caller could compare across paths."""
    def strip(text: str) -> str:
        return text.replace(repr(given), "<path>").replace(given, "<path>")

    return (type(err).__name__, err.reason, strip(err.message), tuple((v.field, strip(v.description)) for v in err.violations),
            tuple(sorted((k, strip(v)) for k, v in err.metadata.items())))


async def _nothing_stored(registry: RegistryClient, store: S3ArtifactStore, model: str) -> None:
    await expect(registry.get_model(model), NotFound, "MODEL_NOT_FOUND")
    assert store.list("models") == [] and store.list("uploads") == []


# ----------------------------------------------------------------------------- local roots


async def test_missing_outside_and_unreadable_paths_get_one_identical_error(registry, tiny_model, dirs, s3_settings):
    allowed, outside = dirs
    shutil.copytree(tiny_model, outside / "model")
    (allowed / "link").symlink_to(outside / "model")  # a link in the root to a model outside it
    (allowed / "dangling").symlink_to(allowed / "gone")
    os.mkfifo(allowed / "fifo")
    (allowed / "file.txt").write_text("x")
    cases = {
        "missing under the root": allowed / "nope",
        "missing outside": outside / "nope",
        "present outside": outside / "model",
        "present outside, file://": f"file://{outside / 'model'}",
        "'..' out of the root": f"{allowed}/../outside/model",
        "a link in the root leading outside": allowed / "link",
        "a dangling link": allowed / "dangling",
        "neither file nor folder": allowed / "fifo",
        "below a file": allowed / "file.txt" / "x",
        "a system file": "/etc/passwd",
    }
    if os.geteuid() != 0:  # root reads through any mode bits
        locked = allowed / "locked"
        shutil.copytree(tiny_model, locked)
        locked.chmod(0)
        cases["unreadable under the root"] = locked
    shapes = {}
    for label, given in cases.items():
        err = await expect(registry.import_model(parent="models/probe", source_uri=str(given)), InvalidArgument,
                           "SOURCE_NOT_ALLOWED")
        assert str(given) in err.message, label
        shapes[label] = _shape(err, str(given))
    assert len(set(shapes.values())) == 1, shapes
    shape = next(iter(shapes.values()))
    assert ROOTS_SETTING in shape[2] and shape[3][0][0] == "source_uri"
    assert "does not exist" not in shape[2] and str(allowed) not in shape[2]  # nothing about the path or the roots
    await _nothing_stored(registry, S3ArtifactStore(s3_settings), "models/probe")
    assert (await registry.list_imports()).model_imports == []
    if os.geteuid() != 0:
        (allowed / "locked").chmod(0o755)


async def test_tilde_and_relative_paths_are_never_expanded(registry, tiny_model):
    home_dir = Path(tempfile.mkdtemp(dir=Path.home(), prefix=".yard-test-"))
    try:
        shutil.copytree(tiny_model, home_dir / "model")
        for given in (f"~/{home_dir.name}/model", f"file://~/{home_dir.name}/model", "model", "./model"):
            err = await expect(registry.import_model(parent="models/tilde", source_uri=given), InvalidArgument,
                               "SOURCE_PATH_NOT_ABSOLUTE")
            assert "absolute" in err.message and str(Path.home()) not in err.message
        # the same folder, home among the roots: still not expanded
        policy = ImportPolicy(LocalPathPolicy((os.path.realpath(Path.home()),), ROOTS_SETTING), ())
        with pytest.raises(InvalidArgument) as info:
            parse_source(f"~/{home_dir.name}/model", policy)
        assert info.value.reason == "SOURCE_PATH_NOT_ABSOLUTE"
        assert parse_source(str(home_dir / "model"), policy).scheme == "local"
    finally:
        shutil.rmtree(home_dir)


async def test_symlinks_leaving_the_folder_are_refused_naming_them_and_nothing_is_uploaded(registry, tiny_model,
                                                                                           dirs, s3_settings):
    allowed, outside = dirs
    store = S3ArtifactStore(s3_settings)
    links = {
        "file": ("notes.txt", outside / "secret.txt"),
        "folder": ("extra", outside / "dir"),
        "deep, relative": ("a/b/deep.json", Path("../../../../outside/secret.txt")),
        "hidden": (".cache/x", outside / "secret.txt"),
        "into the root, out of the folder": ("sibling.json", allowed / "other.json"),
    }
    (allowed / "other.json").write_text("{}")
    for label, (rel, target) in links.items():
        folder = allowed / label.replace(" ", "-").replace(",", "")
        shutil.copytree(tiny_model, folder)
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).symlink_to(target)
        err = await expect(registry.import_model(parent="models/linked", source_uri=str(folder)), InvalidArgument,
                           "SOURCE_SYMLINK_OUTSIDE")
        assert err.metadata["path"] == rel and f"{rel} is a symbolic link" in err.message, label
        assert str(outside) not in err.message  # the target is not echoed
    await _nothing_stored(registry, store, "models/linked")

    # links that stay inside the folder are fine: the allowed root works
    ok = allowed / "ok"
    shutil.copytree(tiny_model, ok)
    (ok / "alias.json").symlink_to("tokenizer_config.json")
    (ok / "sub").mkdir()
    (ok / "sub" / "up.json").symlink_to("../config.json")
    done = await wait_import(registry, (await registry.import_model(parent="models/ok", source_uri=str(ok))).name)
    assert done.state == cpb.JOB_STATE_SUCCEEDED, done.error.message
    version = await registry.get_model_version(done.model_version)
    files = {f.path for f in version.files}
    assert {"alias.json", "sub/up.json", "config.json"} <= files


async def test_the_import_child_checks_again_before_reading(queue_only, tiny_model, dirs, s3_settings, tmp_path):
    allowed, outside = dirs
    folder = allowed / "late"
    shutil.copytree(tiny_model, folder)
    started = await queue_only.import_model(parent="models/late", source_uri=str(folder))
    assert started.state == cpb.JOB_STATE_QUEUED
    (folder / "added-later.txt").symlink_to(outside / "secret.txt")  # after the request was checked

    app = queue_only.app  # type: ignore[attr-defined]
    job = app.imports.store.get(started.name)
    assert job.spec["import_policy"]["local"]["roots"] == [os.path.realpath(allowed)]
    ctx = JobContext(name=job.name, spec=job.spec, attempt=1, workdir=tmp_path / "w", resume_state=None,
                     channel=Channel(io.StringIO()))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in child_env(app.settings, app.db.url).items():
            mp.setenv(k, v)
        mp.chdir(tmp_path)  # the child's working folder is not the registry's: the roots come from the spec
        with pytest.raises(InvalidArgument) as info:
            await asyncio.to_thread(import_job.run, ctx)
    assert info.value.reason == "SOURCE_SYMLINK_OUTSIDE" and info.value.metadata["path"] == "added-later.txt"
    await expect(queue_only.get_model_version(started.model_version), NotFound, "VERSION_NOT_FOUND")
    await _nothing_stored(queue_only, S3ArtifactStore(s3_settings), "models/late")


def test_defaults_keep_the_single_machine_flow_and_a_public_address_disables_local_imports(tiny_model, s3_settings,
                                                                                          tmp_path):
    local = ImportPolicy.from_settings(RegistrySettings(s3=s3_settings, grpc=GrpcServerSettings(host="127.0.0.1")))
    roots = local.local.roots
    for folder in (Path.home(), Path(tempfile.gettempdir()), Path.cwd()):
        assert os.path.realpath(folder) in roots
    assert parse_source(str(tiny_model), local).scheme == "local"  # a pytest temp folder
    assert parse_source(str(smollm2_gguf_path()), local).scheme == "gguf"  # the demo's GGUF in site-packages
    assert local.buckets == (s3_settings.bucket,)

    for host in ("0.0.0.0", "::", "10.1.2.3"):
        public = ImportPolicy.from_settings(RegistrySettings(s3=s3_settings, grpc=GrpcServerSettings(host=host)))
        assert public.local.roots == ()
        for given in (str(tiny_model), "/does/not/exist"):
            with pytest.raises(FailedPrecondition) as info:
                parse_source(given, public)
            assert info.value.reason == "LOCAL_SOURCES_DISABLED" and ROOTS_SETTING in info.value.message
            assert given not in info.value.message
    configured = ImportPolicy.from_settings(RegistrySettings(
        s3=s3_settings, grpc=GrpcServerSettings(host="0.0.0.0"),
        imports=ImportSettings(allowed_roots=[tmp_path], allowed_buckets=["*"])))
    assert configured.local.roots == (os.path.realpath(tmp_path),) and configured.buckets == ("*",)
    assert parse_source("s3://anything/x", configured).bucket == "anything"
    with pytest.raises(ValueError, match="absolute"):
        ImportSettings(allowed_roots=["~/models"])
    assert ImportSettings.model_validate({"allowed_roots": "/a, /b", "allowed_buckets": '["x"]'}).allowed_roots == [
        Path("/a"), Path("/b")]


# ----------------------------------------------------------------------------- S3 buckets


async def test_s3_imports_only_from_allowed_buckets(queue_only, s3_settings):
    given = "s3://someone-elses-bucket/models/x"
    err = await expect(queue_only.import_model(parent="models/s3", source_uri=given), InvalidArgument,
                       "SOURCE_NOT_ALLOWED")
    assert "YARD_REGISTRY_IMPORTS__ALLOWED_BUCKETS" in err.message and err.violations[0].field == "source_uri"
    await expect(queue_only.get_model("models/s3"), NotFound, "MODEL_NOT_FOUND")
    # the registry's own bucket is allowed by default
    own = await queue_only.import_model(parent="models/s3", source_uri=f"s3://{s3_settings.bucket}/uploads/x")
    assert own.state == cpb.JOB_STATE_QUEUED


# ----------------------------------------------------------------------------- dataset upload cap


def _jsonl_of(size: int) -> bytes:
    """Valid chat rows, exactly ``size`` bytes."""
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}
    rows = []
    while sum(len(r) for r in rows) + 200 < size:
        row["messages"][1]["content"] = "x" * 100
        rows.append((json.dumps(row) + "\n").encode())
    row["messages"][1]["content"] = ""
    pad = size - sum(len(r) for r in rows) - len(json.dumps(row) + "\n")
    row["messages"][1]["content"] = "y" * pad
    rows.append((json.dumps(row) + "\n").encode())
    body = b"".join(rows)
    assert len(body) == size
    return body


async def test_dataset_upload_over_the_cap_is_refused_at_once_and_nothing_is_stored(registry, s3_settings, tmp_path):
    store = S3ArtifactStore(s3_settings)
    staging = registry.app.registry.staging  # type: ignore[attr-defined]
    never = asyncio.Event()
    sent = 0

    async def requests():
        nonlocal sent
        yield pb.UploadDatasetRequest(metadata=pb.DatasetUploadMetadata(parent="datasets/big", filename="big.jsonl"))
        for _ in range(CAP // 1024 + 1):  # the fifth 1 KiB chunk crosses the cap
            sent += 1
            yield pb.UploadDatasetRequest(chunk=b"x" * 1024)
        await never.wait()  # the rest never comes: only a refusal at the crossing chunk ends the call

    async with grpc.aio.insecure_channel(registry.target) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.UploadDataset(requests(), timeout=20)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    assert f"{CAP} bytes" in info.value.details() and "YARD_REGISTRY_DATASETS__MAX_UPLOAD_BYTES" in info.value.details()
    assert sent == CAP // 1024 + 1

    big = tmp_path / "big.jsonl"
    big.write_bytes(_jsonl_of(CAP + 1))
    err = await expect(registry.upload_dataset(big, parent="datasets/big", chunk_bytes=1000), ResourceExhausted,
                       "DATASET_TOO_LARGE")
    assert err.violations[0].field == "chunk" and err.metadata["max_upload_bytes"] == str(CAP)
    await expect(registry.get_dataset("datasets/big"), NotFound, "DATASET_NOT_FOUND")
    assert store.list("datasets") == [] and not list(staging.glob("dataset-*"))

    exact = tmp_path / "exact.jsonl"
    exact.write_bytes(_jsonl_of(CAP))
    version = await registry.upload_dataset(exact, parent="datasets/big", chunk_bytes=1000)
    assert version.size_bytes == CAP and version.row_count > 1


# ----------------------------------------------------------------------------- pipeline


async def test_pipeline_local_paths_only_under_its_roots(tmp_path, s3_settings, dirs):
    allowed, outside = dirs
    (allowed / "data.jsonl").write_bytes(_jsonl_of(500))
    (outside / "data.jsonl").write_bytes(_jsonl_of(500))
    os.mkfifo(allowed / "fifo")
    settings = PipelineSettings(data_dir=tmp_path / "pipeline", s3=s3_settings, grpc=GrpcServerSettings(port=0),
                                worker_enabled=False, imports={"allowed_roots": [str(allowed)]})
    app = build_pipeline(settings, metrics=False, default_port=0)
    await app.start()
    client = PipelineClient(app.server.address, timeout=60)
    doc = "steps:\n  - {id: data, type: dataset, path: PATH, dataset: d}\n"
    try:
        shapes = {}
        for given in (outside / "data.jsonl", allowed / "missing.jsonl", allowed / "fifo", "/etc/passwd",
                      f"{allowed}/../outside/data.jsonl"):
            with pytest.raises(InvalidArgument) as info:
                await client.create_pipeline_run(doc.replace("PATH", str(given)), working_dir=str(allowed))
            (violation,) = info.value.violations
            assert violation.field == "steps.data.path"
            shapes[str(given)] = violation.description.replace(repr(str(given)), "<path>")
        assert len(set(shapes.values())) == 1 and "YARD_PIPELINE_IMPORTS__ALLOWED_ROOTS" in next(iter(shapes.values()))
        run = await client.create_pipeline_run(doc.replace("PATH", "data.jsonl"), working_dir=str(allowed))
        assert run.name
    finally:
        await client.close()
        await app.stop(grace=1)

    # the run child checks again with the roots stored in the run (a path named by a step output, say)
    policy = LocalPathPolicy.effective([allowed], "127.0.0.1", "YARD_PIPELINE_IMPORTS__ALLOWED_ROOTS")
    assert _local("data.jsonl", str(allowed), policy, "steps.data.path") == str(allowed / "data.jsonl")
    with pytest.raises(InvalidArgument) as info:
        _local(str(outside / "data.jsonl"), str(allowed), policy, "steps.data.path")
    assert info.value.reason == "SOURCE_NOT_ALLOWED" and info.value.violations[0].field == "steps.data.path"
