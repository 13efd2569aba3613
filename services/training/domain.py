"""Training jobs as a resource: create (after preflight), merge, get, list, cancel, watch, checkpoints.

Jobs live in the shared job runtime (``JobStore``, kinds ``train`` and ``merge``); this module only
adds the training-specific parts: names ``trainingJobs/{id}``, the spec built by preflight, filters,
and checkpoints found in S3 under ``training/{id}/checkpoints/step-{N:08d}/`` (manifest last).
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime

from services.core.artifacts import ArtifactStore
from services.core.errors import FailedPrecondition, FieldViolation, InvalidArgument
from services.core.paging import decode_page_token, encode_page_token
from services.core.jobs import EventType, JobEvent, JobRecord, JobState, JobStore, watch
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
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_ORDER_BY = {"": "created_at desc", "create_time": "created_at asc", "create_time asc": "created_at asc",
             "create_time desc": "created_at desc", "name": "name asc", "name asc": "name asc", "name desc": "name desc"}
_CHECKPOINT_RE = re.compile(r"/checkpoints/step-(\d{8})/")
_STEP_FILTER_RE = re.compile(r"^\s*step\s*(>=|<=|=|>|<)\s*(\d+)\s*$")
_STEP_OPS = {">=": int.__ge__, "<=": int.__le__, "=": int.__eq__, ">": int.__gt__, "<": int.__lt__}


@dataclass
class Checkpoint:
    name: str
    step: int
    artifact_prefix: str
    size_bytes: int
    create_time: datetime | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def job_id(name: str, field_name: str = "name") -> str:
    """``trainingJobs/{id}`` -> id (InvalidArgument naming ``field_name`` otherwise)."""
    collection, _, jid = name.partition("/")
    if collection != COLLECTION or not JOB_ID_RE.match(jid):
        raise InvalidArgument.for_field(field_name, f"{name!r} must look like {COLLECTION}/{{job}}")
    return jid


def checkpoints_prefix(name: str) -> str:
    """S3 prefix of a job's checkpoints (``{prefix}/step-{N:08d}/...``)."""
    return f"training/{job_id(name)}/checkpoints"


