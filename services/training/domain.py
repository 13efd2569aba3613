"""Training jobs as a resource: create (after preflight), merge, get, list, cancel, watch, checkpoints.

Jobs live in the shared job runtime (``JobStore``, kinds ``train`` and ``merge``); this module only
adds the training-specific parts: names ``trainingJobs/{id}``, the spec built by preflight, the list
schemas (``services.core.listing``), and checkpoints found in S3 under
``training/{id}/checkpoints/step-{N:08d}/`` (manifest last).
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from services.core.artifacts import ArtifactStore
from services.core.errors import FailedPrecondition, FieldViolation, InvalidArgument
from services.core.jobs import EventType, JobRecord, JobState, JobStore
from services.core.jobs.resource import JobResource
from services.core.jobs.store import job_schema, jobs
from services.core.listing import EQUALITY, Field, Page, Schema, enum_value, int_value, memory_page, parse, time_value
from services.core.logging import get_logger

from .preflight import Preflight
from .spec import JOB_ID_RE, METHODS, MODEL_NAME_RE, TrainingRequest

log = get_logger(__name__)

COLLECTION = "trainingJobs"
KIND_TRAIN = "train"
KIND_MERGE = "merge"
JOB_KINDS = {
    KIND_TRAIN: "services.training.recipes.run:run_training",
    KIND_MERGE: "services.training.merge_job:run_merge",
}
_CHECKPOINT_RE = re.compile(r"/checkpoints/step-(\d{8})/")


@dataclass
class Checkpoint:
    name: str
    step: int
    artifact_prefix: str
    size_bytes: int
    create_time: datetime | None = None
    metrics: dict[str, float] = field(default_factory=dict)


# ListTrainingJobs: the shared job fields plus ``method`` (a label set at creation: the method, or "merge") and
# ``kind`` as the proto enum (TRAINING_JOB_KIND_MERGE or merge).
JOB_SCHEMA = job_schema({
    "method": Field(jobs.c.labels["method"].as_string(), lambda j: j.labels.get("method"),
                    parse=enum_value("TRAINING_METHOD_", choices=[*METHODS, "merge"]), ops=EQUALITY),
    "kind": Field(jobs.c.kind, lambda j: j.kind, parse=enum_value("TRAINING_JOB_KIND_", choices=list(JOB_KINDS)),
                  ops=EQUALITY),
})
# ListCheckpoints: checkpoints live in S3 listings, so they are filtered and paged in memory.
CHECKPOINT_SCHEMA = Schema({
    "step": Field(get=lambda c: c.step, parse=int_value, sortable=True),
    "create_time": Field(get=lambda c: c.create_time, parse=time_value, sortable=True),
    "size_bytes": Field(get=lambda c: c.size_bytes, parse=int_value, sortable=True),
}, default_order="step", name=Field(get=lambda c: c.name))


def job_id(name: str, field_name: str = "name") -> str:
    """``trainingJobs/{id}`` -> id (InvalidArgument naming ``field_name`` otherwise)."""
    collection, _, jid = name.partition("/")
    if collection != COLLECTION or not JOB_ID_RE.match(jid):
        raise InvalidArgument.for_field(field_name, f"{name!r} must look like {COLLECTION}/{{job}}")
    return jid


def checkpoints_prefix(name: str) -> str:
    """S3 prefix of a job's checkpoints (``{prefix}/step-{N:08d}/...``)."""
    return f"training/{job_id(name)}/checkpoints"


