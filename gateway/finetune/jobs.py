"""``/v1/fine_tuning/jobs`` over the training service.

A job ``ftjob-<id>`` is the training job ``trainingJobs/ftjob-<id>`` (LoRA SFT for ``supervised``,
LoRA DPO for ``dpo``) plus a row of the gateway database (its project, what was asked, and once it
ends: status, ``fine_tuned_model``, error). Status while it runs comes from the training service;
the row is finalized by the first replica that sees the training job end (compare-and-set), which
on success loads the adapter on every ready deployment of the base model (``LoadAdapter``, alias
``ft-[<suffix>-]<8 chars of the id>``), so ``fine_tuned_model`` = ``<served base>:<alias>`` is
chat-able the moment the job reports ``succeeded``. Without such a deployment, ``fine_tuned_model``
is the adapter's registry version (docs/api.md says how to serve it).

Events: every replica follows its unfinished jobs' training events (``WatchTrainingJob``) and stores
them as OpenAI ``fine_tuning.job.event``s at positions derived from the training sequence, so two
replicas writing the same event keep one.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import math
import re
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from modelyard.client import (
    AlreadyExists,
    DomainError,
    InferenceClient,
    NotFound,
    RegistryClient,
    TrainingClient,
    error_from_status,
)
from modelyard.common.v1 import common_pb2 as cpb
from modelyard.inference.v1 import inference_pb2 as ipb
from modelyard.training.v1 import training_pb2 as tpb
from services.core.db import Database, utcnow
from services.core.errors import FailedPrecondition, FieldViolation, InvalidArgument
from services.core.logging import get_logger

from ..auth.projects import ModelAccess, ProjectCache, ProjectStore
from ..routing import Replica, Router, Target
from .files import DPO, SUPERVISED, FileStore, new_id
from .protocol import FineTuningJobRequest, Hyperparameters
from .tables import FINAL_POSITION, events, jobs

log = get_logger("modelyard.gateway.fine_tuning")

BASE_LEARNING_RATE = 1e-4  # learning_rate_multiplier 1: the training service's LoRA default
MAX_MICRO_BATCH = 8  # a batch_size above it is reached by gradient accumulation
SUFFIX_RE = re.compile(r"^[A-Za-z0-9._-]{1,52}$")
TERMINAL = ("succeeded", "failed", "cancelled")
_STATES = {
    cpb.JOB_STATE_QUEUED: "queued",
    cpb.JOB_STATE_RUNNING: "running",
    cpb.JOB_STATE_SUCCEEDED: "succeeded",
    cpb.JOB_STATE_FAILED: "failed",
    cpb.JOB_STATE_CANCELLED: "cancelled",
}
# Training spec fields a refusal may name -> the OpenAI parameter they came from.
_PARAMS = {
    "spec.hyperparameters.num_epochs": "hyperparameters.n_epochs",
    "spec.hyperparameters.batch_size": "hyperparameters.batch_size",
    "spec.hyperparameters.learning_rate": "hyperparameters.learning_rate_multiplier",
    "spec.hyperparameters.beta": "method.dpo.hyperparameters.beta",
    "spec.base_model_version": "model",
    "spec.dataset_versions": "training_file",
    "spec.dataset_versions[0]": "training_file",
    "spec.validation_dataset_version": "validation_file",
}


@dataclass(frozen=True)
class JobRecord:
    id: str
    project: str
    model: str
    base_version: str
    served_base: str
    method: str
    training_file: str
    validation_file: str | None
    request: str
    metadata: str | None
    suffix: str | None
    alias: str
    created_at: datetime
    status: str
    finished_at: datetime | None
    fine_tuned_model: str | None
    trained_tokens: int | None
    error: str | None

    @property
    def training_job(self) -> str:
        return f"trainingJobs/{self.id}"


@dataclass(frozen=True)
class Event:
    position: int
    source_seq: int
    created_at: datetime
    level: str
    type: str
    message: str
    data: dict[str, Any] | None = None


def _job(row: Any) -> JobRecord:
    return JobRecord(**{c.name: getattr(row, c.name) for c in jobs.columns})


def _epoch(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


def _not_found(job_id: str) -> NotFound:
    return NotFound(
        f"No fine-tuning job {job_id!r} (in this project).",
        reason="FINE_TUNING_JOB_NOT_FOUND",
        metadata={"job": job_id},
    )


# ----------------------------------------------------------------------------- storage


class JobStore:
    """Rows of jobs and events (blocking: run off the event loop)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def _insert(self):
        return postgresql.insert if self._db.engine.dialect.name == "postgresql" else sqlite.insert

    def insert(self, record: JobRecord, first: builtins.list[Event]) -> None:
        with self._db.session() as s:
            s.execute(jobs.insert().values(**record.__dict__))
            for e in first:
                s.execute(events.insert().values(job_id=record.id, **_event_row(e)))

    def remove(self, job_id: str) -> None:
        with self._db.session() as s:
            s.execute(delete(events).where(events.c.job_id == job_id))
            s.execute(delete(jobs).where(jobs.c.id == job_id))

    def set_request(self, job_id: str, request: str) -> None:
        with self._db.session() as s:
            s.execute(update(jobs).where(jobs.c.id == job_id).values(request=request))

    def get(self, project: str | None, job_id: str) -> JobRecord:
        query = select(jobs).where(jobs.c.id == job_id)
        if project is not None:
            query = query.where(jobs.c.project == project)
        with self._db.session() as s:
            row = s.execute(query).first()
        if row is None:
            raise _not_found(job_id)
        return _job(row)

    def list(
        self, project: str, *, limit: int, after: str | None, metadata: dict[str, str]
    ) -> tuple[builtins.list[JobRecord], bool]:
        c = jobs.c
        query = select(jobs).where(c.project == project)
        with self._db.session() as s:
            if after:
                cursor = s.execute(select(c.created_at, c.id).where(c.id == after, c.project == project)).first()
                if cursor is None:
                    raise NotFound(
                        f"No fine-tuning job {after!r} (in this project).",
                        reason="FINE_TUNING_JOB_NOT_FOUND",
                        violations=[FieldViolation("after", after)],
                    )
                at, key = cursor
                query = query.where((c.created_at < at) | ((c.created_at == at) & (c.id < key)))
            query = query.order_by(c.created_at.desc(), c.id.desc())
            if not metadata:
                rows = s.execute(query.limit(limit + 1)).all()
            else:  # metadata is JSON text: filtered here, a bounded number of rows at a time
                rows = []
                for row in s.execute(query.execution_options(yield_per=200)):
                    stored = json.loads(row.metadata or "null") or {}
                    if all(stored.get(k) == v for k, v in metadata.items()):
                        rows.append(row)
                        if len(rows) > limit:
                            break
        return [_job(r) for r in rows[:limit]], len(rows) > limit

    def active(self) -> builtins.list[JobRecord]:
        with self._db.session() as s:
            return [_job(r) for r in s.execute(select(jobs).where(jobs.c.status == ""))]

    def finish(self, record: JobRecord, final: builtins.list[Event]) -> JobRecord:
        """Record the job's end once (the first caller wins); the row as it is then."""
        with self._db.session() as s:
            done = s.execute(
                update(jobs)
                .where(jobs.c.id == record.id, jobs.c.status == "")
                .values(
                    status=record.status,
                    finished_at=record.finished_at,
                    fine_tuned_model=record.fine_tuned_model,
                    trained_tokens=record.trained_tokens,
                    error=record.error,
                )
            )
            if done.rowcount == 1:  # type: ignore[attr-defined]
                self._add(s, record.id, final)
            row = s.execute(select(jobs).where(jobs.c.id == record.id)).first()
        return _job(row)

    def add_events(self, job_id: str, new: builtins.list[Event]) -> None:
        with self._db.session() as s:
            self._add(s, job_id, new)

    def _add(self, s: Any, job_id: str, new: builtins.list[Event]) -> None:
        insert = self._insert()
        for e in new:
            s.execute(
                insert(events)
                .values(job_id=job_id, **_event_row(e))
                .on_conflict_do_nothing(index_elements=["job_id", "position"])
            )

    def last_source_seq(self, job_id: str) -> int:
        with self._db.session() as s:
            return int(s.execute(select(func.max(events.c.source_seq)).where(events.c.job_id == job_id)).scalar() or 0)

    def events(self, job_id: str, *, limit: int, after: int | None) -> tuple[builtins.list[Any], bool]:
        query = select(events).where(events.c.job_id == job_id)
        if after is not None:
            query = query.where(events.c.position < after)
        with self._db.session() as s:
            rows = s.execute(query.order_by(events.c.position.desc()).limit(limit + 1)).all()
        return list(rows[:limit]), len(rows) > limit


