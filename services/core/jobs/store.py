"""SQL store of jobs and their events. Every method is one or a few short transactions.

State changes are conditional ``UPDATE ... WHERE name = ? AND state = ? [AND worker = ?]`` statements
checked by row count, so several workers (threads, processes or replicas sharing one database) never
run the same job and a worker that lost a job (requeued by another one) cannot overwrite it. A state
change and its ``state`` event are written in the same transaction.
"""

from __future__ import annotations

import builtins
import json
import re
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
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
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..db import Database, Migration, UTCDateTime, create_tables, utcnow
from ..errors import Aborted, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, error_dict
from ..listing import EQUALITY, Field, Page, Query, Schema, enum_value, int_value, sql_page, time_value
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
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,62}){0,3}$")

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
    Column("created_at", UTCDateTime, nullable=False),
    Column("started_at", UTCDateTime),
    Column("finished_at", UTCDateTime),
    Column("heartbeat_at", UTCDateTime),
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
    Column("time", UTCDateTime, nullable=False),
    Column("type", String(16), nullable=False),
    Column("message", Text, nullable=False),
    Column("data", JSON, nullable=False),
)

MIGRATIONS = [Migration(1, "jobs and job_events", create_tables(jobs, job_events))]

JOB_FIELDS: dict[str, Field] = {
    "name": Field(jobs.c.name, lambda j: j.name, sortable=True),
    "kind": Field(jobs.c.kind, lambda j: j.kind),
    "state": Field(
        jobs.c.state,
        lambda j: j.state.value,
        parse=enum_value("JOB_STATE_", upper=True, choices=[s.value for s in JobState]),
        ops=EQUALITY,
    ),
    "attempt": Field(jobs.c.attempt, lambda j: j.attempt, parse=int_value),
    "create_time": Field(jobs.c.created_at, lambda j: j.created_at, parse=time_value, sortable=True),
    "start_time": Field(jobs.c.started_at, lambda j: j.started_at, parse=time_value, sortable=True),
    "end_time": Field(jobs.c.finished_at, lambda j: j.finished_at, parse=time_value, sortable=True),
}


def job_schema(extra: dict[str, Field] | None = None, default_order: str = "create_time desc") -> Schema:
    """The list schema of jobs (name, kind, state, attempt, create/start/end_time, labels.KEY), plus a
    service's own ``extra`` fields, e.g. one read from the spec JSON: ``Field(jobs.c.spec["method"].as_string())``."""
    return Schema(
        {**JOB_FIELDS, **(extra or {})},
        default_order=default_order,
        name=JOB_FIELDS["name"],
        labels=jobs.c.labels,
        labels_get=lambda j: j.labels,
    )


JOB_SCHEMA = job_schema()


def _rowcount(result: Any) -> int:
    """Rows an UPDATE/DELETE matched (``Session.execute`` is typed as returning a plain Result)."""
    return cast(CursorResult, result).rowcount


def _record(row: Any) -> JobRecord:
    return JobRecord(
        name=row.name,
        kind=row.kind,
        state=JobState(row.state),
        spec=row.spec,
        attempt=row.attempt,
        max_attempts=row.max_attempts,
        worker=row.worker,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        heartbeat_at=row.heartbeat_at,
        progress=row.progress,
        error=row.error,
        outputs=row.outputs,
        cancel_requested=bool(row.cancel_requested),
        labels=row.labels,
        resume_state=row.resume_state,
        child_pid=row.child_pid,
    )


def _event(row: Any) -> JobEvent:
    return JobEvent(
        job=row.job, seq=row.seq, time=row.time, type=EventType(row.type), message=row.message, data=row.data
    )


