"""The import job kind (``registry.import``): runs in a child process of a registry replica's worker.

``run(ctx)`` fetches the source into the attempt's workdir (GGUF conversion in its own process),
validates and inspects the folder, uploads the files with progress under the version's reserved
artifact prefix, writes the manifest and marks the version READY. It opens the registry database and
S3 itself: non-secret settings come in the spec, the database URL and credentials in the environment
the worker gives its children.

A re-run (attempt > 1 after a replica died) starts over; an attempt that finds the version already
READY returns at once. On a failure it sees, the child removes the half-made version and its files
before reporting the error, so a FAILED import leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from services.core.artifacts import FileEntry, Manifest, S3ArtifactStore, file_key, manifest_key
from services.core.db import Database
from services.core.errors import DomainError
from services.core.jobs.context import JobContext
from services.core.settings import S3Settings

from .imports import (
    ENV_DB_URL,
    ENV_HF_TOKEN,
    ENV_S3_ACCESS_KEY,
    ENV_S3_SECRET_KEY,
    STAGES,
    abandoned,
    discard_version,
    mark_ready,
    version_state,
)
from .inspection import detect_format, validate_and_inspect
from .records import VersionState
from .settings import RegistrySettings
from .sources import ImportPolicy, fetch, model_files, parse_source

DOMAIN = "modelyard.registry"
# Stage -> (start, end) of the overall fraction.
_FRACTIONS = {"fetching": (0.0, 0.4), "converting": (0.0, 0.4), "validating": (0.4, 0.5), "uploading": (0.5, 0.99),
              "done": (1.0, 1.0)}


class _Progress:
    """Reports stage changes and byte progress (at most about one event per percent)."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.stage = ""
        self.last = -1.0

    def __call__(self, stage: str, done: int = 0, total: int = 0) -> None:
        lo, hi = _FRACTIONS[stage]
        fraction = round(lo + (hi - lo) * (done / total if total else 0.0), 4)
        step = STAGES.index(stage)
        if stage != self.stage:
            self.stage = stage
            self.ctx.log("import stage", stage=stage)
        elif fraction - self.last < 0.01 and done != total:
            return
        self.last = fraction
        self.ctx.progress(fraction=fraction, step=step, total_steps=len(STAGES) - 1)
        if total:
            self.ctx.metrics(step=step, bytes_done=done, bytes_total=total)


def _settings(spec: dict[str, Any]) -> RegistrySettings:
    s3 = S3Settings(**spec["s3"], access_key=os.environ.get(ENV_S3_ACCESS_KEY, ""),
                    secret_key=SecretStr(os.environ.get(ENV_S3_SECRET_KEY, "")))
    token = os.environ.get(ENV_HF_TOKEN)
    return RegistrySettings(s3=s3, hf_endpoint=spec["hf_endpoint"], hf_token=SecretStr(token) if token else None)


def run(ctx: JobContext) -> dict[str, Any]:
    spec = ctx.spec
    settings = _settings(spec)
    db = Database(os.environ[ENV_DB_URL])
    store = S3ArtifactStore(settings.s3)
    try:
        state = version_state(db, spec)
        if state == VersionState.READY:
            ctx.log("version already ready", version=spec["model_version"])
            return {"model_version": spec["model_version"]}
        if state is None:
            raise abandoned(spec)
        try:
            _import(ctx, db, store, settings)
        except Exception as exc:
            discard_version(db, store, spec)
            if isinstance(exc, DomainError) and exc.domain == "modelyard":
                exc.domain = DOMAIN  # as the registry's interceptor does for errors of its RPCs
            raise
        return {"model_version": spec["model_version"]}
    finally:
        db.dispose()


def _import(ctx: JobContext, db: Database, store: S3ArtifactStore, settings: RegistrySettings) -> None:
    spec = ctx.spec
    progress = _Progress(ctx)
    # Checked again here, just before reading (a link may have been added since the request was checked).
    policy = ImportPolicy.from_dict(spec["import_policy"]) if "import_policy" in spec else ImportPolicy.from_settings(settings)
    source = parse_source(spec["source_uri"], policy)
    staging = ctx.workdir / f"attempt-{ctx.attempt}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        stage = "converting" if source.scheme == "gguf" else "fetching"
        progress(stage)
        folder = fetch(source, staging, settings, lambda done, total: progress(stage, done, total))
        progress("validating")
        kind, fmt = detect_format(folder)
        meta = validate_and_inspect(folder, fmt)
        manifest = _upload(store, spec["artifact_prefix"], folder, progress)
        mark_ready(db, spec, kind, fmt, manifest, meta)
        progress("done")
        ctx.log("import succeeded", version=spec["model_version"], files=len(manifest.files),
                size=manifest.total_size, parameters=meta.parameter_count)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _upload(store: S3ArtifactStore, prefix: str, folder: Path, progress: _Progress) -> Manifest:
    paths = model_files(folder)
    total = sum(p.stat().st_size for p in paths)
    done, entries = 0, []
    progress("uploading", 0, total)
    for path in paths:
        rel = path.relative_to(folder).as_posix()
        stored = store.put_file(file_key(prefix, rel), path)
        entries.append(FileEntry(rel, stored.size, stored.sha256))
        done += stored.size
        progress("uploading", done, total)
    manifest = Manifest(entries)
    store.put_bytes(manifest_key(prefix), manifest.to_json().encode(), content_type="application/json")
    return manifest