def _event_row(e: Event) -> dict[str, Any]:
    return {
        "position": e.position,
        "source_seq": e.source_seq,
        "created_at": e.created_at,
        "level": e.level,
        "type": e.type,
        "message": e.message,
        "data": None if e.data is None else json.dumps(e.data),
    }


def event_id(job_id: str, position: int) -> str:
    return f"ftevent-{job_id.removeprefix('ftjob-')}-{position}"


def event_to_openai(job_id: str, row: Any) -> dict[str, Any]:
    return {
        "object": "fine_tuning.job.event",
        "id": event_id(job_id, row.position),
        "created_at": _epoch(row.created_at),
        "level": row.level,
        "message": row.message,
        "data": json.loads(row.data) if row.data else None,
        "type": row.type,
    }


# ----------------------------------------------------------------------------- training events


@dataclass
class Follow:
    """What a follower of one job's events remembers between events."""

    total_steps: int = 0


def _fields(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split() if "=" in part)


def map_event(ev: cpb.JobEvent, follow: Follow) -> list[Event]:
    """The OpenAI events one training event becomes (none for most log lines and the final state change,
    which ``FineTuning.finalize`` reports)."""
    base = (ev.sequence + 1) * 10
    when = ev.time.ToDatetime(tzinfo=UTC) if ev.HasField("time") else utcnow()
    kind = ev.WhichOneof("payload")

    def one(level: str, type_: str, message: str, data: dict[str, Any] | None = None) -> list[Event]:
        return [Event(base, ev.sequence, when, level, type_, message, data)]

    if kind == "state_change":
        state = ev.state_change.state
        if state == cpb.JOB_STATE_QUEUED and ev.state_change.previous_state == cpb.JOB_STATE_UNSPECIFIED:
            return one("info", "message", "Files validated, moving job to queued state")
        if state == cpb.JOB_STATE_QUEUED:
            return one(
                "warn",
                "message",
                "Fine-tuning job queued again (its worker stopped); it resumes from its last checkpoint",
            )
        if state == cpb.JOB_STATE_RUNNING:
            return one("info", "message", "Fine-tuning job started")
        return []
    if kind == "metrics":
        values = dict(ev.metrics.values)
        if "total_steps" in values:
            follow.total_steps = int(values["total_steps"])
        step = int(ev.metrics.step)
        if "loss" in values and math.isfinite(values["loss"]):
            data: dict[str, Any] = {"step": step, "train_loss": values["loss"]}
            if follow.total_steps:
                data["total_steps"] = follow.total_steps
            for ours, theirs in (("learning_rate", "learning_rate"), ("tokens_per_s", "tokens_per_second")):
                if ours in values:
                    data[theirs] = values[ours]
            of = f"/{follow.total_steps}" if follow.total_steps else ""
            return one("info", "metrics", f"Step {step}{of}: training loss={values['loss']:.4f}", data)
        if "eval_loss" in values and math.isfinite(values["eval_loss"]):
            return one(
                "info",
                "metrics",
                f"Step {step}: validation loss={values['eval_loss']:.4f}",
                {"step": step, "valid_loss": values["eval_loss"]},
            )
        return []
    if kind == "log" and ev.log.line.startswith("checkpoint saved"):
        saved = _fields(ev.log.line).get("step", "")
        if saved.isdigit():
            return one("info", "message", f"Checkpoint created at step {saved}", {"step": int(saved)})
    return []