def _not_owned(name: str, worker_id: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"job {name} is no longer running on worker {worker_id}",
        reason="JOB_NOT_OWNED",
        metadata={"job": name, "worker": worker_id},
    )


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
                "name", f"{name!r} must be 1 to 4 segments of letters, digits, '.', '_' or '-' separated by '/'"
            )
        _check_json("spec", spec)
        _check_json("labels", labels or {})
        now = utcnow()
        try:
            with self.db.session() as s:
                s.execute(
                    insert(jobs).values(
                        name=name,
                        kind=kind,
                        state=JobState.QUEUED.value,
                        spec=spec,
                        attempt=1,
                        max_attempts=max_attempts,
                        created_at=now,
                        progress=empty_progress(),
                        outputs={},
                        cancel_requested=False,
                        labels=dict(labels or {}),
                        last_seq=0,
                    )
                )
                self._append(s, name, [NewEvent(EventType.STATE, "queued", {"state": JobState.QUEUED.value})])
                return self._get(s, name)
        except IntegrityError:
            raise AlreadyExists(f"job {name} already exists", metadata={"job": name}) from None

    def get(self, name: str) -> JobRecord:
        with self.db.session() as s:
            return self._get(s, name)

    def list(self, query: Query, schema: Schema | None = None, *, kinds: Sequence[str] = ()) -> Page[JobRecord]:
        """One page of jobs of ``kinds`` (all when empty) matching ``query``, filtered, ordered and paged in
        SQL. ``schema`` defaults to ``job_schema()``; a service passes its own to add fields of its specs."""
        stmt = select(jobs)
        if kinds:
            stmt = stmt.where(jobs.c.kind.in_(list(kinds)))
        with self.db.session() as s:
            return sql_page(s, stmt, query, schema or JOB_SCHEMA, _record)

    # ----------------------------------------------------------------- worker side

    def claim(self, worker_id: str, kinds: Sequence[str]) -> JobRecord | None:
        """Atomically take the oldest QUEUED job of one of ``kinds`` and mark it RUNNING on ``worker_id``.

        Jobs of dead workers come back through ``requeue_stale`` (QUEUED again), then are claimed here.
        """
        if not kinds:
            return None
        while True:
            with self.db.session() as s:
                candidates = (
                    s.execute(
                        select(jobs.c.name)
                        .where(jobs.c.state == JobState.QUEUED.value, jobs.c.kind.in_(list(kinds)))
                        .order_by(jobs.c.created_at, jobs.c.name)
                        .limit(8)
                    )
                    .scalars()
                    .all()
                )
            if not candidates:
                return None
            if (job := self._claim_first(worker_id, candidates)) is not None:
                return job
            # Other workers took all of them meanwhile (they are not QUEUED any more): look again.

    def _claim_first(self, worker_id: str, candidates: Sequence[str]) -> JobRecord | None:
        """The first of ``candidates`` this worker wins, RUNNING on ``worker_id``. The conditional UPDATE is
        the claim: on PostgreSQL (READ COMMITTED) a second UPDATE of the row waits for the first one's
        transaction, then re-checks ``state = 'QUEUED'`` against the committed row and matches nothing; on
        SQLite writers take turns."""
        for name in candidates:
            now = utcnow()
            with self.db.session() as s:
                res = s.execute(
                    update(jobs)
                    .where(jobs.c.name == name, jobs.c.state == JobState.QUEUED.value)
                    .values(
                        state=JobState.RUNNING.value,
                        worker=worker_id,
                        heartbeat_at=now,
                        child_pid=None,
                        started_at=func.coalesce(jobs.c.started_at, now),
                    )
                )
                if _rowcount(res) != 1:
                    continue  # another worker was faster
                job = self._get(s, name)
                self._append(
                    s,
                    name,
                    [
                        NewEvent(
                            EventType.STATE,
                            "running",
                            {"state": JobState.RUNNING.value, "worker": worker_id, "attempt": job.attempt},
                        )
                    ],
                )
                return job
        return None

    def set_child(self, name: str, worker_id: str, pid: int) -> None:
        """Record the pid of the child process running the current attempt."""
        with self.db.session() as s:
            res = s.execute(self._owned(name, worker_id).values(child_pid=pid))
            if _rowcount(res) != 1:
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
        outputs: dict[str, Any] | None = None,
        heartbeat: bool = False,
    ) -> bool:
        """The runner's periodic write: events, progress, resume state, the outputs reported so far and the
        heartbeat in one transaction.

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
        if outputs is not None:
            _check_json("outputs", outputs)
            values["outputs"] = outputs
        with self.db.session() as s:
            if values or events:  # write first: the ownership check and the writes are one transaction
                if _rowcount(s.execute(self._owned(name, worker_id).values(worker=worker_id, **values))) != 1:
                    raise _not_owned(name, worker_id)
                self._append(s, name, events)
                return bool(s.execute(select(jobs.c.cancel_requested).where(jobs.c.name == name)).scalar())
            row = s.execute(
                select(jobs.c.state, jobs.c.worker, jobs.c.cancel_requested).where(jobs.c.name == name)
            ).first()
            if row is None or row.state != JobState.RUNNING.value or row.worker != worker_id:
                raise _not_owned(name, worker_id)
            return bool(row.cancel_requested)

    def append_events(self, name: str, events: Sequence[NewEvent]) -> builtins.list[JobEvent]:
        """Store events; the store gives them consecutive ``seq`` numbers (1, 2, ... per job)."""
        with self.db.session() as s:
            return self._append(s, name, events)

    def events(self, name: str, after_seq: int = 0, limit: int = 1000) -> builtins.list[JobEvent]:
        with self.db.session() as s:
            return self._events(s, name, after_seq, limit)

    def state_and_events(
        self, name: str, after_seq: int, limit: int = 1000
    ) -> tuple[JobState, builtins.list[JobEvent]]:
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
            if _rowcount(s.execute(self._owned(name, worker_id).values(**values))) != 1:
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

    def requeue_stale(self, heartbeat_timeout_s: float) -> builtins.list[str]:
        """Requeue (or fail, see ``lose_attempt``) RUNNING jobs whose heartbeat is older than the timeout."""
        cutoff = utcnow() - timedelta(seconds=heartbeat_timeout_s)
        with self.db.session() as s:
            rows = s.execute(
                select(jobs).where(jobs.c.state == JobState.RUNNING.value, jobs.c.heartbeat_at < cutoff)
            ).all()
        done = []
        for row in rows:
            job = _record(row)
            if self._requeue(
                job, f"no heartbeat from worker {job.worker} for {heartbeat_timeout_s:g}s", stale_before=cutoff
            ):
                done.append(job.name)
        return done

    def request_cancel(self, name: str) -> JobRecord:
        """QUEUED -> CANCELLED at once; RUNNING -> cancel flag (the worker stops the child); terminal ->
        FailedPrecondition(JOB_ALREADY_FINISHED)."""
        for _ in range(3):  # the job may move between QUEUED and RUNNING while we look
            with self.db.session() as s:
                res = s.execute(
                    update(jobs)
                    .where(jobs.c.name == name, jobs.c.state == JobState.QUEUED.value)
                    .values(state=JobState.CANCELLED.value, cancel_requested=True, finished_at=utcnow())
                )
                if _rowcount(res) == 1:
                    self._append(s, name, [NewEvent(EventType.STATE, "cancelled", {"state": JobState.CANCELLED.value})])
                    return self._get(s, name)
            with self.db.session() as s:
                res = s.execute(
                    update(jobs)
                    .where(jobs.c.name == name, jobs.c.state == JobState.RUNNING.value)
                    .values(cancel_requested=True)
                )
                if _rowcount(res) == 1:
                    self._append(s, name, [NewEvent(EventType.LOG, "cancel requested", {})])
                    return self._get(s, name)
            job = self.get(name)
            if job.state in TERMINAL_STATES:
                raise FailedPrecondition(
                    f"job {name} already finished ({job.state})",
                    reason="JOB_ALREADY_FINISHED",
                    metadata={"job": name, "state": job.state},
                )
        raise FailedPrecondition(f"job {name} changed state while cancelling; retry", reason="JOB_STATE_CHANGED")

    def retry(self, name: str) -> JobRecord:
        """FAILED or CANCELLED -> QUEUED as a new attempt (``attempt + 1``, with at least one attempt left),
        keeping the outputs and the resume state the earlier attempts saved; anything else ->
        FailedPrecondition(JOB_NOT_RETRYABLE)."""
        job = self.get(name)
        if job.state not in (JobState.FAILED, JobState.CANCELLED):
            raise FailedPrecondition(
                f"job {name} is {job.state.value}: only a FAILED or CANCELLED job can be retried",
                reason="JOB_NOT_RETRYABLE",
                metadata={"job": name, "state": job.state.value},
            )
        values = {
            "state": JobState.QUEUED.value,
            "attempt": job.attempt + 1,
            "max_attempts": max(job.max_attempts, job.attempt + 1),
            "worker": None,
            "heartbeat_at": None,
            "child_pid": None,
            "finished_at": None,
            "error": None,
            "cancel_requested": False,
        }
        with self.db.session() as s:
            res = s.execute(update(jobs).where(jobs.c.name == name, jobs.c.state == job.state.value).values(**values))
            if _rowcount(res) != 1:
                raise FailedPrecondition(f"job {name} changed state while retrying; retry", reason="JOB_STATE_CHANGED")
            event = NewEvent(
                EventType.STATE, "retried, queued", {"state": JobState.QUEUED.value, "attempt": job.attempt + 1}
            )
            self._append(s, name, [event])
            return self._get(s, name)

    # ----------------------------------------------------------------- internals

    @staticmethod
    def _owned(name: str, worker_id: str):
        return update(jobs).where(
            jobs.c.name == name, jobs.c.state == JobState.RUNNING.value, jobs.c.worker == worker_id
        )

    def _requeue(self, job: JobRecord, why: str, stale_before: datetime | None = None) -> bool:
        """Move a RUNNING job out of its lost attempt; False when it changed in the meantime."""
        now = utcnow()
        values: dict[str, Any]
        if job.cancel_requested:
            state, values = JobState.CANCELLED, {"finished_at": now}
            event = NewEvent(EventType.STATE, "cancelled", {"state": state.value, "why": why})
        elif job.attempt >= job.max_attempts:
            state = JobState.FAILED
            error = error_dict(
                Aborted(
                    f"job lost its attempt {job.attempt} of {job.max_attempts} ({why}); no attempts left",
                    reason=JOB_ATTEMPTS_EXHAUSTED,
                )
            )
            values = {"finished_at": now, "error": error}
            event = NewEvent(EventType.STATE, "failed", {"state": state.value, "error": error})
        else:
            state = JobState.QUEUED
            values = {"attempt": job.attempt + 1, "worker": None, "heartbeat_at": None, "child_pid": None}
            event = NewEvent(
                EventType.STATE, "worker lost, requeued", {"state": state.value, "why": why, "attempt": job.attempt + 1}
            )
        q = update(jobs).where(
            jobs.c.name == job.name,
            jobs.c.state == JobState.RUNNING.value,
            jobs.c.worker == job.worker,
            jobs.c.attempt == job.attempt,
        )
        if stale_before is not None:
            q = q.where(jobs.c.heartbeat_at < stale_before)
        with self.db.session() as s:
            if _rowcount(s.execute(q.values(state=state.value, **values))) != 1:
                return False
            self._append(s, job.name, [event])
        log.warning(
            "job_attempt_lost", job=job.name, attempt=job.attempt, worker=job.worker, why=why, state=state.value
        )
        return True

    @staticmethod
    def _get(s: Session, name: str) -> JobRecord:
        row = s.execute(select(jobs).where(jobs.c.name == name)).first()
        if row is None:
            raise NotFound(f"job {name} not found", metadata={"job": name})
        return _record(row)

    @staticmethod
    def _events(s: Session, name: str, after_seq: int, limit: int) -> builtins.list[JobEvent]:
        rows = s.execute(
            select(job_events)
            .where(job_events.c.job == name, job_events.c.seq > after_seq)
            .order_by(job_events.c.seq)
            .limit(limit)
        ).all()
        return [_event(r) for r in rows]

    @staticmethod
    def _append(s: Session, name: str, events: Sequence[NewEvent]) -> builtins.list[JobEvent]:
        if not events:
            return []
        # Reserve the sequence numbers first: the UPDATE locks the job row (and, on SQLite, the database)
        # so concurrent writers get disjoint ranges.
        res = s.execute(update(jobs).where(jobs.c.name == name).values(last_seq=jobs.c.last_seq + len(events)))
        if _rowcount(res) != 1:
            raise NotFound(f"job {name} not found", metadata={"job": name})
        last = s.execute(select(jobs.c.last_seq).where(jobs.c.name == name)).scalar_one()
        now = utcnow()
        stored = [
            JobEvent(
                job=name,
                seq=last - len(events) + i + 1,
                time=e.time or now,
                type=EventType(e.type),
                message=e.message,
                data=dict(e.data),
            )
            for i, e in enumerate(events)
        ]
        s.execute(
            insert(job_events),
            [
                {"job": e.job, "seq": e.seq, "time": e.time, "type": e.type.value, "message": e.message, "data": e.data}
                for e in stored
            ],
        )
        return stored