class TrainingJobs(JobResource):
    """The training service's domain: preflight then queue; reads (get, list, cancel, watch: ``JobResource``)
    go to the job store, checkpoints to S3."""

    def __init__(self, store: JobStore, preflight: Preflight, artifacts: ArtifactStore, *, max_attempts: int = 3) -> None:
        super().__init__(store, collection=COLLECTION, kinds=list(JOB_KINDS), schema=JOB_SCHEMA,
                         max_attempts=max_attempts)
        self.preflight = preflight
        self.artifacts = artifacts

    async def create(self, req: TrainingRequest, *, validate_only: bool = False) -> JobRecord:
        """Preflight (raises the refusal), then persist the job QUEUED. ``validate_only``: only preflight; the job
        as it would be queued (resolved spec included) is returned and nothing is stored."""
        result = await self.preflight.check(req)
        spec = {**result.spec, "preflight": result.summary}
        if validate_only:
            name = f"{COLLECTION}/{req.job_id}" if req.job_id else ""
            return JobRecord(name=name, kind=KIND_TRAIN, state=JobState.QUEUED, spec=spec, attempt=0,
                             max_attempts=self.max_attempts, worker=None, created_at=datetime.now(UTC),
                             started_at=None, finished_at=None, heartbeat_at=None, labels={"method": req.method})
        name = f"{COLLECTION}/{req.job_id or _new_id(req.method)}"
        job = await asyncio.to_thread(self.store.create, KIND_TRAIN, spec, name, self.max_attempts,
                                      {"method": req.method})
        log.info("training_job_created", job=name, method=req.method, base=req.base_model_version,
                 accelerator=result.summary["accelerator"], estimated_bytes=result.summary["estimated_memory_bytes"])
        return job

    async def merge(self, adapter_version: str, *, output_model: str = "", job_id_: str = "",
                    display_name: str = "") -> JobRecord:
        """Queue a job merging a READY adapter version into the base model its lineage names."""
        errors = []
        if not adapter_version:
            errors.append(FieldViolation("adapter_version", "is required (models/{model}/versions/{version})"))
        if output_model and not MODEL_NAME_RE.match(output_model):
            errors.append(FieldViolation("output_model", f"{output_model!r} must look like models/{{model}}"))
        if job_id_ and not JOB_ID_RE.match(job_id_):
            errors.append(FieldViolation("training_job_id", f"{job_id_!r} must be lowercase letters, digits or hyphens"))
        if errors:
            raise InvalidArgument("; ".join(f"{v.field}: {v.description}" for v in errors), violations=errors)
        adapter = await self.preflight.model_version(adapter_version, "adapter_version")
        if adapter.kind != "adapter" or not adapter.base_model_version:
            raise FailedPrecondition(f"adapter_version: {adapter_version} is a {adapter.kind} version without an adapter "
                                     "lineage; only ADAPTER versions can be merged", reason="NOT_AN_ADAPTER",
                                     violations=[FieldViolation("adapter_version", "not an adapter")])
        base = await self.preflight.model_version(adapter.base_model_version, "adapter_version.lineage.base_model_version")
        options = self.preflight.options
        spec = {
            "adapter": {"name": adapter.name, "artifact_prefix": adapter.artifact_prefix, "files": adapter.files},
            "base_model": {"name": base.name, "artifact_prefix": base.artifact_prefix, "files": base.files},
            "dataset_versions": adapter.dataset_versions,
            "output": {"model": output_model or "/".join(adapter.name.split("/")[:2]), "description": display_name},
            "s3": {"endpoint": options.s3.endpoint, "bucket": options.s3.bucket, "secure": options.s3.secure},
            "registry_addr": options.registry_addr,
            "omp_num_threads": options.omp_num_threads,
        }
        name = f"{COLLECTION}/{job_id_ or _new_id('merge')}"
        job = await asyncio.to_thread(self.store.create, KIND_MERGE, spec, name, self.max_attempts, {"method": "merge"})
        log.info("merge_job_created", job=name, adapter=adapter.name, base=base.name)
        return job

    async def checkpoints(self, parent: str, *, filter: str = "", order_by: str = "", page_size: int = 0,
                          page_token: str = "") -> Page[Checkpoint]:
        """Complete checkpoints (manifest written) of a job, with the metrics it reported at their steps."""
        query = parse(CHECKPOINT_SCHEMA, filter=filter, order_by=order_by, page_size=page_size,
                      page_token=page_token, scope=parent)
        job = await self.get(parent)
        found = await asyncio.to_thread(self._checkpoints, job)
        return memory_page(found, query, CHECKPOINT_SCHEMA)

    def _checkpoints(self, job: JobRecord) -> Sequence[Checkpoint]:
        prefix = checkpoints_prefix(job.name)
        sizes: dict[int, int] = {}
        complete: set[int] = set()
        for obj in self.artifacts.list(prefix):
            m = _CHECKPOINT_RE.search(obj.key)
            if not m:
                continue
            step = int(m.group(1))
            if obj.key.endswith(f"step-{step:08d}/manifest.json"):
                complete.add(step)
            else:
                sizes[step] = sizes.get(step, 0) + obj.size
        metrics: dict[int, dict[str, float]] = {}
        saved_at: dict[int, datetime] = {}
        after = 0
        while events := self.store.events(job.name, after, 1000):
            for e in events:
                step = e.data.get("step")
                if e.type == EventType.METRICS and isinstance(step, int):
                    metrics.setdefault(step, {}).update(
                        {k: float(v) for k, v in e.data.items() if k != "step" and isinstance(v, int | float)})
                elif e.type == EventType.LOG and e.message == "checkpoint saved" and isinstance(step, int):
                    saved_at[step] = e.time
            after = events[-1].seq
        return [Checkpoint(name=f"{job.name}/checkpoints/step-{s:08d}", step=s, artifact_prefix=f"{prefix}/step-{s:08d}",
                           size_bytes=sizes.get(s, 0), create_time=saved_at.get(s), metrics=metrics.get(s, {}))
                for s in sorted(complete)]


def _new_id(method: str) -> str:
    return f"{method}-{uuid.uuid4().hex[:10]}"
