"""Model imports as jobs of the shared job runtime (kind ``registry.import``, named ``imports/{id}``).

``start`` reserves the target version (state CREATING, with a fresh artifact prefix) and queues a job
in the registry's own database; a ``Worker`` of any registry replica claims it and runs
``services.registry.import_job:run`` in a child process, which fetches, converts, validates and
uploads with progress and marks the version READY. Get / List / Watch / Cancel read the job store, so
every replica answers for every import, and a replica that dies loses only its attempt (the job is
requeued by the heartbeat sweep of the others, or failed with JOB_ATTEMPTS_EXHAUSTED).

Nothing of a failed or cancelled import stays behind: the child removes its version on a failure it
sees, and ``reconcile`` (run periodically by every replica, and at once when an attempt ends here)
removes the version row, the model it created and the S3 prefix of imports that ended without a child
to clean up (cancelled while queued, attempts exhausted). Every step is conditional and idempotent,
so replicas may sweep at the same time.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

from sqlalchemy import CursorResult, and_, delete, exists, select, update

from services.core.artifacts import ArtifactStore, Manifest
from services.core.db import Database, utcnow
from services.core.errors import FailedPrecondition, InvalidArgument, NotFound
from services.core.jobs import JobEvent, JobState, JobStore, Worker, watch
from services.core.jobs.records import JobRecord
from services.core.jobs.store import job_schema, jobs
from services.core.listing import EQUALITY, Field, Page, parse
from services.core.logging import get_logger

from .domain import Registry, check_labels, new_artifact_prefix
from .inspection import ModelMetadata
from .names import check_id, parse_import, parse_parent
from .records import Lineage, ModelFormat, ModelImport, ModelKind, VersionState
from .settings import RegistrySettings
from .sources import ImportPolicy, parse_source
from .tables import ModelRow, VersionRow

log = get_logger(__name__)

KIND = "registry.import"
JOB_KINDS = {KIND: "services.registry.import_job:run"}
COLLECTION = "imports"
# Stages in order; the job's progress ``step`` is the index of the current one.
STAGES = ("queued", "fetching", "converting", "validating", "uploading", "done")
# Environment of the import child (set by the worker, never stored in the job spec).
ENV_DB_URL = "YARD_JOB_REGISTRY_DB_URL"
ENV_S3_ACCESS_KEY = "YARD_JOB_S3_ACCESS_KEY"
ENV_S3_SECRET_KEY = "YARD_JOB_S3_SECRET_KEY"
ENV_HF_TOKEN = "YARD_JOB_HF_TOKEN"

IMPORT_SCHEMA = job_schema({
    "model_version": Field(jobs.c.spec["model_version"].as_string(), ops=EQUALITY),
    "source_uri": Field(jobs.c.spec["source_uri"].as_string(), ops=EQUALITY),
})


def stage_of(job: JobRecord) -> str:
    """The import's current stage, from its state and progress step."""
    if job.state == JobState.SUCCEEDED:
        return "done"
    step = (job.progress or {}).get("step")
    if job.state == JobState.QUEUED or not step:
        return "queued"
    return STAGES[min(int(step), len(STAGES) - 1)]


def to_import(job: JobRecord) -> ModelImport:
    return ModelImport(job, job.spec.get("source_uri", ""), job.spec.get("model_version", ""), stage_of(job))


def child_env(settings: RegistrySettings, db_url: str) -> dict[str, str]:
    """What an import child needs that must not be stored in a spec: the database URL and credentials."""
    env = {ENV_DB_URL: db_url, ENV_S3_ACCESS_KEY: settings.s3.access_key,
           ENV_S3_SECRET_KEY: settings.s3.secret_key.get_secret_value()}
    if settings.hf_token is not None:
        env[ENV_HF_TOKEN] = settings.hf_token.get_secret_value()
    return env


# ---------------------------------------------------------------------------------------------- version rows