class TrainingJobs:
    """The training service's domain: preflight then queue; reads go to the job store and S3."""

    def __init__(self, store: JobStore, preflight: Preflight, artifacts: ArtifactStore, *, max_attempts: int = 3) -> None:
        self.store = store
        self.preflight = preflight
        self.artifacts = artifacts
        self.max_attempts = max_attempts

    async def create(self, req: TrainingRequest) -> JobRecord:
        """Preflight (raises the refusal), then persist the job QUEUED."""
        result = await self.preflight.check(req)
        name = f"{COLLECTION}/{req.job_id or _new_id(req.method)}"
        spec = {**result.spec, "preflight": result.summary}
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

    async def get(self, name: str) -> JobRecord:
        job_id(name)
        return await asyncio.to_thread(self.store.get, name)

    async def cancel(self, name: str) -> JobRecord:
        job_id(name)
        job = await asyncio.to_thread(self.store.request_cancel, name)
        log.info("training_job_cancel_requested", job=name, state=job.state.value)
        return job

    async def watch(self, name: str, after_seq: int = 0) -> AsyncIterator[JobEvent]:
        job_id(name)
        if after_seq < 0:
            raise InvalidArgument.for_field("after_sequence", f"must be >= 0, got {after_seq}")
        await asyncio.to_thread(self.store.get, name)  # NotFound before the stream starts
        async for event in watch(self.store, name, after_seq):
            yield event

    async def list(self, *, filter: str = "", order_by: str = "", page_size: int = 0,
                   page_token: str = "") -> tuple[list[JobRecord], str]:
        """One page of jobs matching ``filter`` (state / method / kind terms joined by AND)."""
        if page_size < 0:
            raise InvalidArgument.for_field("page_size", f"must be >= 0, got {page_size}")
        states, method, kind = _parse_filter(filter)
        key = " ".join(order_by.split()).lower()
        if key not in _ORDER_BY:
            raise InvalidArgument.for_field("order_by", f"{order_by!r} must be one of: create_time [asc|desc], name [asc|desc]")
        fingerprint = [sorted(s.value for s in states), method, kind, _ORDER_BY[key]]
        offset = decode_page_token(page_token, fingerprint)
        matching = await asyncio.to_thread(self._all, kind, states, _ORDER_BY[key], method)
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        page = matching[offset:offset + size]
        more = offset + size < len(matching)
        return page, encode_page_token(offset + size, fingerprint) if more else ""

    def _all(self, kind: str | None, states: list[JobState], order: str, method: str | None) -> list[JobRecord]:
        out, token = [], ""
        while True:
            page, token = self.store.list(kind=kind, states=states or None, page_size=MAX_PAGE_SIZE,
                                          page_token=token, order_by=order)
            out += [j for j in page if j.name.startswith(f"{COLLECTION}/")
                    and (method is None or j.labels.get("method") == method)]
            if not token:
                return out

    async def checkpoints(self, parent: str, *, filter: str = "", order_by: str = "", page_size: int = 0,
                          page_token: str = "") -> tuple[list[Checkpoint], str]:
        """Complete checkpoints (manifest written) of a job, with the metrics it reported at their steps."""
        job = await self.get(parent)
        if page_size < 0:
            raise InvalidArgument.for_field("page_size", f"must be >= 0, got {page_size}")
        step_filter = None
        if filter.strip():
            m = _STEP_FILTER_RE.match(filter)
            if not m:
                raise InvalidArgument.for_field("filter", f"{filter!r} must look like 'step >= 100'")
            step_filter = (_STEP_OPS[m.group(1)], int(m.group(2)))
        key = " ".join(order_by.split()).lower() or "step asc"
        if key not in ("step", "step asc", "step desc"):
            raise InvalidArgument.for_field("order_by", f"{order_by!r} must be 'step asc' or 'step desc'")
        found = await asyncio.to_thread(self._checkpoints, job)
        if step_filter:
            op, value = step_filter
            found = [c for c in found if op(c.step, value)]
        found.sort(key=lambda c: c.step, reverse=key == "step desc")
        fingerprint = [filter.strip(), key]
        offset = decode_page_token(page_token, fingerprint)
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        more = offset + size < len(found)
        return found[offset:offset + size], encode_page_token(offset + size, fingerprint) if more else ""

    def _checkpoints(self, job: JobRecord) -> list[Checkpoint]:
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


def _parse_filter(text: str) -> tuple[list[JobState], str | None, str | None]:
    """``state = JOB_STATE_RUNNING AND method = lora AND kind = merge`` -> (states, method, kind)."""
    states: list[JobState] = []
    method = kind = None
    for term in re.split(r"\s+AND\s+", text.strip(), flags=re.IGNORECASE) if text.strip() else []:
        key, sep, value = (p.strip() for p in term.partition("="))
        value = value.strip("\"'")
        if key == "state" and sep:
            st = value.upper().removeprefix("JOB_STATE_")
            if st not in JobState.__members__:
                raise InvalidArgument.for_field("filter", f"unknown state {value!r}")
            states.append(JobState(st))
        elif key == "method" and sep:
            method = value.lower().removeprefix("training_method_")
            if method not in METHODS and method != "merge":
                raise InvalidArgument.for_field("filter", f"unknown method {value!r}")
        elif key == "kind" and sep:
            kind = value.lower().removeprefix("training_job_kind_")
            if kind not in JOB_KINDS:
                raise InvalidArgument.for_field("filter", f"unknown kind {value!r}")
        else:
            raise InvalidArgument.for_field("filter", f"{term!r}: terms are state = X, method = Y or kind = Z joined by AND")
    return states, method, kind