# ----------------------------------------------------------------------------- the service


class Clients:
    """The SDK clients of the services the API calls, made on first use (in the serving loop)."""

    def __init__(self, settings: Any) -> None:
        self._settings = settings
        self._credentials = settings.service_credentials()
        self._clients: dict[str, Any] = {}

    def _client(self, key: str, cls: type, addr: str) -> Any:
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = cls(
                addr,
                timeout=self._settings.fine_tuning.rpc_timeout_s,
                retry_attempts=2,
                retry_backoff_s=0.1,
                retry_max_backoff_s=0.5,
                credentials=self._credentials,
            )
        return client

    def registry(self) -> RegistryClient:
        return self._client("registry", RegistryClient, self._settings.registry_addr)

    def training(self) -> TrainingClient:
        return self._client("training", TrainingClient, self._settings.training_addr)

    def inference(self, addr: str) -> InferenceClient:
        return self._client(f"inference@{addr}", InferenceClient, addr)

    async def close(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.close()


def _hp(body: FineTuningJobRequest) -> tuple[str, Hyperparameters]:
    method = body.method.type if body.method else SUPERVISED
    chosen: Hyperparameters | None = None
    if body.method is not None:
        sub = body.method.dpo if method == DPO else body.method.supervised
        chosen = sub.hyperparameters if sub is not None else None
    return method, chosen or body.hyperparameters or Hyperparameters()


def _spec_hyperparameters(method: str, hp: Hyperparameters, seed: int | None) -> tpb.Hyperparameters:
    out = tpb.Hyperparameters()
    if isinstance(hp.n_epochs, int):
        out.num_epochs = float(hp.n_epochs)
    if isinstance(hp.batch_size, int):
        micro = max(d for d in range(1, min(hp.batch_size, MAX_MICRO_BATCH) + 1) if hp.batch_size % d == 0)
        out.batch_size, out.gradient_accumulation_steps = micro, hp.batch_size // micro
    if isinstance(hp.learning_rate_multiplier, float | int):
        out.learning_rate = BASE_LEARNING_RATE * hp.learning_rate_multiplier
    beta = getattr(hp, "beta", None)
    if method == DPO and isinstance(beta, float | int):
        out.beta = float(beta)
    if seed is not None:
        out.seed = seed
    return out


def _resolved(job: tpb.TrainingJob, method: str) -> dict[str, Any]:
    """The hyperparameters the training job runs with, in OpenAI's terms."""
    hp = job.spec.hyperparameters
    epochs = hp.num_epochs if hp.HasField("num_epochs") else 1.0
    out: dict[str, Any] = {
        "n_epochs": int(epochs) if float(epochs).is_integer() else epochs,
        "batch_size": max(1, hp.batch_size) * max(1, hp.gradient_accumulation_steps),
        "learning_rate_multiplier": round(hp.learning_rate / BASE_LEARNING_RATE, 6)
        if hp.HasField("learning_rate")
        else 1.0,
    }
    if method == DPO:
        out["beta"] = hp.beta if hp.HasField("beta") else 0.1
    return out


class FineTuning:
    def __init__(
        self,
        settings: Any,
        db: Database,
        router: Router,
        file_store: FileStore,
        clients: Clients,
        projects: ProjectStore,
        project_cache: ProjectCache,
    ) -> None:
        self._settings = settings.fine_tuning
        self.store = JobStore(db)
        self._files = file_store
        self._router = router
        self._clients = clients
        self._projects = projects
        self._project_cache = project_cache
        self._followers: dict[str, asyncio.Task] = {}
        self._finalizing: dict[str, asyncio.Lock] = {}
        self._task: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._task = asyncio.create_task(self._monitor(), name="fine-tuning-monitor")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._followers.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._clients.close()

    async def _monitor(self) -> None:
        while True:
            try:
                for record in await asyncio.to_thread(self.store.active):
                    self.follow(record)
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("fine_tuning_monitor_failed")
            await asyncio.sleep(self._settings.monitor_interval_s)

    def follow(self, record: JobRecord) -> None:
        """Follow the job's training events here unless this replica does already."""
        task = self._followers.get(record.id)
        if task is None or task.done():
            self._followers[record.id] = asyncio.create_task(self._follow(record), name=f"follow-{record.id}")

    async def _follow(self, record: JobRecord) -> None:
        training = self._clients.training()
        try:
            after = await asyncio.to_thread(self.store.last_source_seq, record.id)
            follow = Follow()
            async for ev in training.watch_training_job(record.training_job, after_sequence=after):
                mapped = map_event(ev, follow)
                if mapped:
                    await asyncio.to_thread(self.store.add_events, record.id, mapped)
            job = await training.get_training_job(record.training_job)
            if job.state in (cpb.JOB_STATE_SUCCEEDED, cpb.JOB_STATE_FAILED, cpb.JOB_STATE_CANCELLED):
                await self.finalize(record, job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the monitor follows it again on its next round
            log.warning("fine_tuning_follow_failed", job=record.id, error=str(exc))

    # ------------------------------------------------------------------ create

    async def create(self, project: str, access: ModelAccess, body: FineTuningJobRequest) -> dict[str, Any]:
        method, hp = _hp(body)
        if body.integrations:
            raise InvalidArgument.for_field("integrations", "integrations (wandb) are not supported by this gateway")
        if body.suffix is not None and not SUFFIX_RE.match(body.suffix):
            raise InvalidArgument.for_field(
                "suffix",
                f"1-52 letters, digits, '.', '_' or '-' (it becomes part of a model name), got {body.suffix!r}",
            )
        self._check_metadata(body.metadata)
        if (
            body.method is not None
            and body.hyperparameters is not None
            and hp is not body.hyperparameters
            and body.hyperparameters.model_dump(exclude_none=True)
        ):
            raise InvalidArgument.for_field(
                "hyperparameters", f"give the hyperparameters in method.{method}.hyperparameters only"
            )
        training_file = await self._file(project, body.training_file, "training_file", method)
        validation_file = (
            await self._file(project, body.validation_file, "validation_file", method) if body.validation_file else None
        )
        base_version, served = await self._base(access, body.model)
        job_id = new_id("ftjob")
        alias = f"ft-{body.suffix}-{job_id[6:14]}" if body.suffix else f"ft-{job_id[6:14]}"
        requested = {"hyperparameters": hp.model_dump(exclude_none=True), "seed": body.seed}
        record = JobRecord(
            id=job_id,
            project=project,
            model=body.model,
            base_version=base_version,
            served_base=served,
            method=method,
            training_file=training_file.id,
            validation_file=validation_file.id if validation_file else None,
            request=json.dumps(requested),
            metadata=json.dumps(body.metadata) if body.metadata is not None else None,
            suffix=body.suffix,
            alias=alias,
            created_at=utcnow(),
            status="",
            finished_at=None,
            fine_tuned_model=None,
            trained_tokens=None,
            error=None,
        )
        now = record.created_at
        first = [
            Event(0, 0, now, "info", "message", f"Created fine-tuning job: {job_id}"),
            Event(
                1,
                0,
                now,
                "info",
                "message",
                f"Validating training file: {training_file.id}"
                + (f" and validation file: {validation_file.id}" if validation_file else ""),
            ),
        ]
        await asyncio.to_thread(self.store.insert, record, first)
        spec = tpb.TrainingJobSpec(
            base_model_version=base_version,
            dataset_versions=[training_file.dataset_version],
            validation_dataset_version=validation_file.dataset_version if validation_file else "",
            method=tpb.TRAINING_METHOD_DPO if method == DPO else tpb.TRAINING_METHOD_LORA,
            hyperparameters=_spec_hyperparameters(method, hp, body.seed),
        )
        try:
            job = await self._clients.training().create_training_job(
                tpb.TrainingJob(display_name=f"OpenAI fine-tuning job {job_id} (project {project})", spec=spec),
                training_job_id=job_id,
            )
        except BaseException as exc:
            await asyncio.to_thread(self.store.remove, job_id)
            if isinstance(exc, DomainError):
                raise _openai_params(exc) from None
            raise
        requested["resolved"] = _resolved(job, method)
        requested["seed"] = job.spec.hyperparameters.seed
        record = replace(record, request=json.dumps(requested))
        await asyncio.to_thread(self.store.set_request, job_id, record.request)
        log.info("fine_tuning_job_created", job=job_id, project=project, method=method, base=base_version)
        self.follow(record)
        return self.to_openai(record, job)

    @staticmethod
    def _check_metadata(metadata: dict[str, str] | None) -> None:
        if metadata is None:
            return
        if len(metadata) > 16:
            raise InvalidArgument.for_field("metadata", f"at most 16 keys, got {len(metadata)}")
        for key in metadata:
            if not 1 <= len(key) <= 64:
                raise InvalidArgument.for_field("metadata", f"keys are 1-64 characters, got {key[:80]!r}")

    async def _file(self, project: str, file_id: str, param: str, method: str) -> Any:
        try:
            found = await asyncio.to_thread(self._files.get, project, file_id)
        except NotFound:
            raise NotFound(
                f"invalid {param}: no file {file_id!r} (upload it with purpose 'fine-tune')",
                reason="FILE_NOT_FOUND",
                violations=[FieldViolation(param, f"no file {file_id!r}")],
            ) from None
        if found.kind != method:
            rows = (
                'preference rows {"input", "preferred_output", "non_preferred_output"}'
                if method == DPO
                else 'chat rows {"messages": [...]}'
            )
            raise InvalidArgument.for_field(
                param,
                f"{file_id} holds {found.kind} rows; method '{method}' trains on {rows}",
                reason="INVALID_FILE_FORMAT",
            )
        return found

    async def _base(self, access: ModelAccess, model: str) -> tuple[str, str]:
        """(registry model version, served name or "") of the model to fine-tune."""
        unknown = NotFound(
            f"The model '{model}' does not exist or you do not have access to it.",
            reason="MODEL_NOT_FOUND",
            violations=[FieldViolation("model", f"no model {model!r}")],
        )
        if model.startswith("models/"):
            if not access.allows("*"):  # registry versions are not a project's models
                raise unknown
            try:
                await self._clients.registry().get_model_version(model)
            except (NotFound, InvalidArgument):
                raise unknown from None
            served = next((t.model for _, t in self._targets(version=model)), "")
            return model, served
        if not access.allows(model):
            raise unknown
        try:
            await self._router.resolve(model)
        except NotFound:
            raise unknown from None
        if ":" in model:
            raise InvalidArgument.for_field(
                "model", f"'{model}' is an adapter; fine-tune its base model ('{model.split(':', 1)[0]}')"
            )
        found = self._targets(served=model)
        if not found:
            raise FailedPrecondition(
                f"The model '{model}' is not ready on any replica now; retry when it is.",
                reason="MODEL_NOT_READY",
                violations=[FieldViolation("model", "not ready")],
            )
        return found[0][1].model_version, model

    def _targets(self, *, served: str = "", version: str = "") -> builtins.list[tuple[Replica, Target]]:
        """(replica, ready base-model target) pairs of a served name, or of a registry version."""
        out = []
        for replica in self._router.replicas:
            if replica.ejected:
                continue
            for name, target in replica.ready.items():
                if target.adapter == "" and (
                    (served and name == served) or (version and target.model_version == version)
                ):
                    out.append((replica, target))
        return out

    # ------------------------------------------------------------------ read, cancel

    async def get(self, project: str, job_id: str) -> dict[str, Any]:
        record = await asyncio.to_thread(self.store.get, project, job_id)
        record, job = await self._current(record)
        return self.to_openai(record, job)

    async def _current(self, record: JobRecord) -> tuple[JobRecord, tpb.TrainingJob | None]:
        if record.status:
            return record, None
        job = await self._clients.training().get_training_job(record.training_job)
        if job.state in (cpb.JOB_STATE_SUCCEEDED, cpb.JOB_STATE_FAILED, cpb.JOB_STATE_CANCELLED):
            return await self.finalize(record, job), None
        self.follow(record)
        return record, job

    async def list(
        self, project: str, *, limit: int, after: str | None, metadata: dict[str, str]
    ) -> tuple[builtins.list[dict[str, Any]], bool]:
        records, more = await asyncio.to_thread(self.store.list, project, limit=limit, after=after, metadata=metadata)
        current = await asyncio.gather(*(self._current(r) for r in records))
        return [self.to_openai(r, j) for r, j in current], more

    async def cancel(self, project: str, job_id: str) -> dict[str, Any]:
        record = await asyncio.to_thread(self.store.get, project, job_id)
        if record.status:
            raise FailedPrecondition(
                f"Job {job_id} has already {record.status}; only a queued or running job can be cancelled.",
                reason="JOB_FINISHED",
            )
        try:
            job = await self._clients.training().cancel_training_job(record.training_job)
        except FailedPrecondition:
            record, _ = await self._current(record)
            raise FailedPrecondition(
                f"Job {job_id} has already {record.status or 'finished'}; only a queued or "
                "running job can be cancelled.",
                reason="JOB_FINISHED",
            ) from None
        log.info("fine_tuning_job_cancel_requested", job=job_id, project=project)
        if job.state in (cpb.JOB_STATE_SUCCEEDED, cpb.JOB_STATE_FAILED, cpb.JOB_STATE_CANCELLED):
            return self.to_openai(await self.finalize(record, job), None)
        return self.to_openai(record, job)

    async def events(
        self, project: str, job_id: str, *, limit: int, after: str | None
    ) -> tuple[builtins.list[dict], bool]:
        record = await asyncio.to_thread(self.store.get, project, job_id)
        position = None
        if after:
            prefix = f"ftevent-{job_id.removeprefix('ftjob-')}-"
            tail = after.removeprefix(prefix)
            if not after.startswith(prefix) or not tail.isdigit():
                raise InvalidArgument.for_field("after", f"not an event id of {job_id}: {after[:80]!r}")
            position = int(tail)
        if not record.status:
            self.follow(record)
        rows, more = await asyncio.to_thread(self.store.events, job_id, limit=limit, after=position)
        return [event_to_openai(job_id, r) for r in rows], more

    async def checkpoints(
        self, project: str, job_id: str, *, limit: int, after: str | None
    ) -> tuple[builtins.list[dict], bool]:
        record = await asyncio.to_thread(self.store.get, project, job_id)
        prefix = f"ftckpt-{job_id.removeprefix('ftjob-')}-"
        filter = ""
        if after:
            tail = after.removeprefix(prefix)
            if not after.startswith(prefix) or not tail.isdigit():
                raise InvalidArgument.for_field("after", f"not a checkpoint id of {job_id}: {after[:80]!r}")
            filter = f"step < {int(tail)}"
        page = await self._clients.training().list_checkpoints(
            parent=record.training_job, filter=filter, order_by="step desc", page_size=limit + 1
        )
        out = []
        for ckpt in page.checkpoints[:limit]:
            metrics: dict[str, float] = {"step": float(ckpt.step)}
            for ours, theirs in (("loss", "train_loss"), ("eval_loss", "valid_loss")):
                if ours in ckpt.metrics:
                    metrics[theirs] = ckpt.metrics[ours]
            out.append(
                {
                    "object": "fine_tuning.job.checkpoint",
                    "id": f"{prefix}{ckpt.step}",
                    "created_at": int(ckpt.create_time.seconds),
                    "fine_tuned_model_checkpoint": ckpt.name,
                    "fine_tuning_job_id": job_id,
                    "metrics": metrics,
                    "step_number": int(ckpt.step),
                }
            )
        return out, len(page.checkpoints) > limit or bool(page.next_page_token)

    # ------------------------------------------------------------------ the end of a job

    async def finalize(self, record: JobRecord, job: tpb.TrainingJob) -> JobRecord:
        """Record the end of a finished training job (once; deploying the adapter on success)."""
        lock = self._finalizing.setdefault(record.id, asyncio.Lock())
        async with lock:
            current = await asyncio.to_thread(self.store.get, None, record.id)
            if current.status:
                return current
            now = utcnow()
            when = job.end_time.ToDatetime(tzinfo=UTC) if job.HasField("end_time") else now
            status = _STATES[job.state]
            final: builtins.list[Event] = []
            error = None
            fine_tuned = None
            tokens = None
            if job.state == cpb.JOB_STATE_SUCCEEDED:
                fine_tuned, final = await self._deploy(current, job.outputs.model_version)
                value = job.outputs.final_metrics.get("train_tokens")
                tokens = int(value) if value is not None else None
                final.append(Event(FINAL_POSITION + 9, 0, now, "info", "message", "The job has successfully completed"))
            elif job.state == cpb.JOB_STATE_FAILED:
                err = error_from_status(job.error) if job.HasField("error") else None
                message = err.message if err else "the training job failed"
                param = err.violations[0].field if err and err.violations else None
                code = err.reason.lower() if err and err.reason else "training_failed"
                error = json.dumps({"code": code, "message": message, "param": _PARAMS.get(param or "", param)})
                final = [Event(FINAL_POSITION, 0, when, "error", "message", f"Fine-tuning job failed: {message}")]
            else:
                final = [Event(FINAL_POSITION, 0, when, "info", "message", "Fine-tuning job cancelled")]
            finished = replace(
                current,
                status=status,
                finished_at=when,
                fine_tuned_model=fine_tuned,
                trained_tokens=tokens,
                error=error,
            )
            result = await asyncio.to_thread(self.store.finish, finished, final)
        self._finalizing.pop(record.id, None)
        log.info("fine_tuning_job_finished", job=record.id, status=result.status, model=result.fine_tuned_model)
        return result

    async def _deploy(self, record: JobRecord, adapter_version: str) -> tuple[str, builtins.list[Event]]:
        """Load the adapter on every ready deployment of the base: (fine_tuned_model, events)."""
        now = utcnow()
        targets = (
            self._targets(served=record.served_base)
            if record.served_base
            else self._targets(version=record.base_version)
        )
        if not targets:
            return adapter_version, [
                Event(
                    FINAL_POSITION,
                    0,
                    now,
                    "warn",
                    "message",
                    f"New fine-tuned model created: {adapter_version} (no deployment of {record.model} is ready: "
                    "load it as an adapter on one to chat with it, see docs/api.md)",
                    {"adapter_version": adapter_version},
                )
            ]
        loaded = ""
        problems = []
        for replica, target in targets:
            try:
                await self._load(replica.addr, target.deployment, record.alias, adapter_version)
                loaded = loaded or f"{target.model}:{record.alias}"
            except DomainError as exc:
                problems.append(f"{replica.addr} {target.deployment}: {exc.message}")
                log.warning(
                    "fine_tuned_adapter_not_loaded",
                    job=record.id,
                    deployment=target.deployment,
                    replica=replica.addr,
                    error=exc.message,
                )
        if not loaded:
            return adapter_version, [
                Event(
                    FINAL_POSITION,
                    0,
                    now,
                    "warn",
                    "message",
                    f"New fine-tuned model created: {adapter_version} (it could not be loaded on a deployment of "
                    f"{record.model}: {'; '.join(problems)[:500]})",
                    {"adapter_version": adapter_version},
                )
            ]
        await self._router.refresh()
        await self._allow(record.project, loaded)
        return loaded, [
            Event(
                FINAL_POSITION,
                0,
                now,
                "info",
                "message",
                f"New fine-tuned model created: {loaded}",
                {"fine_tuned_model": loaded, "adapter_version": adapter_version},
            )
        ]

    async def _load(self, addr: str, deployment: str, alias: str, adapter_version: str) -> None:
        """LoadAdapter, idempotent: the same alias holding the same version already is success."""
        client = self._clients.inference(addr)
        try:
            await client.load_adapter(deployment, adapter=ipb.Adapter(alias=alias, model_version=adapter_version))
        except AlreadyExists:
            dep = await client.get_deployment(deployment)
            if not any(a.alias == alias and a.model_version == adapter_version for a in dep.adapters):
                raise

    async def _allow(self, project: str, model: str) -> None:
        """The project that trained the model may use it."""
        access = await self._project_cache.access(project)
        if access.allows(model):
            return
        try:
            await asyncio.to_thread(self._projects.update_models, project, add=[model])
            self._project_cache.invalidate()
        except DomainError as exc:
            log.warning("fine_tuned_model_not_allowed", project=project, model=model, error=exc.message)

    # ------------------------------------------------------------------ the OpenAI object

    def to_openai(self, record: JobRecord, job: tpb.TrainingJob | None) -> dict[str, Any]:
        requested = json.loads(record.request)
        hp = dict(requested.get("resolved") or requested.get("hyperparameters") or {})
        if record.status:
            status = record.status
        elif job is not None:
            # the training job succeeded but the adapter is not loaded yet: not usable, so still running
            status = "running" if job.state == cpb.JOB_STATE_SUCCEEDED else _STATES.get(job.state, "queued")
        else:
            status = "queued"
        estimated = None
        if job is not None and status == "running" and job.progress.HasField("eta"):
            estimated = int(time.time() + job.progress.eta.seconds)
        method: dict[str, Any] = {"type": record.method}
        if record.method == DPO:
            method["dpo"] = {"hyperparameters": hp}
        else:
            method["supervised"] = {"hyperparameters": hp}
        return {
            "object": "fine_tuning.job",
            "id": record.id,
            "created_at": _epoch(record.created_at),
            "error": json.loads(record.error) if record.error else None,
            "fine_tuned_model": record.fine_tuned_model,
            "finished_at": _epoch(record.finished_at),
            "hyperparameters": {k: v for k, v in hp.items() if k != "beta"},
            "model": record.model,
            "organization_id": record.project,
            "result_files": [],
            "seed": requested.get("seed") or 0,
            "status": status,
            "trained_tokens": record.trained_tokens,
            "training_file": record.training_file,
            "validation_file": record.validation_file,
            "estimated_finish": estimated,
            "integrations": [],
            "metadata": json.loads(record.metadata) if record.metadata else None,
            "method": method,
            "user_provided_suffix": record.suffix,
        }


def _openai_params(err: DomainError) -> DomainError:
    """A training refusal naming its spec fields, renamed to the OpenAI parameters they came from."""
    if not err.violations:
        return err
    err.violations = [FieldViolation(_PARAMS.get(v.field, v.field), v.description) for v in err.violations]
    return err
