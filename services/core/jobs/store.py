"""SQL store of jobs and their events. Every method is one or a few short transactions.

State changes are conditional ``UPDATE ... WHERE name = ? AND state = ? [AND worker = ?]`` statements
checked by row count, so several workers (threads, processes or replicas sharing one database) never
run the same job and a worker that lost a job (requeued by another one) cannot overwrite it. A state
change and its ``state`` event are written in the same transaction.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..db import Database, Migration, create_tables, utcnow
from ..errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from ..paging import decode_page_token, encode_page_token
from ..logging import get_logger
from .records import (
    JOB_ATTEMPTS_EXHAUSTED,
    TERMINAL_STATES,
    EventType,
    JobEvent,
    JobRecord,
    JobState,
    NewEvent,
    empty_progress,
)

log = get_logger(__name__)

COMPONENT = "jobs"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,62}){0,3}$")
_ORDER_BY = {
    "created_at": ("created_at", False),
    "created_at asc": ("created_at", False),
    "created_at desc": ("created_at", True),
    "name": ("name", False),
    "name asc": ("name", False),
    "name desc": ("name", True),
}

metadata = MetaData()

jobs = Table(
    "jobs",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("kind", String(100), nullable=False),
    Column("state", String(16), nullable=False),
    Column("spec", JSON, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("max_attempts", Integer, nullable=False),
    Column("worker", String(200)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("heartbeat_at", DateTime(timezone=True)),
    Column("progress", JSON, nullable=False),
    Column("error", JSON),
    Column("outputs", JSON, nullable=False),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("labels", JSON, nullable=False),
    Column("resume_state", JSON),
    Column("child_pid", Integer),
    Column("last_seq", Integer, nullable=False, default=0),
    Index("ix_jobs_state_kind_created", "state", "kind", "created_at"),
)

job_events = Table(
    "job_events",
    metadata,
    Column("job", String(255), ForeignKey("jobs.name", ondelete="CASCADE"), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("time", DateTime(timezone=True), nullable=False),
    Column("type", String(16), nullable=False),
    Column("message", Text, nullable=False),
    Column("data", JSON, nullable=False),
)

MIGRATIONS = [Migration(1, "jobs and job_events", create_tables(jobs, job_events))]


def _aware(dt: datetime | None) -> datetime | None:
    """SQLite gives naive datetimes back; every stored time is UTC."""
    if dt is None or dt.tzinfo is not None:
        return dt
    return dt.replace(tzinfo=timezone.utc)


def _record(row: Any) -> JobRecord:
    return JobRecord(
        name=row.name,
        kind=row.kind,
        state=JobState(row.state),
        spec=row.spec,
        attempt=row.attempt,
        max_attempts=row.max_attempts,
        worker=row.worker,
        created_at=_aware(row.created_at),
        started_at=_aware(row.started_at),
        finished_at=_aware(row.finished_at),
        heartbeat_at=_aware(row.heartbeat_at),
        progress=row.progress,
        error=row.error,
        outputs=row.outputs,
        cancel_requested=bool(row.cancel_requested),
        labels=row.labels,
        resume_state=row.resume_state,
        child_pid=row.child_pid,
    )


def _event(row: Any) -> JobEvent:
    return JobEvent(job=row.job, seq=row.seq, time=_aware(row.time), type=EventType(row.type),
                    message=row.message, data=row.data)


def _not_owned(name: str, worker_id: str) -> FailedPrecondition:
    return FailedPrecondition(f"job {name} is no longer running on worker {worker_id}", reason="JOB_NOT_OWNED",
                              metadata={"job": name, "worker": worker_id})


def _check_json(field_name: str, value: Any) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise InvalidArgument.for_field(field_name, f"must be JSON-serialisable ({e})") from None


class JobStore:
    """Jobs and their events in the service's database (component ``jobs``, tables ``jobs``, ``job_events``)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        db.migrate(COMPONENT, MIGRATIONS)

    # ----------------------------------------------------------------- create / read

    def create(
        self,
        kind: str,
        spec: dict[str, Any],
        name: str | None = None,
        max_attempts: int = 3,
        labels: dict[str, str] | None = None,
    ) -> JobRecord:
        """A new QUEUED job. ``name`` is ``collection/id`` given by the caller, or ``jobs/<uuid>``."""
        if not kind:
            raise InvalidArgument.for_field("kind", "must not be empty")
        if max_attempts < 1:
            raise InvalidArgument.for_field("max_attempts", f"must be >= 1, got {max_attempts}")
        name = name or f"jobs/{uuid.uuid4().hex}"
        if not _NAME_RE.match(name):
            raise InvalidArgument.for_field(
                "name", f"{name!r} must be 1 to 4 segments of letters, digits, '.', '_' or '-' separated by '/'")
        _check_json("spec", spec)
        _check_json("labels", labels or {})
        now = utcnow()
        try:
            with self.db.session() as s:
                s.execute(insert(jobs).values(
                    name=name, kind=kind, state=JobState.QUEUED.value, spec=spec, attempt=1,
                    max_attempts=max_attempts, created_at=now, progress=empty_progress(), outputs={},
                    cancel_requested=False, labels=dict(labels or {}), last_seq=0,
                ))
                self._append(s, name, [NewEvent(EventType.STATE, "queued", {"state": JobState.QUEUED.value})])
                return self._get(s, name)
        except IntegrityError:
            raise AlreadyExists(f"job {name} already exists", metadata={"job": name}) from None

    def get(self, name: str) -> JobRecord:
        with self.db.session() as s:
            return self._get(s, name)

    def list(
        self,
        kind: str | None = None,
        states: Iterable[JobState] | None = None,
        page_size: int = 0,
        page_token: str = "",
        order_by: str = "created_at desc",
    ) -> tuple[list[JobRecord], str]:
        """One page of jobs and the token of the next page ("" on the last page)."""
        if page_size < 0:
            raise InvalidArgument.for_field("page_size", f"must be >= 0, got {page_size}")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        key = " ".join(order_by.split()).lower()
        if key not in _ORDER_BY:
            raise InvalidArgument.for_field("order_by", f"{order_by!r} is not one of {sorted(_ORDER_BY)}")
        column, desc = _ORDER_BY[key]
        state_values = sorted(JobState(st).value for st in states) if states else []
        fingerprint = [kind, state_values, key]
        offset = decode_page_token(page_token, fingerprint)
        q = select(jobs)
        if kind:
            q = q.where(jobs.c.kind == kind)
        if state_values:
            q = q.where(jobs.c.state.in_(state_values))
        col = jobs.c[column]
        q = q.order_by(col.desc() if desc else col.asc(), jobs.c.name.desc() if desc else jobs.c.name.asc())
        with self.db.session() as s:
            rows = s.execute(q.offset(offset).limit(size + 1)).all()
        token = encode_page_token(offset + size, fingerprint) if len(rows) > size else ""
        return [_record(r) for r in rows[:size]], token

    # ----------------------------------------------------------------- worker side

    def claim(self, worker_id: str, kinds: Sequence[str]) -> JobRecord | None:
        """Atomically take the oldest QUEUED job of one of ``kinds`` and mark it RUNNING on ``worker_id``.

        Jobs of dead workers come back through ``requeue_stale`` (QUEUED again), then are claimed here.
        """
        if not kinds:
            return None
        with self.db.session() as s:
            candidates = s.execute(
                select(jobs.c.name).where(jobs.c.state == JobState.QUEUED.value, jobs.c.kind.in_(list(kinds)))
                .order_by(jobs.c.created_at, jobs.c.name).limit(8)
            ).scalars().all()
        for name in candidates:
            now = utcnow()
            with self.db.session() as s:
                res = s.execute(
                    update(jobs).where(jobs.c.name == name, jobs.c.state == JobState.QUEUED.value).values(
                        state=JobState.RUNNING.value, worker=worker_id, heartbeat_at=now, child_pid=None,
                        started_at=func.coalesce(jobs.c.started_at, now),
                    )
                )
                if res.rowcount != 1:
                    continue  # another worker was faster
                job = self._get(s, name)
                self._append(s, name, [NewEvent(EventType.STATE, "running", {
                    "state": JobState.RUNNING.value, "worker": worker_id, "attempt": job.attempt})])
                return job
        return None

    def set_child(self, name: str, worker_id: str, pid: int) -> None:
        """Record the pid of the child process running the current attempt."""
        with self.db.session() as s:
            res = s.execute(self._owned(name, worker_id).values(child_pid=pid))
            if res.rowcount != 1:
                raise _not_owned(name, worker_id)
            self._append(s, name, [NewEvent(EventType.LOG, "child process started", {"pid": pid, "worker": worker_id})])

    def heartbeat(self, name: str, worker_id: str) -> bool:
        """Refresh the lease of a running job; returns whether a cancel was requested."""
        return self.sync(name, worker_id, heartbeat=True)

    def sync(
        self,
        name: str,
        worker_id: str,
        events: Sequence[NewEvent] = (),
        *,
        progress: dict[str, Any] | None = None,
        resume_state: dict[str, Any] | None = None,
        heartbeat: bool = False,
    ) -> bool:
        """The runner's periodic write: events, progress, resume state and heartbeat in one transaction.

        Returns whether a cancel was requested; raises FailedPrecondition(JOB_NOT_OWNED) when the job is
        not RUNNING on ``worker_id`` any more.
        """
        values: dict[str, Any] = {}
        if heartbeat:
            values["heartbeat_at"] = utcnow()
        if progress is not None:
            values["progress"] = progress
        if resume_state is not None:
            values["resume_state"] = resume_state
        with self.db.session() as s:
            if values or events:  # write first: the ownership check and the writes are one transaction
                if s.execute(self._owned(name, worker_id).values(worker=worker_id, **values)).rowcount != 1:
                    raise _not_owned(name, worker_id)
                self._append(s, name, events)
                return bool(s.execute(select(jobs.c.cancel_requested).where(jobs.c.name == name)).scalar())
            row = s.execute(select(jobs.c.state, jobs.c.worker, jobs.c.cancel_requested)
                            .where(jobs.c.name == name)).first()
            if row is None or row.state != JobState.RUNNING.value or row.worker != worker_id:
                raise _not_owned(name, worker_id)
            return bool(row.cancel_requested)

    def append_events(self, name: str, events: Sequence[NewEvent]) -> list[JobEvent]:
        """Store events; the store gives them consecutive ``seq`` numbers (1, 2, ... per job)."""
        with self.db.session() as s:
            return self._append(s, name, events)

    def events(self, name: str, after_seq: int = 0, limit: int = 1000) -> list[JobEvent]:
        with self.db.session() as s:
            return self._events(s, name, after_seq, limit)

    def state_and_events(self, name: str, after_seq: int, limit: int = 1000) -> tuple[JobState, list[JobEvent]]:
        """The job's state read *before* its events after ``after_seq``: when the state is terminal the
        events include the last one (a terminal state and its event are committed together)."""
        with self.db.session() as s:
            state = s.execute(select(jobs.c.state).where(jobs.c.name == name)).scalar()
            if state is None:
                raise NotFound(f"job {name} not found", metadata={"job": name})
            return JobState(state), self._events(s, name, after_seq, limit)

    def finish(
        self,
        name: str,
        worker_id: str,
        state: JobState,
        error: dict[str, Any] | None = None,
        outputs: dict[str, Any] | None = None,
    ) -> JobRecord:
        """End the attempt running on ``worker_id`` in a terminal state."""
        state = JobState(state)
        if state not in TERMINAL_STATES:
            raise InvalidArgument.for_field("state", f"must be terminal, got {state}")
        with self.db.session() as s:
            values: dict[str, Any] = {"state": state.value, "finished_at": utcnow(), "error": error}
            if outputs is not None:
                values["outputs"] = outputs
            if s.execute(self._owned(name, worker_id).values(**values)).rowcount != 1:
                raise _not_owned(name, worker_id)
            data: dict[str, Any] = {"state": state.value}
            if error:
                data["error"] = error
            self._append(s, name, [NewEvent(EventType.STATE, state.value.lower(), data)])
            return self._get(s, name)

    def lose_attempt(self, name: str, worker_id: str, why: str) -> JobRecord:
        """The attempt on ``worker_id`` died without a result (child killed, worker stopping): requeue the
        job with ``attempt + 1``, or FAIL it with JOB_ATTEMPTS_EXHAUSTED, or CANCEL it if that was asked."""
        job = self.get(name)
        if job.state != JobState.RUNNING or job.worker != worker_id or not self._requeue(job, why):
            raise _not_owned(name, worker_id)
        return self.get(name)

    def requeue_stale(self, heartbeat_timeout_s: float) -> list[str]:
        """Requeue (or fail, see ``lose_attempt``) RUNNING jobs whose heartbeat is older than the timeout."""
        cutoff = utcnow() - timedelta(seconds=heartbeat_timeout_s)
        with self.db.session() as s:
            rows = s.execute(select(jobs).where(jobs.c.state == JobState.RUNNING.value,
                                                jobs.c.heartbeat_at < cutoff)).all()
        done = []
        for row in rows:
            job = _record(row)
            if self._requeue(job, f"no heartbeat from worker {job.worker} for {heartbeat_timeout_s:g}s",
                             stale_before=cutoff):
                done.append(job.name)
        return done

    def request_cancel(self, name: str) -> JobRecord:
        """QUEUED -> CANCELLED at once; RUNNING -> cancel flag (the worker stops the child); terminal ->
        FailedPrecondition(JOB_ALREADY_FINISHED)."""
        for _ in range(3):  # the job may move between QUEUED and RUNNING while we look
            with self.db.session() as s:
                res = s.execute(update(jobs).where(jobs.c.name == name, jobs.c.state == JobState.QUEUED.value)
                                .values(state=JobState.CANCELLED.value, cancel_requested=True, finished_at=utcnow()))
                if res.rowcount == 1:
                    self._append(s, name, [NewEvent(EventType.STATE, "cancelled",
                                                    {"state": JobState.CANCELLED.value})])
                    return self._get(s, name)
            with self.db.session() as s:
                res = s.execute(update(jobs).where(jobs.c.name == name, jobs.c.state == JobState.RUNNING.value)
                                .values(cancel_requested=True))
                if res.rowcount == 1:
                    self._append(s, name, [NewEvent(EventType.LOG, "cancel requested", {})])
                    return self._get(s, name)
            job = self.get(name)
            if job.state in TERMINAL_STATES:
                raise FailedPrecondition(f"job {name} already finished ({job.state})",
                                         reason="JOB_ALREADY_FINISHED", metadata={"job": name, "state": job.state})
        raise FailedPrecondition(f"job {name} changed state while cancelling; retry", reason="JOB_STATE_CHANGED")

    # ----------------------------------------------------------------- internals

    @staticmethod
    def _owned(name: str, worker_id: str):
        return update(jobs).where(jobs.c.name == name, jobs.c.state == JobState.RUNNING.value,
                                  jobs.c.worker == worker_id)

    def _requeue(self, job: JobRecord, why: str, stale_before: datetime | None = None) -> bool:
        """Move a RUNNING job out of its lost attempt; False when it changed in the meantime."""
        now = utcnow()
        if job.cancel_requested:
            state, values = JobState.CANCELLED, {"finished_at": now}
            event = NewEvent(EventType.STATE, "cancelled", {"state": state.value, "why": why})
        elif job.attempt >= job.max_attempts:
            state = JobState.FAILED
            error = {"code": "ABORTED", "reason": JOB_ATTEMPTS_EXHAUSTED, "domain": "modelyard", "metadata": {},
                     "violations": [],
                     "message": f"job lost its attempt {job.attempt} of {job.max_attempts} ({why}); no attempts left"}
            values = {"finished_at": now, "error": error}
            event = NewEvent(EventType.STATE, "failed", {"state": state.value, "error": error})
        else:
            state = JobState.QUEUED
            values = {"attempt": job.attempt + 1, "worker": None, "heartbeat_at": None, "child_pid": None}
            event = NewEvent(EventType.STATE, "worker lost, requeued",
                             {"state": state.value, "why": why, "attempt": job.attempt + 1})
        q = update(jobs).where(jobs.c.name == job.name, jobs.c.state == JobState.RUNNING.value,
                               jobs.c.worker == job.worker, jobs.c.attempt == job.attempt)
        if stale_before is not None:
            q = q.where(jobs.c.heartbeat_at < stale_before)
        with self.db.session() as s:
            if s.execute(q.values(state=state.value, **values)).rowcount != 1:
                return False
            self._append(s, job.name, [event])
        log.warning("job_attempt_lost", job=job.name, attempt=job.attempt, worker=job.worker, why=why,
                    state=state.value)
        return True

    @staticmethod
    def _get(s: Session, name: str) -> JobRecord:
        row = s.execute(select(jobs).where(jobs.c.name == name)).first()
        if row is None:
            raise NotFound(f"job {name} not found", metadata={"job": name})
        return _record(row)

    @staticmethod
    def _events(s: Session, name: str, after_seq: int, limit: int) -> list[JobEvent]:
        rows = s.execute(select(job_events).where(job_events.c.job == name, job_events.c.seq > after_seq)
                         .order_by(job_events.c.seq).limit(limit)).all()
        return [_event(r) for r in rows]

    @staticmethod
    def _append(s: Session, name: str, events: Sequence[NewEvent]) -> list[JobEvent]:
        if not events:
            return []
        # Reserve the sequence numbers first: the UPDATE locks the job row (and, on SQLite, the database)
        # so concurrent writers get disjoint ranges.
        res = s.execute(update(jobs).where(jobs.c.name == name).values(last_seq=jobs.c.last_seq + len(events)))
        if res.rowcount != 1:
            raise NotFound(f"job {name} not found", metadata={"job": name})
        last = s.execute(select(jobs.c.last_seq).where(jobs.c.name == name)).scalar_one()
        now = utcnow()
        stored = [
            JobEvent(job=name, seq=last - len(events) + i + 1, time=e.time or now, type=EventType(e.type),
                     message=e.message, data=dict(e.data))
            for i, e in enumerate(events)
        ]
        s.execute(insert(job_events), [
            {"job": e.job, "seq": e.seq, "time": e.time, "type": e.type.value, "message": e.message, "data": e.data}
            for e in stored
        ])
        return stored
