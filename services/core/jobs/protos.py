"""Job records as the common protos every job resource shares (``modelyard.common.v1``).

Training jobs, registry imports and the coming quantization and evaluation jobs carry the same job
fields (state, error, progress, times, attempt count) and stream the same ``JobEvent``s; their
servicers build those parts here and add only their own fields.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from datetime import datetime
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2
from google.rpc import status_pb2

from modelyard.common.v1 import common_pb2 as cpb

from ..errors import error_to_domain
from ..status import to_status_proto
from .records import EventType, JobEvent, JobRecord, JobState

JOB_STATES: dict[JobState, Any] = {s: getattr(cpb, f"JOB_STATE_{s.value}") for s in JobState}
# Progress fields reported as metrics in a JobEvent (the names Watch clients see).
PROGRESS_KEYS = {"fraction": "progress_fraction", "total_steps": "total_steps", "eta_s": "eta_seconds"}


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def progress_to_proto(progress: dict[str, Any] | None) -> cpb.JobProgress:
    p = progress or {}
    msg = cpb.JobProgress(
        fraction=p.get("fraction") or 0.0,
        step=p.get("step") or 0,
        total_steps=p.get("total_steps") or 0,
        metrics=_numbers(p.get("metrics") or {}),
    )
    if p.get("eta_s") is not None:
        msg.eta.CopyFrom(duration_pb2.Duration(seconds=int(p["eta_s"])))
    return msg


def error_status(job: JobRecord) -> status_pb2.Status | None:
    err = job.domain_error()
    return to_status_proto(err) if err is not None else None


def job_fields(job: JobRecord) -> dict[str, Any]:
    """Job fields 1-8 (name, state, error, progress, create/start/end time, attempt_count) as keyword
    arguments of any job resource message."""
    fields: dict[str, Any] = {
        "name": job.name,
        "state": JOB_STATES[job.state],
        "progress": progress_to_proto(job.progress),
        "create_time": timestamp(job.created_at),
        "start_time": timestamp(job.started_at),
        "end_time": timestamp(job.finished_at),
        "attempt_count": job.attempt if job.started_at else 0,
    }
    status = error_status(job)
    if status is not None:
        fields["error"] = status
    return fields


def event_to_proto(event: JobEvent, previous: JobState | None) -> cpb.JobEvent:
    """A stored event as a common JobEvent: state changes (with the error of a failure), metrics and
    progress (as JobMetrics, see PROGRESS_KEYS), and log lines."""
    msg = cpb.JobEvent(sequence=event.seq, time=timestamp(event.time))
    data = event.data or {}
    if event.type == EventType.STATE:
        change = cpb.JobStateChange(
            previous_state=JOB_STATES[previous] if previous else cpb.JOB_STATE_UNSPECIFIED,
            state=JOB_STATES[JobState(data["state"])],
        )
        if data.get("error"):
            change.error.CopyFrom(to_status_proto(error_to_domain(data["error"])))
        msg.state_change.CopyFrom(change)
    elif event.type == EventType.METRICS:
        values = _numbers({k: v for k, v in data.items() if k != "step"})
        msg.metrics.CopyFrom(cpb.JobMetrics(step=data.get("step") or 0, values=values))
    elif event.type == EventType.PROGRESS:
        values = {PROGRESS_KEYS[k]: float(v) for k, v in data.items() if k in PROGRESS_KEYS and v is not None}
        msg.metrics.CopyFrom(cpb.JobMetrics(step=data.get("step") or 0, values=values))
    else:
        fields = " ".join(f"{k}={v}" for k, v in data.items() if k not in ("stream", "traceback"))
        msg.log.CopyFrom(cpb.JobLogLine(line=f"{event.message} {fields}".rstrip()))
    return msg


async def events_to_proto(events: AsyncIterable[JobEvent]) -> AsyncIterator[cpb.JobEvent]:
    """A Watch RPC's stream: each stored event as a JobEvent, each state change naming the one before."""
    previous: JobState | None = None
    async for event in events:
        yield event_to_proto(event, previous)
        if event.type == EventType.STATE:
            previous = JobState(event.data["state"])