def mark_ready(db: Database, spec: dict[str, Any], kind: ModelKind, fmt: ModelFormat, manifest: Manifest,
               meta: ModelMetadata) -> None:
    """CREATING -> READY with the inspected files and metadata (a version already READY stays as it is)."""
    version, prefix = spec["model_version"], spec["artifact_prefix"]
    with db.session() as s:
        res = cast(CursorResult, s.execute(update(VersionRow).where(
            VersionRow.name == version, VersionRow.artifact_prefix == prefix,
            VersionRow.state == VersionState.CREATING.value,
        ).values(
            kind=kind.value, format=fmt.value, state=VersionState.READY.value, meta=meta.to_dict(),
            files=[{"path": f.path, "size": f.size, "sha256": f.sha256} for f in manifest.files],
            total_size_bytes=manifest.total_size, parameter_count=meta.parameter_count, update_time=utcnow(),
        )))
        if res.rowcount == 1:
            return
    if version_state(db, spec) != VersionState.READY:
        raise abandoned(spec)


def version_state(db: Database, spec: dict[str, Any]) -> VersionState | None:
    """The state of the import's version (None when it is gone)."""
    with db.session() as s:
        state = s.scalar(select(VersionRow.state).where(VersionRow.name == spec["model_version"],
                                                        VersionRow.artifact_prefix == spec["artifact_prefix"]))
    return VersionState(state) if state else None


def abandoned(spec: dict[str, Any]) -> FailedPrecondition:
    return FailedPrecondition(f"the version {spec['model_version']} reserved for this import no longer exists",
                              reason="IMPORT_ABANDONED", metadata={"model_version": spec["model_version"]})


def discard_version(db: Database, store: ArtifactStore, spec: dict[str, Any]) -> bool:
    """Remove what an unfinished import left: its S3 prefix first, then (in one transaction, only while it is
    still CREATING) its version row and the model the import created if no other version joined it.
    Idempotent; returns whether a version row was removed."""
    if version_state(db, spec) == VersionState.READY:
        return False
    version, prefix = spec["model_version"], spec["artifact_prefix"]
    store.delete_prefix(prefix)
    with db.session() as s:
        res = cast(CursorResult, s.execute(delete(VersionRow).where(
            VersionRow.name == version, VersionRow.artifact_prefix == prefix,
            VersionRow.state == VersionState.CREATING.value)))
        removed = res.rowcount
        if removed and spec.get("created_model"):
            model = version.rsplit("/versions/", 1)[0]
            s.execute(delete(ModelRow).where(ModelRow.name == model, ~exists().where(VersionRow.model == model)))
    if removed:
        log.info("import_version_discarded", version=version, prefix=prefix)
    return bool(removed)


# ---------------------------------------------------------------------------------------------- domain


