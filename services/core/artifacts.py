"""Artifact store over any S3 API (MinIO in production, nanio on loopback locally).

Every object written here carries its sha256 as object metadata (``x-amz-meta-sha256``);
every read verifies size and sha256 before the bytes are handed out. A directory is stored
as ``{prefix}/files/{relpath}`` objects plus ``{prefix}/manifest.json``, written last, so a
reader that finds the manifest finds every file it names.

The API is synchronous; async callers use ``asyncio.to_thread``. Callers only ever see
``services.core.errors`` types, never a minio/urllib3 exception.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar

import certifi
import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError
from minio.helpers import MAX_MULTIPART_COUNT, MAX_PART_SIZE, MIN_PART_SIZE, check_bucket_name

from services.core.errors import (
    DataLoss,
    DomainError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from services.core.logging import get_logger
from services.core.settings import S3Settings

log = get_logger(__name__)

T = TypeVar("T")

SHA256_META = "sha256"  # stored as x-amz-meta-sha256
_SHA256_HEADER = "x-amz-meta-sha256"
MANIFEST_NAME = "manifest.json"
FILES_DIR = "files"
MANIFEST_VERSION = 1

# The urllib3 client never retries on its own (our loop does, with settings' backoff) and gives
# up connecting quickly, so an unreachable endpoint fails within seconds, not minutes.
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 120.0
_CHUNK = 1024 * 1024
_MAX_KEY_BYTES = 1024
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken"}
_CONFLICT_CODES = {"XMinioParentIsObject", "XMinioObjectExistsAsDirectory"}
# MinIO answers 503 XMinioServerNotInitialized while it starts; a load balancer in front of S3 answers
# 502/503/504 (often with an HTML body, which minio-py raises as InvalidResponseError) while the server restarts.
_TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "RequestTimeout", "XMinioServerNotInitialized"}
_TRANSIENT_STATUS = {502, 503, 504}


# --------------------------------------------------------------------------------------------
# Value types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    """One stored file: its path (key or path relative to a manifest), size and sha256 (hex)."""

    path: str
    size: int
    sha256: str


@dataclass
class Manifest:
    """The files of one stored version (a model, an adapter, a dataset...)."""

    files: list[FileEntry]

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def find(self, path: str) -> FileEntry | None:
        """The entry for ``path``, or None."""
        return next((f for f in self.files if f.path == path), None)

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": MANIFEST_VERSION,
                "total_size": self.total_size,
                "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
            },
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse and validate a manifest; InvalidArgument names the offending field."""
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidArgument.for_field("manifest", f"not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise InvalidArgument.for_field("manifest", "must be a JSON object")
        version = doc.get("version", MANIFEST_VERSION)
        if version != MANIFEST_VERSION:
            raise InvalidArgument.for_field("manifest.version", f"unsupported version {version!r}")
        raw_files = doc.get("files")
        if not isinstance(raw_files, list):
            raise InvalidArgument.for_field("manifest.files", "must be a list")
        files: list[FileEntry] = []
        seen: set[str] = set()
        for i, item in enumerate(raw_files):
            where = f"manifest.files[{i}]"
            if not isinstance(item, dict):
                raise InvalidArgument.for_field(where, "must be an object with path, size, sha256")
            path, size, sha = item.get("path"), item.get("size"), item.get("sha256")
            if not isinstance(path, str):
                raise InvalidArgument.for_field(f"{where}.path", "must be a string")
            problem = key_problem(path)
            if problem:
                raise InvalidArgument.for_field(f"{where}.path", f"{path!r}: {problem}")
            if path in seen:
                raise InvalidArgument.for_field(f"{where}.path", f"duplicate path {path!r}")
            seen.add(path)
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidArgument.for_field(f"{where}.size", f"must be a non-negative integer, got {size!r}")
            if not isinstance(sha, str) or not _SHA256_RE.match(sha):
                raise InvalidArgument.for_field(f"{where}.sha256", f"must be 64 lowercase hex digits, got {sha!r}")
            files.append(FileEntry(path, size, sha))
        total = doc.get("total_size")
        manifest = cls(files)
        if total is not None and total != manifest.total_size:
            raise InvalidArgument.for_field(
                "manifest.total_size", f"is {total!r} but the files add up to {manifest.total_size}"
            )
        return manifest


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


class ArtifactStore(Protocol):
    """What domain code needs from artifact storage (S3ArtifactStore, or a fake in unit tests)."""

    def ensure_bucket(self) -> None: ...
    def put_file(self, key: str, local_path: Path, content_type: str = ...) -> FileEntry: ...
    def get_file(self, key: str, dest: Path, expected: FileEntry | None = None) -> FileEntry: ...
    def put_bytes(self, key: str, data: bytes, content_type: str = ...) -> FileEntry: ...
    def get_bytes(self, key: str, expected: FileEntry | None = None) -> bytes: ...
    def put_stream(self, key: str, stream: BinaryIO | Iterable[bytes], content_type: str = ...) -> FileEntry: ...
    def upload_dir(self, prefix: str, local_dir: Path) -> Manifest: ...
    def download_dir(self, prefix: str, dest: Path, manifest: Manifest | None = None) -> Manifest: ...
    def read_manifest(self, prefix: str) -> Manifest: ...
    def presigned_get_url(self, key: str, expires: timedelta = ...) -> str: ...
    def list(self, prefix: str, recursive: bool = True) -> list[ObjectInfo]: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> int: ...


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


def key_problem(key: str) -> str | None:
    """Why ``key`` is not a valid artifact key (or relative manifest path), or None if it is."""
    if not key:
        return "must not be empty"
    if len(key.encode("utf-8")) > _MAX_KEY_BYTES:
        return f"must be at most {_MAX_KEY_BYTES} bytes"
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        return "must not contain control characters"
    if key.startswith("/"):
        return "must not start with '/'"
    if "\\" in key:
        return "must use '/' as separator, not '\\'"
    for segment in key.split("/"):
        if segment == "":
            return "must not contain an empty segment ('//' or a trailing '/')"
        if segment in (".", ".."):
            return f"must not contain a {segment!r} segment"
    if key.startswith(".nanio"):
        return "must not start with '.nanio' (reserved by the S3 server)"
    return None


def _check_key(key: str, field: str = "key") -> str:
    if not isinstance(key, str):
        raise InvalidArgument.for_field(field, f"must be a string, got {type(key).__name__}")
    problem = key_problem(key)
    if problem:
        raise InvalidArgument.for_field(field, f"{key!r} {problem}")
    return key


def manifest_key(prefix: str) -> str:
    return f"{prefix}/{MANIFEST_NAME}"


def file_key(prefix: str, relpath: str) -> str:
    return f"{prefix}/{FILES_DIR}/{relpath}"


# --------------------------------------------------------------------------------------------
# Hashing helpers
# --------------------------------------------------------------------------------------------


class _ChunkReader(io.RawIOBase):
    """An iterator of byte chunks as a readable file."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buf) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buf += bytes(chunk)
        if size < 0:
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:size], self._buf[size:]
        return out


def _mismatch(
    key: str, expected: FileEntry | None, stored_sha: str | None, size: int, sha: str, want_size: int | None
) -> DataLoss | None:
    """A DataLoss if the received (size, sha) differ from what is expected, else None."""
    want_sha = expected.sha256 if expected else stored_sha
    if want_size is not None and size != want_size:
        return DataLoss(
            f"artifact {key!r} is {size} bytes but {want_size} were expected (expected sha256 {want_sha}, got {sha})",
            reason="CHECKSUM_MISMATCH",
            metadata={
                "key": key,
                "expected_size": str(want_size),
                "actual_size": str(size),
                "expected_sha256": str(want_sha),
                "actual_sha256": sha,
            },
        )
    if sha != want_sha:
        return DataLoss(
            f"artifact {key!r} failed checksum verification: expected sha256 {want_sha}, got {sha}",
            reason="CHECKSUM_MISMATCH",
            metadata={"key": key, "expected_sha256": str(want_sha), "actual_sha256": sha},
        )
    return None


# --------------------------------------------------------------------------------------------
# The S3 store
# --------------------------------------------------------------------------------------------


class S3ArtifactStore:
    """ArtifactStore over the ``minio`` client. Thread-safe; one per process is enough."""

    def __init__(self, settings: S3Settings) -> None:
        """Builds the client; no network call happens here."""
        self._settings = settings
        self._bucket = settings.bucket
        self._endpoint = settings.endpoint
        if "://" in settings.endpoint or not settings.endpoint:
            raise InvalidArgument.for_field(
                "s3.endpoint", f"must be host:port without scheme, got {settings.endpoint!r}"
            )
        try:
            check_bucket_name(settings.bucket, strict=True)
        except ValueError as exc:
            raise InvalidArgument.for_field("s3.bucket", f"{settings.bucket!r}: {exc}") from None
        if not MIN_PART_SIZE <= settings.part_size <= MAX_PART_SIZE:
            raise InvalidArgument.for_field(
                "s3.part_size",
                f"must be between {MIN_PART_SIZE} (5 MiB) and {MAX_PART_SIZE} (5 GiB) bytes, got {settings.part_size}",
            )
        if settings.multipart_threshold < 1:
            raise InvalidArgument.for_field("s3.multipart_threshold", "must be positive")
        if settings.connect_retries < 0:
            raise InvalidArgument.for_field("s3.connect_retries", "must be >= 0")
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S),
            retries=False,
            maxsize=10,
            cert_reqs="CERT_REQUIRED",
            ca_certs=certifi.where(),
        )
        try:
            self._client = Minio(
                settings.endpoint,
                access_key=settings.access_key,
                secret_key=settings.secret_key.get_secret_value(),
                secure=settings.secure,
                region=settings.region,
                http_client=http,
            )
        except ValueError as exc:
            raise InvalidArgument.for_field("s3.endpoint", f"{settings.endpoint!r}: {exc}") from None

    @classmethod
    def connect(cls, settings: S3Settings) -> S3ArtifactStore:
        """A store whose bucket exists (created if missing)."""
        store = cls(settings)
        store.ensure_bucket()
        return store

    @property
    def bucket(self) -> str:
        return self._bucket

    # ---------------------------------------------------------------- bucket

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist yet."""

        def run() -> bool:
            if self._client.bucket_exists(self._bucket):
                return False
            try:
                self._client.make_bucket(self._bucket)
            except S3Error as exc:
                if exc.code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    return False
                raise
            return True

        if self._call("ensure_bucket", None, run):
            log.info("bucket_created", bucket=self._bucket, endpoint=self._endpoint)

    # ---------------------------------------------------------------- single objects

    def put_file(self, key: str, local_path: Path, content_type: str = "application/octet-stream") -> FileEntry:
        """Upload a local file (multipart at or above settings.multipart_threshold)."""
        _check_key(key)
        local_path = Path(local_path)
        if not local_path.is_file():
            raise InvalidArgument.for_field("local_path", f"{str(local_path)!r} is not a file")
        try:
            f = open(local_path, "rb")  # noqa: SIM115 - closed by the with below (open errors mapped apart)
        except OSError as exc:
            raise InvalidArgument.for_field("local_path", f"cannot read {str(local_path)!r}: {exc.strerror}") from None
        with f:
            sha = hashlib.file_digest(f, "sha256").hexdigest()
            size = os.fstat(f.fileno()).st_size
            return self._upload(key, f, size, sha, content_type)

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> FileEntry:
        _check_key(key)
        return self._upload(key, io.BytesIO(data), len(data), hashlib.sha256(data).hexdigest(), content_type)

    def put_stream(
        self, key: str, stream: BinaryIO | Iterable[bytes], content_type: str = "application/octet-stream"
    ) -> FileEntry:
        """Upload a stream of unknown length, hashing it as it is read.

        The stream is spooled to a local temporary file while hashing: the sha256 has to be sent
        with the object's metadata when the upload starts, and S3 servers such as nanio offer no
        way to set metadata afterwards. The spool also makes the upload retryable.
        """
        _check_key(key)
        reader: Any = stream if hasattr(stream, "read") else _ChunkReader(iter(stream))
        digest = hashlib.sha256()
        size = 0
        with tempfile.TemporaryFile(prefix="yard-upload-") as spool:
            while chunk := reader.read(_CHUNK):
                digest.update(chunk)
                spool.write(chunk)
                size += len(chunk)
            spool.flush()
            return self._upload(key, spool, size, digest.hexdigest(), content_type)

    def _upload(self, key: str, data: BinaryIO, size: int, sha: str, content_type: str) -> FileEntry:
        if size >= self._settings.multipart_threshold or size > MAX_PART_SIZE:
            # Never more than S3's 10 000 parts, whatever part_size says.
            min_part = math.ceil(size / MAX_MULTIPART_COUNT / MIN_PART_SIZE) * MIN_PART_SIZE
            part_size = max(self._settings.part_size, min_part)
        else:
            part_size = max(size, MIN_PART_SIZE)  # one part = a single PUT
        multipart = size > part_size
        start = time.monotonic()

        def run() -> None:
            data.seek(0)
            self._client.put_object(
                self._bucket,
                key,
                data,
                size,
                content_type=content_type,
                metadata={SHA256_META: sha},
                part_size=part_size,
            )

        self._call("upload", key, run)
        seconds = time.monotonic() - start
        log.info("artifact_uploaded", key=key, size=size, seconds=round(seconds, 3), multipart=multipart)
        return FileEntry(key, size, sha)

    def get_file(self, key: str, dest: Path, expected: FileEntry | None = None) -> FileEntry:
        """Download to ``dest`` through a temp file next to it; verified, then atomically renamed.

        Verifies size and sha256 against ``expected``, else against the sha256 stored with the
        object. On a mismatch raises DataLoss; the temp file is removed and ``dest`` is untouched.
        """
        _check_key(key)
        dest = Path(dest)
        if dest.is_dir():
            raise InvalidArgument.for_field("dest", f"{str(dest)!r} is a directory")
        dest.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()

        def run() -> FileEntry:
            tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:12]}.part"
            try:
                with open(tmp, "wb") as out:
                    entry = self._stream_verified(key, expected, out.write)
                os.replace(tmp, dest)
                return entry
            finally:
                tmp.unlink(missing_ok=True)

        entry = self._call("download", key, run)
        log.info("artifact_downloaded", key=key, size=entry.size, seconds=round(time.monotonic() - start, 3))
        return entry

    def get_bytes(self, key: str, expected: FileEntry | None = None) -> bytes:
        """The object's bytes, verified like get_file."""
        _check_key(key)

        def run() -> bytes:
            buf = bytearray()
            self._stream_verified(key, expected, buf.extend)
            return bytes(buf)

        return self._call("download", key, run)

    def _stream_verified(self, key: str, expected: FileEntry | None, sink: Callable[[bytes], Any]) -> FileEntry:
        response = self._client.get_object(self._bucket, key)
        try:
            stored_sha = response.headers.get(_SHA256_HEADER)
            if expected is None and not stored_sha:
                raise FailedPrecondition(
                    f"artifact {key!r} has no stored sha256 and no expected checksum was given, so it "
                    "cannot be verified (it was not written by the artifact store)",
                    reason="CHECKSUM_MISSING",
                    metadata={"key": key},
                )
            length = response.headers.get("content-length")
            want_size = expected.size if expected else (int(length) if length else None)
            digest = hashlib.sha256()
            size = 0
            for chunk in response.stream(_CHUNK):
                digest.update(chunk)
                sink(chunk)
                size += len(chunk)
        finally:
            response.close()
            response.release_conn()
        sha = digest.hexdigest()
        err = _mismatch(key, expected, stored_sha, size, sha, want_size)
        if err:
            log.warning(
                "artifact_checksum_mismatch",
                key=key,
                expected_sha256=err.metadata["expected_sha256"],
                actual_sha256=sha,
                size=size,
            )
            raise err
        return FileEntry(key, size, sha)

    # ---------------------------------------------------------------- directories

    def upload_dir(self, prefix: str, local_dir: Path) -> Manifest:
        """Upload every file under ``local_dir`` to ``{prefix}/files/...``, then the manifest."""
        _check_key(prefix, "prefix")
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise InvalidArgument.for_field("local_dir", f"{str(local_dir)!r} is not a directory")
        start = time.monotonic()
        paths = sorted(p for p in local_dir.rglob("*") if p.is_file())
        entries: list[FileEntry] = []
        for path in paths:
            rel = path.relative_to(local_dir).as_posix()
            _check_key(rel, "local_dir file")
            stored = self.put_file(file_key(prefix, rel), path)
            entries.append(FileEntry(rel, stored.size, stored.sha256))
        manifest = Manifest(entries)
        self.put_bytes(manifest_key(prefix), manifest.to_json().encode(), content_type="application/json")
        log.info(
            "directory_uploaded",
            prefix=prefix,
            files=len(entries),
            size=manifest.total_size,
            seconds=round(time.monotonic() - start, 3),
        )
        return manifest

    def download_dir(self, prefix: str, dest: Path, manifest: Manifest | None = None) -> Manifest:
        """Download and verify every file of the manifest (read from S3 unless given) into ``dest``.

        A file that fails verification raises DataLoss and is never written to ``dest``.
        """
        _check_key(prefix, "prefix")
        dest = Path(dest)
        manifest = manifest if manifest is not None else self.read_manifest(prefix)
        start = time.monotonic()
        for entry in manifest.files:
            _check_key(entry.path, "manifest.files.path")
            self.get_file(file_key(prefix, entry.path), dest / entry.path, expected=entry)
        log.info(
            "directory_downloaded",
            prefix=prefix,
            files=len(manifest.files),
            size=manifest.total_size,
            seconds=round(time.monotonic() - start, 3),
        )
        return manifest

    def read_manifest(self, prefix: str) -> Manifest:
        """The manifest stored at ``{prefix}/manifest.json``; NotFound if there is none."""
        _check_key(prefix, "prefix")
        key = manifest_key(prefix)
        try:
            data = self.get_bytes(key)
        except NotFound as exc:
            if exc.reason != "ARTIFACT_NOT_FOUND":
                raise
            raise NotFound(
                f"no manifest at {key!r} in bucket {self._bucket!r}", reason="ARTIFACT_NOT_FOUND", metadata={"key": key}
            ) from None
        try:
            return Manifest.from_json(data)
        except InvalidArgument as exc:
            raise DataLoss(
                f"manifest {key!r} is invalid: {exc.message}", reason="MANIFEST_INVALID", metadata={"key": key}
            ) from None

    # ---------------------------------------------------------------- listing, urls, deletion

    def presigned_get_url(self, key: str, expires: timedelta = timedelta(hours=1)) -> str:
        """A URL anyone can GET the object from until ``expires`` (1 second to 7 days)."""
        _check_key(key)
        if not timedelta(seconds=1) <= expires <= timedelta(days=7):
            raise InvalidArgument.for_field("expires", f"must be between 1 second and 7 days, got {expires}")
        return self._call("presign", key, lambda: self._client.presigned_get_object(self._bucket, key, expires))

    def list(self, prefix: str, recursive: bool = True) -> list[ObjectInfo]:
        """Objects under ``prefix/`` ("" = the whole bucket), sorted by key.

        Non-recursive lists only the objects directly under the prefix (no sub-"folders").
        """
        if prefix:
            _check_key(prefix, "prefix")
        s3_prefix = f"{prefix}/" if prefix else None

        def run() -> list[ObjectInfo]:
            objs = self._client.list_objects(self._bucket, prefix=s3_prefix, recursive=recursive)
            return [ObjectInfo(o.object_name, int(o.size or 0)) for o in objs if not o.is_dir and o.object_name]

        return sorted(self._call("list", prefix or None, run), key=lambda o: o.key)

    def exists(self, key: str) -> bool:
        _check_key(key)

        def run() -> bool:
            try:
                self._client.stat_object(self._bucket, key)
            except S3Error as exc:
                if exc.code == "NoSuchKey":
                    return False
                raise
            return True

        return self._call("stat", key, run)

    def delete(self, key: str) -> None:
        """Delete one object (deleting a missing key is not an error, as in S3)."""
        _check_key(key)
        self._call("delete", key, lambda: self._client.remove_object(self._bucket, key))
        log.info("artifact_deleted", key=key)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix/``; returns how many were deleted."""
        _check_key(prefix, "prefix")
        keys = [o.key for o in self.list(prefix)]
        if not keys:
            return 0

        def run() -> None:
            for i in range(0, len(keys), 1000):
                errors = list(self._client.remove_objects(self._bucket, [DeleteObject(k) for k in keys[i : i + 1000]]))
                if errors:
                    first = errors[0]
                    raise Internal(
                        f"could not delete {len(errors)} objects under {prefix!r}, first {first.name!r}: "
                        f"{first.code} {first.message}",
                        reason="S3_ERROR",
                    )

        self._call("delete", prefix, run)
        log.info("prefix_deleted", prefix=prefix, objects=len(keys))
        return len(keys)

    # ---------------------------------------------------------------- retries and error mapping

    def _call(self, op: str, key: str | None, fn: Callable[[], T]) -> T:
        """Run ``fn`` with retries (exponential backoff) on transport errors; map every failure to a DomainError."""
        attempts = self._settings.connect_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except DomainError:
                raise
            except Exception as exc:  # noqa: BLE001 - every client failure is translated below
                if not _is_transient(exc):
                    raise self._translate(op, key, exc) from None
                if attempt == attempts:
                    raise Unavailable(
                        f"S3 endpoint {self._endpoint} unreachable after {attempts} attempts: {_describe(exc)}",
                        reason="S3_UNAVAILABLE",
                        metadata={"endpoint": self._endpoint, "attempts": str(attempts)},
                    ) from None
                delay = self._settings.retry_backoff_s * 2 ** (attempt - 1)
                log.warning(
                    "s3_request_retry",
                    op=op,
                    key=key,
                    endpoint=self._endpoint,
                    attempt=attempt,
                    delay_s=delay,
                    error=_describe(exc),
                )
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _translate(self, op: str, key: str | None, exc: Exception) -> DomainError:
        where = f"{key!r} in bucket {self._bucket!r}" if key else f"bucket {self._bucket!r}"
        meta = {"bucket": self._bucket, **({"key": key} if key else {})}
        if isinstance(exc, S3Error):
            code = exc.code or ""
            if code == "NoSuchKey":
                return NotFound(f"artifact {where} not found", reason="ARTIFACT_NOT_FOUND", metadata=meta)
            if code == "NoSuchBucket":
                return NotFound(
                    f"bucket {self._bucket!r} does not exist on S3 endpoint {self._endpoint}",
                    reason="BUCKET_NOT_FOUND",
                    metadata=meta,
                )
            if code in _CREDENTIAL_CODES:
                cls = PermissionDenied if code == "AccessDenied" else Unauthenticated
                return cls(
                    f"S3 endpoint {self._endpoint} rejected the credentials of access key "
                    f"{self._settings.access_key!r} ({code}) during {op} of {where}; check s3.access_key and "
                    "s3.secret_key",
                    reason="S3_CREDENTIALS_REJECTED",
                    metadata={"endpoint": self._endpoint, "access_key": self._settings.access_key, "s3_code": code},
                )
            if code in _CONFLICT_CODES or (op == "upload" and code == "InternalError"):
                conflict = self._conflicting_key(key) if key else None
                if conflict or code in _CONFLICT_CODES:
                    return FailedPrecondition(
                        f"key {key!r} conflicts with existing object {conflict or '(a parent or child key)'!r}: "
                        "a key can never also be the folder of another key",
                        reason="ARTIFACT_KEY_CONFLICT",
                        metadata={**meta, "conflict": conflict or ""},
                    )
            return Internal(f"S3 {op} of {where} failed: {code}: {exc.message}", reason="S3_ERROR", metadata=meta)
        if isinstance(exc, ValueError):
            return InvalidArgument(f"S3 {op} of {where}: {exc}", reason="INVALID_ARGUMENT", metadata=meta)
        if isinstance(exc, (ServerError, InvalidResponseError)):
            return Internal(f"S3 {op} of {where} failed: {exc}", reason="S3_ERROR", metadata=meta)
        log.error("s3_unexpected_error", op=op, key=key, error_type=type(exc).__name__, error=str(exc))
        return Internal(f"S3 {op} of {where} failed ({type(exc).__name__})", reason="S3_ERROR", metadata=meta)

    def _conflicting_key(self, key: str) -> str | None:
        """An existing key that is a parent "folder" of ``key`` or lives under ``key/``, if any."""
        parts = key.split("/")
        try:
            for i in range(1, len(parts)):
                if self.exists(parent := "/".join(parts[:i])):
                    return parent
            below = self.list(key)
        except DomainError:  # best-effort diagnosis only
            return None
        return below[0].key if below else None


def _is_transient(exc: Exception) -> bool:
    if isinstance(exc, urllib3.exceptions.HTTPError):  # connect/read errors, timeouts, resets
        return True
    if isinstance(exc, ServerError):
        return exc.status_code in _TRANSIENT_STATUS
    if isinstance(exc, InvalidResponseError):  # a non-XML error answer; minio-py keeps its status in _code
        return getattr(exc, "_code", None) in _TRANSIENT_STATUS
    if isinstance(exc, S3Error):
        return exc.code in _TRANSIENT_CODES or getattr(exc.response, "status", None) in _TRANSIENT_STATUS
    return isinstance(exc, ConnectionError)


def _describe(exc: Exception) -> str:
    """A one-line cause without urllib3's connection-object prefix."""
    text = str(exc).split("): ", 1)[-1] if isinstance(exc, urllib3.exceptions.HTTPError) else str(exc)
    return text or type(exc).__name__
