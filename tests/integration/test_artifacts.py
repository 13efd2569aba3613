"""S3ArtifactStore against a real nanio S3 server on loopback (no mocks)."""

from __future__ import annotations

import hashlib
import io
import os
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from minio import Minio
from pydantic import SecretStr

from cli.s3server import free_port
from services.core.artifacts import FileEntry, Manifest, ObjectInfo, S3ArtifactStore
from services.core.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from services.core.settings import S3Settings

MiB = 1024 * 1024


@pytest.fixture
def store(s3_settings: S3Settings) -> S3ArtifactStore:
    return S3ArtifactStore.connect(s3_settings)


@pytest.fixture
def raw(s3_settings: S3Settings) -> Minio:
    """The plain minio client on the same server, to inspect or tamper with stored objects."""
    return Minio(s3_settings.endpoint, s3_settings.access_key, s3_settings.secret_key.get_secret_value(),
                 secure=False, region=s3_settings.region)


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _corrupt(raw: Minio, bucket: str, key: str) -> None:
    """Replace the object's bytes (same length, one byte flipped) but keep its stored sha256."""
    stored_sha = raw.stat_object(bucket, key).metadata["x-amz-meta-sha256"]
    resp = raw.get_object(bucket, key)
    data = bytearray(resp.read())
    resp.close()
    resp.release_conn()
    data[len(data) // 2] ^= 0xFF
    raw.put_object(bucket, key, io.BytesIO(bytes(data)), len(data), metadata={"sha256": stored_sha})


def test_bucket_is_created_on_connect(s3_settings, raw):
    assert not raw.bucket_exists(s3_settings.bucket)
    S3ArtifactStore.connect(s3_settings)
    assert raw.bucket_exists(s3_settings.bucket)
    S3ArtifactStore.connect(s3_settings)  # an existing bucket is fine


def test_file_round_trip_is_verified_and_stores_sha256_metadata(store, raw, tmp_path):
    data = os.urandom(MiB + 123)
    src = _write(tmp_path / "src.bin", data)

    entry = store.put_file("models/m/v1/files/model.bin", src)
    assert entry == FileEntry("models/m/v1/files/model.bin", len(data), _sha(data))
    assert raw.stat_object(store.bucket, entry.path).metadata["x-amz-meta-sha256"] == _sha(data)

    got = store.get_file(entry.path, tmp_path / "out" / "model.bin")
    assert got == entry
    assert (tmp_path / "out" / "model.bin").read_bytes() == data
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.bin"]  # temp file gone

    assert store.get_file(entry.path, tmp_path / "again.bin", expected=entry) == entry
    assert store.get_bytes(entry.path, expected=entry) == data


def test_bytes_and_stream_round_trip(store):
    entry = store.put_bytes("d/small.json", b'{"a": 1}', content_type="application/json")
    assert store.get_bytes("d/small.json") == b'{"a": 1}'
    assert entry.sha256 == _sha(b'{"a": 1}')

    chunks = [os.urandom(300_000) for _ in range(7)]
    streamed = store.put_stream("datasets/ds1/train.jsonl", iter(chunks))
    whole = b"".join(chunks)
    assert streamed == FileEntry("datasets/ds1/train.jsonl", len(whole), _sha(whole))
    assert store.get_bytes("datasets/ds1/train.jsonl") == whole

    from_file_obj = store.put_stream("datasets/ds1/eval.jsonl", io.BytesIO(b"line\n" * 1000))
    assert from_file_obj.size == 5000
    assert store.put_stream("datasets/ds1/empty.jsonl", iter([])).size == 0
    assert store.get_bytes("datasets/ds1/empty.jsonl") == b""


def test_multipart_upload_of_a_file_above_the_threshold(s3_settings, raw, tmp_path):
    settings = s3_settings.model_copy(update={"multipart_threshold": 5 * MiB, "part_size": 5 * MiB})
    store = S3ArtifactStore.connect(settings)
    data = os.urandom(11 * MiB)
    src = _write(tmp_path / "big.bin", data)

    entry = store.put_file("ckpt/step-100/model.bin", src)
    assert entry.size == len(data) and entry.sha256 == _sha(data)
    assert raw.stat_object(settings.bucket, entry.path).etag.endswith("-3")  # 5 + 5 + 1 MiB parts

    store.get_file(entry.path, tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data


def test_directory_round_trip_with_nested_paths_and_manifest(store, tmp_path):
    src = tmp_path / "model"
    files = {
        "config.json": b'{"hidden_size": 8}',
        "tokenizer/vocab.txt": b"a\nb\nc\n",
        "weights/shard-1/model.safetensors": os.urandom(70_000),
        "weights/empty.bin": b"",
    }
    for rel, data in files.items():
        _write(src / rel, data)

    manifest = store.upload_dir("models/m/versions/1", src)
    assert [f.path for f in manifest.files] == sorted(files)
    assert manifest.total_size == sum(len(d) for d in files.values())
    assert manifest.find("tokenizer/vocab.txt") == FileEntry("tokenizer/vocab.txt", 6, _sha(b"a\nb\nc\n"))
    assert {o.key for o in store.list("models/m/versions/1")} == (
        {f"models/m/versions/1/files/{rel}" for rel in files} | {"models/m/versions/1/manifest.json"}
    )
    assert store.read_manifest("models/m/versions/1") == manifest

    dest = tmp_path / "cache"
    assert store.download_dir("models/m/versions/1", dest) == manifest
    assert {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == files


def test_manifest_is_written_last_so_a_failed_upload_leaves_none(store, tmp_path):
    # "files/b" already is an object, so "files/b/c.txt" cannot be stored (a key is never a folder).
    store.put_bytes("jobs/j1/files/b", b"blocker")
    src = tmp_path / "out"
    _write(src / "a.txt", b"a")
    _write(src / "b" / "c.txt", b"c")

    with pytest.raises(FailedPrecondition) as err:
        store.upload_dir("jobs/j1", src)
    assert err.value.reason == "ARTIFACT_KEY_CONFLICT"
    assert "jobs/j1/files/b/c.txt" in err.value.message and "'jobs/j1/files/b'" in err.value.message
    assert store.exists("jobs/j1/files/a.txt")
    assert not store.exists("jobs/j1/manifest.json")
    with pytest.raises(NotFound):
        store.read_manifest("jobs/j1")


def test_corrupted_object_is_rejected_and_dest_left_untouched(store, raw, tmp_path):
    data = os.urandom(200_000)
    entry = store.put_bytes("models/m/v1/files/w.bin", data)
    _corrupt(raw, store.bucket, entry.path)

    dest = tmp_path / "dl" / "w.bin"
    with pytest.raises(DataLoss) as err:
        store.get_file(entry.path, dest)
    assert err.value.reason == "CHECKSUM_MISMATCH"
    assert entry.path in err.value.message and entry.sha256 in err.value.message
    assert err.value.metadata["actual_sha256"] != entry.sha256
    assert err.value.metadata["actual_sha256"] in err.value.message
    assert list(dest.parent.iterdir()) == []  # neither dest nor a temp file

    _write(dest, b"previous good copy")
    with pytest.raises(DataLoss):
        store.get_file(entry.path, dest, expected=entry)
    assert dest.read_bytes() == b"previous good copy"
    with pytest.raises(DataLoss):
        store.get_bytes(entry.path)


def test_download_dir_never_hands_out_a_corrupt_file(store, raw, tmp_path):
    src = tmp_path / "src"
    _write(src / "a.bin", os.urandom(1000))
    _write(src / "b.bin", os.urandom(1000))
    store.upload_dir("adapters/x/1", src)
    _corrupt(raw, store.bucket, "adapters/x/1/files/b.bin")

    dest = tmp_path / "dest"
    with pytest.raises(DataLoss) as err:
        store.download_dir("adapters/x/1", dest)
    assert "adapters/x/1/files/b.bin" in err.value.message
    assert (dest / "a.bin").read_bytes() == (src / "a.bin").read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == ["a.bin"]


def test_object_without_stored_checksum_needs_an_expected_entry(store, raw):
    raw.put_object(store.bucket, "foreign/blob", io.BytesIO(b"hello"), 5)
    with pytest.raises(FailedPrecondition) as err:
        store.get_bytes("foreign/blob")
    assert err.value.reason == "CHECKSUM_MISSING"
    assert store.get_bytes("foreign/blob", expected=FileEntry("foreign/blob", 5, _sha(b"hello"))) == b"hello"
    with pytest.raises(DataLoss):
        store.get_bytes("foreign/blob", expected=FileEntry("foreign/blob", 6, _sha(b"hello!")))


def test_missing_key_is_not_found_and_creates_nothing(store, tmp_path):
    with pytest.raises(NotFound) as err:
        store.get_file("models/none/file.bin", tmp_path / "x.bin")
    assert err.value.reason == "ARTIFACT_NOT_FOUND" and "models/none/file.bin" in err.value.message
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(NotFound):
        store.read_manifest("models/none")
    assert not store.exists("models/none/file.bin")


def test_wrong_secret_key_gives_a_clear_credentials_error(s3_settings):
    bad = s3_settings.model_copy(update={"secret_key": SecretStr("not-the-secret")})
    with pytest.raises((Unauthenticated, PermissionDenied)) as err:
        S3ArtifactStore.connect(bad)
    assert err.value.reason == "S3_CREDENTIALS_REJECTED"
    assert s3_settings.endpoint in err.value.message and repr(s3_settings.access_key) in err.value.message


def test_unknown_access_key_is_unauthenticated(s3_settings, store):
    store.put_bytes("k/v", b"v")
    bad = S3ArtifactStore(s3_settings.model_copy(update={"access_key": "intruder"}))
    with pytest.raises(Unauthenticated) as err:
        bad.get_bytes("k/v")
    assert err.value.reason == "S3_CREDENTIALS_REJECTED"
    assert "'intruder'" in err.value.message and s3_settings.endpoint in err.value.message


def test_unreachable_endpoint_fails_fast_with_unavailable():
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens there
    settings = S3Settings(endpoint=endpoint, bucket="unreachable", connect_retries=3, retry_backoff_s=0.05)
    start = time.monotonic()
    with pytest.raises(Unavailable) as err:
        S3ArtifactStore.connect(settings)
    assert time.monotonic() - start < 5
    assert err.value.reason == "S3_UNAVAILABLE"
    assert err.value.message.startswith(f"S3 endpoint {endpoint} unreachable after 4 attempts: ")
    assert "Connection refused" in err.value.message


def test_presigned_url_downloads_the_right_bytes(store):
    data = os.urandom(50_000)
    store.put_bytes("reports/eval-1/predictions.jsonl", data)
    url = store.presigned_get_url("reports/eval-1/predictions.jsonl", expires=timedelta(minutes=5))
    resp = httpx.get(url, timeout=10)
    assert resp.status_code == 200 and resp.content == data
    assert httpx.get(url.replace("predictions", "prediction"), timeout=10).status_code == 403
    with pytest.raises(InvalidArgument) as err:
        store.presigned_get_url("reports/eval-1/predictions.jsonl", expires=timedelta(days=8))
    assert err.value.violations[0].field == "expires"


def test_list_exists_delete_and_delete_prefix(store):
    for key, size in [("p/a", 1), ("p/b/c", 2), ("p/b/d", 3), ("q/a", 4)]:
        store.put_bytes(key, b"x" * size)

    assert store.list("p") == [ObjectInfo("p/a", 1), ObjectInfo("p/b/c", 2), ObjectInfo("p/b/d", 3)]
    assert store.list("p", recursive=False) == [ObjectInfo("p/a", 1)]
    assert [o.key for o in store.list("")] == ["p/a", "p/b/c", "p/b/d", "q/a"]
    assert store.list("nothing") == []

    assert store.exists("p/a")
    store.delete("p/a")
    assert not store.exists("p/a")
    store.delete("p/a")  # deleting twice is not an error

    assert store.delete_prefix("p") == 2
    assert store.list("p") == []
    assert store.delete_prefix("p") == 0
    assert store.get_bytes("q/a") == b"xxxx"


@pytest.mark.parametrize("key", ["/abs", "a/../b", "a//b", "a/", "", "./a", "a/./b"])
def test_invalid_keys_are_rejected_before_any_request(store, key, tmp_path):
    for call in (
        lambda: store.put_bytes(key, b"x"),
        lambda: store.get_bytes(key),
        lambda: store.get_file(key, tmp_path / "f"),
        lambda: store.exists(key),
        lambda: store.delete(key),
        lambda: store.presigned_get_url(key),
    ):
        with pytest.raises(InvalidArgument) as err:
            call()
        assert err.value.violations[0].field == "key"
    with pytest.raises(InvalidArgument) as err:
        store.upload_dir(key, tmp_path)
    assert err.value.violations[0].field == "prefix"


def test_invalid_settings_name_the_field(s3_settings):
    with pytest.raises(InvalidArgument) as err:
        S3ArtifactStore(s3_settings.model_copy(update={"part_size": MiB}))
    assert err.value.violations[0].field == "s3.part_size"
    with pytest.raises(InvalidArgument) as err:
        S3ArtifactStore(s3_settings.model_copy(update={"endpoint": "http://127.0.0.1:9000"}))
    assert err.value.violations[0].field == "s3.endpoint"


def test_manifest_from_store_matches_the_json_on_disk(store, tmp_path):
    _write(tmp_path / "d" / "f.txt", b"hello")
    manifest = store.upload_dir("v/1", tmp_path / "d")
    assert Manifest.from_json(store.get_bytes("v/1/manifest.json")) == manifest