class Imports:
    """Starts imports as jobs and reports them from the job store."""

    def __init__(self, registry: Registry, store: JobStore, *, max_attempts: int = 3) -> None:
        self.registry = registry
        self.db = registry.db
        self.artifacts = registry.store
        self.settings = registry.settings
        self.store = store
        self.max_attempts = max_attempts
        # Fixed at start (the default roots include this process's working folder); each spec carries a copy.
        self.policy = ImportPolicy.from_settings(self.settings)

    def start(self, parent: str, *, version_id: str = "", source_uri: str, description: str = "",
              labels: dict[str, str] | None = None) -> ModelImport:
        """Validate the request, reserve the version (CREATING) and queue the import job; returns it QUEUED."""
        parse_parent(parent, "models", "parent")
        if version_id:
            check_id(version_id, "version_id")
        labels = check_labels(labels or {})
        source = parse_source(source_uri, self.policy)
        name = f"{COLLECTION}/{uuid.uuid4().hex}"
        with self.db.session() as s:
            created_model = s.get(ModelRow, parent) is None
            model_row = Registry._ensure_model(s, parent)
            version = f"{parent}/versions/{version_id or Registry._next_version_id(s, model_row)}"
            prefix = new_artifact_prefix(version)
            row = Registry._new_version_row(
                # kind and format are placeholders until the files are inspected
                version, ModelKind.BASE, ModelFormat.SAFETENSORS, prefix, Lineage(source_uri=source.uri),
                description, labels, state=VersionState.CREATING, files=[], meta={},
            )
            Registry._insert_version(s, row, Lineage())
        spec = {
            "source_uri": source.uri, "model_version": version, "artifact_prefix": prefix,
            "created_model": created_model, "hf_endpoint": self.settings.hf_endpoint,
            "s3": self.settings.s3.model_dump(mode="json", exclude={"access_key", "secret_key"}),
            "import_policy": self.policy.to_dict(),
        }
        try:
            job = self.store.create(KIND, spec, name, self.max_attempts)
        except BaseException:
            discard_version(self.db, self.artifacts, spec)
            raise
        log.info("import_queued", import_=name, version=version, source=source.uri, scheme=source.scheme)
        return to_import(job)

    def get(self, name: str) -> ModelImport:
        return to_import(self._job(name))

    def list(self, *, filter: str = "", order_by: str = "", page_size: int = 0, page_token: str = "") -> Page[ModelImport]:
        """One page of imports, filtered, ordered and paged in SQL over the job store."""
        query = parse(IMPORT_SCHEMA, filter=filter, order_by=order_by, page_size=page_size, page_token=page_token,
                      scope=KIND)
        page = self.store.list(query, IMPORT_SCHEMA, kinds=[KIND])
        return Page([to_import(j) for j in page.items], page.next_page_token, page.total_size)

    def cancel(self, name: str) -> ModelImport:
        """Cancel a queued (at once) or running (the worker stops the child) import; its version is removed."""
        self._job(name)
        job = self.store.request_cancel(name)
        log.info("import_cancel_requested", import_=name, state=job.state.value)
        if job.state.terminal:
            discard_version(self.db, self.artifacts, job.spec)
        return to_import(job)

    async def watch(self, name: str, after_seq: int = 0) -> AsyncIterator[JobEvent]:
        """The import's stored events after ``after_seq``, then live ones until it ends."""
        if after_seq < 0:
            raise InvalidArgument.for_field("after_sequence", f"must be >= 0, got {after_seq}")
        await asyncio.to_thread(self._job, name)  # NotFound before the stream starts
        async for event in watch(self.store, name, after_seq):
            yield event

    def reconcile(self) -> int:
        """Clean up after every FAILED or CANCELLED import whose version is still CREATING (no child is left
        to do it); returns how many versions were removed."""
        versions = VersionRow.__table__
        stmt = select(jobs.c.name, jobs.c.spec).join(versions, and_(
            versions.c.name == jobs.c.spec["model_version"].as_string(),
            versions.c.artifact_prefix == jobs.c.spec["artifact_prefix"].as_string(),
        )).where(jobs.c.kind == KIND, jobs.c.state.in_([JobState.FAILED.value, JobState.CANCELLED.value]),
                 versions.c.state == VersionState.CREATING.value)
        with self.db.session() as s:
            rows = s.execute(stmt).all()
        removed = 0
        for name, spec in rows:
            try:
                removed += discard_version(self.db, self.artifacts, spec)
            except Exception:  # noqa: BLE001 - the next sweep tries again
                log.exception("import_cleanup_failed", import_=name)
        return removed

    async def reconcile_loop(self, worker: Worker | None, stop: asyncio.Event, *, interval_s: float,
                             tick_s: float = 0.25) -> None:
        """Sweep every ``interval_s`` and as soon as an attempt of ``worker`` ends, until ``stop`` is set."""
        running: set[str] = set()
        next_sweep = 0.0
        while not stop.is_set():
            now_running = set(worker.running) if worker is not None else set()
            if running - now_running or time.monotonic() >= next_sweep:
                try:
                    removed = await asyncio.to_thread(self.reconcile)
                    if removed:
                        log.info("imports_reconciled", removed=removed)
                except Exception:  # noqa: BLE001 - a failed sweep (database down) is retried next time
                    log.exception("imports_reconcile_failed")
                next_sweep = time.monotonic() + interval_s
            running = now_running
            try:
                await asyncio.wait_for(stop.wait(), tick_s)
            except TimeoutError:
                pass

    def _job(self, name: str) -> JobRecord:
        parse_import(name)
        try:
            job = self.store.get(name)
        except NotFound:
            job = None
        if job is None or job.kind != KIND:
            raise NotFound(f"import {name!r} not found", reason="IMPORT_NOT_FOUND", metadata={"name": name})
        return job
