"""Pipeline runs as a resource (``pipelineRuns/{id}``, job kind ``pipeline``): check the document, then
queue; get, list, cancel, retry and watch are the shared ``JobResource``'s.

Create checks everything that can be known before a step runs: the document (steps, fields, references,
params) and the local files it names (on this service's machine). The stored spec holds the document, its
params, the working directory and the addresses of the services the steps call; no credential.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from services.core.errors import DomainError, FieldViolation, InvalidArgument
from services.core.jobs import JobRecord, JobStore
from services.core.jobs.resource import JobResource
from services.core.jobs.store import job_schema, jobs
from services.core.listing import EQUALITY, Field
from services.core.local_paths import LocalPathPolicy
from services.core.logging import get_logger

from . import document as D

log = get_logger(__name__)

COLLECTION = "pipelineRuns"
KIND_PIPELINE = "pipeline"
JOB_KINDS = {KIND_PIPELINE: "services.pipeline.runner:run_pipeline"}
RUN_ID_MAX = 48

JOB_SCHEMA = job_schema(
    {
        "display_name": Field(
            jobs.c.spec["display_name"].as_string(), lambda j: j.spec.get("display_name"), ops=EQUALITY
        ),
    }
)


@dataclass(frozen=True)
class RunRequest:
    source: str
    params: dict[str, str] = field(default_factory=dict)
    working_dir: str = ""
    display_name: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    run_id: str = ""


class PipelineRuns(JobResource):
    def __init__(
        self, store: JobStore, addrs: dict[str, str], *, max_attempts: int = 3, local_policy: LocalPathPolicy
    ) -> None:
        super().__init__(
            store, collection=COLLECTION, kinds=list(JOB_KINDS), schema=JOB_SCHEMA, max_attempts=max_attempts
        )
        self.addrs = dict(addrs)
        self.local_policy = local_policy

    def check(self, req: RunRequest) -> D.Document:
        if req.run_id and (len(req.run_id) > RUN_ID_MAX or not D.NAME_RE.match(req.run_id)):
            raise InvalidArgument.for_field(
                "run_id", f"lowercase letters, digits and -, 1-{RUN_ID_MAX} characters, not starting/ending with -"
            )
        if req.working_dir and not Path(req.working_dir).is_absolute():
            raise InvalidArgument.for_field("run.working_dir", "must be an absolute path")
        doc = D.parse(req.source, req.params)
        missing = [v for raw in doc.raw_steps for v in _missing_files(raw, doc, req.working_dir, self.local_policy)]
        if missing:
            raise InvalidArgument(f"the pipeline document names files this service cannot read: {missing[0].description}",
                                  violations=missing)  # fmt: skip
        return doc

    async def create(self, req: RunRequest, *, validate_only: bool = False) -> JobRecord:
        doc = await asyncio.to_thread(self.check, req)
        spec = {
            "source": req.source,
            "params": dict(req.params),
            "working_dir": req.working_dir,
            "display_name": req.display_name or doc.name,
            "steps": [{"id": s.id, "type": s.type} for s in doc.steps],
            "addrs": self.addrs,
            "local_policy": self.local_policy.to_dict(),
        }
        name = f"{COLLECTION}/{req.run_id or 'run-' + uuid.uuid4().hex[:8]}"
        if validate_only:
            return self.preview(KIND_PIPELINE, name if req.run_id else "", spec, dict(req.labels))
        job = await asyncio.to_thread(self.store.create, KIND_PIPELINE, spec, name, self.max_attempts, dict(req.labels))
        log.info("pipeline_run_created", run=name, steps=len(doc.steps))
        return job


def _missing_files(raw: dict, doc: D.Document, working_dir: str, policy: LocalPathPolicy) -> list[FieldViolation]:
    """Local paths of import and dataset steps that are not readable under the allowed roots (one description
    whether missing, outside or unreadable; step outputs are checked at run time)."""
    fld = {"import": "source", "dataset": "path"}.get(raw.get("type", ""))
    value = raw.get(fld) if fld else None
    if not fld or not isinstance(value, str) or not value:
        return []
    where = f"steps.{raw['id']}.{fld}"
    text = D.REF_RE.sub(lambda m: doc.params.get(m.group(2), "") if m.group(1) == "params" else "\0", value)
    if "\0" in text or "://" in text:
        return []
    path = Path(text)
    if not path.is_absolute():
        if not working_dir:
            return [FieldViolation(where, f"{text!r} is relative and no working_dir is set")]
        path = Path(working_dir) / path
    try:
        policy.resolve(str(path), field=where, what="a file or folder")
    except DomainError as exc:
        return [FieldViolation(where, exc.violations[0].description if exc.violations else exc.message)]
    return []
