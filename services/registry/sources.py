"""Where an import comes from: parsing source URIs and fetching them into a local folder.

Schemes: a local directory or ``.gguf`` file (optionally ``file://``), ``s3://bucket/prefix``,
``hf://org/name[@revision]`` (huggingface_hub, honouring the configured endpoint and token),
``modelscope://org/name[@revision]`` (the modelscope client, when installed).

Local sources are read only under the import policy's roots and S3 sources only from its buckets
(:class:`ImportPolicy`, from ``YARD_REGISTRY_IMPORTS__*``); a refused source gets one error
(SOURCE_NOT_ALLOWED) whether it is missing, outside the roots or unreadable.
"""

from __future__ import annotations

import importlib.util
import re
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.core.artifacts import S3ArtifactStore, manifest_key
from services.core.errors import (
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from services.core.local_paths import NOT_ALLOWED, LocalPathPolicy, check_folder_links
from services.core.logging import get_logger

from .settings import ALLOWED_BUCKETS_SETTING, ALLOWED_ROOTS_SETTING, RegistrySettings

log = get_logger(__name__)

_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
# Only safetensors weights and the small files around them are fetched from a hub.
HUB_IGNORE = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.onnx_data", "*.gguf",
              "*.tflite", "*.ot", "original/*", "onnx/*", "openvino/*"]

Progress = Callable[[int, int], None]  # (bytes_done, bytes_total)


@dataclass(frozen=True)
class Source:
    scheme: str  # local | gguf | s3 | hf | modelscope
    uri: str
    path: Path | None = None
    bucket: str = ""
    prefix: str = ""
    repo: str = ""
    revision: str | None = None


@dataclass(frozen=True)
class ImportPolicy:
    """Where imports may read: local roots (real paths; none: local imports disabled) and S3 buckets ("*": any).
    Fixed when the registry starts and copied into each import's spec, so the import child checks again with
    exactly the roots the request was checked with."""

    local: LocalPathPolicy
    buckets: tuple[str, ...]

    @classmethod
    def from_settings(cls, settings: RegistrySettings) -> ImportPolicy:
        local = LocalPathPolicy.effective(settings.imports.allowed_roots, settings.grpc.host, ALLOWED_ROOTS_SETTING)
        return cls(local, tuple(settings.imports.allowed_buckets or [settings.s3.bucket]))

    def to_dict(self) -> dict[str, Any]:
        return {"local": self.local.to_dict(), "buckets": list(self.buckets)}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> ImportPolicy:
        return cls(LocalPathPolicy.from_dict(doc.get("local") or {}), tuple(doc.get("buckets") or ()))

    def check_bucket(self, uri: str, bucket: str) -> None:
        if "*" not in self.buckets and bucket not in self.buckets:
            raise InvalidArgument.for_field(
                "source_uri", f"{uri!r} is not an allowed S3 source: its bucket must be one of the registry's "
                f"allowed import buckets ({ALLOWED_BUCKETS_SETTING})", reason=NOT_ALLOWED, metadata={"path": uri})


_LOCAL_WHAT = "a model folder or .gguf file"


def parse_source(uri: str, policy: ImportPolicy) -> Source:
    """Parse and check ``uri`` (the ``source_uri`` field) without fetching anything: the scheme's syntax, the
    S3 bucket against the allowed buckets, a local path against the allowed roots (realpath, no ``~``), and a
    local folder's symbolic links (none may lead outside the folder)."""
    uri = (uri or "").strip()
    if not uri:
        raise InvalidArgument.for_field("source_uri", "is required")
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[5:].partition("/")
        prefix = prefix.strip("/")
        if not bucket or not prefix:
            raise InvalidArgument.for_field("source_uri", f"{uri!r}: expected s3://bucket/prefix")
        policy.check_bucket(uri, bucket)
        return Source("s3", uri, bucket=bucket, prefix=prefix)
    for scheme in ("hf", "modelscope"):
        if uri.startswith(f"{scheme}://"):
            repo, _, revision = uri[len(scheme) + 3:].partition("@")
            if not _REPO_RE.match(repo):
                raise InvalidArgument.for_field("source_uri", f"{uri!r}: expected {scheme}://org/name[@revision]")
            if scheme == "modelscope" and importlib.util.find_spec("modelscope") is None:
                raise FailedPrecondition(
                    "modelscope client not installed (pip install modelscope) so modelscope:// sources cannot be "
                    "imported", reason="MODELSCOPE_NOT_INSTALLED",
                )
            return Source(scheme, uri, repo=repo, revision=revision or None)
    if "://" in uri and not uri.startswith("file://"):
        raise InvalidArgument.for_field(
            "source_uri", f"{uri!r}: unknown scheme; use a local path, s3://, hf:// or modelscope://")
    path, st = policy.local.resolve(uri.removeprefix("file://"), field="source_uri", what=_LOCAL_WHAT, given=uri)
    if stat.S_ISREG(st.st_mode):
        if path.suffix != ".gguf":
            raise InvalidArgument.for_field(
                "source_uri", f"{uri!r} is a file but not a .gguf; import a model folder or a GGUF file")
        return Source("gguf", uri, path=path)
    check_folder_links(path, field="source_uri", given=uri)
    return Source("local", uri, path=path)


