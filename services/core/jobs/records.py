"""Plain records of the job runtime: states, jobs and events. A job's ``error`` is the one stored error
form of ``services.core.errors`` (``error_dict`` / ``error_to_domain``, re-exported here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from ..errors import DomainError, error_to_domain

# Reasons the runtime itself puts in a job's error.
JOB_CRASHED = "JOB_CRASHED"
JOB_ATTEMPTS_EXHAUSTED = "JOB_ATTEMPTS_EXHAUSTED"


class JobState(StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class EventType(StrEnum):
    LOG = "log"
    METRICS = "metrics"
    STATE = "state"
    PROGRESS = "progress"


def empty_progress() -> dict[str, Any]:
    return {"fraction": None, "step": None, "total_steps": None, "eta_s": None, "metrics": {}}


@dataclass
class JobRecord:
    """A job as stored. ``error`` is ``{code, reason, message, domain, metadata, violations}`` or None."""

    name: str
    kind: str
    state: JobState
    spec: dict[str, Any]
    attempt: int
    max_attempts: int
    worker: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    progress: dict[str, Any] = field(default_factory=empty_progress)
    error: dict[str, Any] | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    cancel_requested: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    resume_state: dict[str, Any] | None = None
    child_pid: int | None = None

    def domain_error(self) -> DomainError | None:
        """The stored error as a typed DomainError (for servicers building a google.rpc.Status)."""
        if self.error is None:
            return None
        return error_to_domain(self.error)


@dataclass
class JobEvent:
    job: str
    seq: int
    time: datetime
    type: EventType
    message: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class NewEvent:
    """An event before the store gives it a sequence number."""

    type: EventType
    message: str
    data: dict[str, Any] = field(default_factory=dict)
    time: datetime | None = None