def fetch(source: Source, staging: Path, settings: RegistrySettings, progress: Progress) -> Path:
    """Make ``source`` available as a local model folder (files under ``staging`` when copied)."""
    if source.scheme == "local":
        assert source.path is not None
        return source.path
    dest = staging / "model"
    if source.scheme == "gguf":
        assert source.path is not None
        _convert_gguf(source.path, dest)
    elif source.scheme == "s3":
        _fetch_s3(source, dest, settings, progress)
    elif source.scheme == "hf":
        _fetch_hub(source, dest, settings)
    else:
        _fetch_modelscope(source, dest)
    return dest


def _convert_gguf(path: Path, dest: Path) -> None:
    cmd = [sys.executable, "-m", "services.registry.gguf_convert", str(path), str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        detail = lines[-1] if lines else f"exit code {proc.returncode}"
        raise InvalidArgument.for_field("source_uri", f"GGUF conversion of {path.name} failed: {detail}",
                                        reason="GGUF_CONVERSION_FAILED")


def _fetch_s3(source: Source, dest: Path, settings: RegistrySettings, progress: Progress) -> None:
    store = S3ArtifactStore(settings.s3.model_copy(update={"bucket": source.bucket}))
    if store.exists(manifest_key(source.prefix)):
        store.download_dir(source.prefix, dest)
        return
    objects = store.list(source.prefix)
    if not objects:
        raise NotFound(f"no objects under {source.uri}", reason="SOURCE_NOT_FOUND", metadata={"source_uri": source.uri})
    total, done = sum(o.size for o in objects), 0
    for obj in objects:
        store.get_file(obj.key, dest / obj.key[len(source.prefix) + 1:])
        done += obj.size
        progress(done, total)


def _fetch_hub(source: Source, dest: Path, settings: RegistrySettings) -> None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    token = settings.hf_token.get_secret_value() if settings.hf_token else False
    try:
        snapshot_download(
            source.repo, revision=source.revision, local_dir=dest, endpoint=settings.hf_endpoint.rstrip("/"),
            token=token, ignore_patterns=HUB_IGNORE, max_workers=4,
        )
    except GatedRepoError as exc:
        raise PermissionDenied(f"{source.uri}: gated repository, set an HF token with access: {exc}",
                               reason="SOURCE_ACCESS_DENIED") from None
    except RepositoryNotFoundError:
        raise NotFound(f"{source.uri}: repository not found at {settings.hf_endpoint}", reason="SOURCE_NOT_FOUND",
                       metadata={"source_uri": source.uri}) from None
    except RevisionNotFoundError:
        raise NotFound(f"{source.uri}: revision {source.revision!r} not found", reason="SOURCE_NOT_FOUND",
                       metadata={"source_uri": source.uri}) from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise Unavailable(f"{source.uri}: hub at {settings.hf_endpoint} failed: {exc}",
                          reason="SOURCE_UNAVAILABLE") from None


def _fetch_modelscope(source: Source, dest: Path) -> None:
    from modelscope import snapshot_download as modelscope_download

    try:
        modelscope_download(source.repo, revision=source.revision, local_dir=str(dest),
                            ignore_file_pattern=HUB_IGNORE)
    except DomainError:
        raise
    except Exception as exc:  # noqa: BLE001 - the modelscope client raises plain exceptions
        raise Unavailable(f"{source.uri}: modelscope download failed: {exc}", reason="SOURCE_UNAVAILABLE") from None


def model_files(folder: Path) -> list[Path]:
    """Files of a model folder to store: hidden files and folders (.git, .cache) left out."""
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
