"""gRPC servicer of PipelineService: proto <-> domain only."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from google.protobuf import duration_pb2

from modelyard.common.v1 import common_pb2 as cpb
from modelyard.pipeline.v1 import pipeline_pb2 as pb
from modelyard.pipeline.v1 import pipeline_pb2_grpc
from services.core.errors import error_to_domain
from services.core.jobs import JobRecord
from services.core.jobs.protos import events_to_proto, job_fields, timestamp
from services.core.status import to_status_proto

from .domain import PipelineRuns, RunRequest


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def _time(text: str | None):
    return timestamp(datetime.fromisoformat(text)) if text else None


def _step(entry: dict[str, str], st: dict[str, Any]) -> pb.StepStatus:
    msg = pb.StepStatus(
        id=entry["id"],
        type=entry["type"],
        state=pb.StepState.Value(f"STEP_STATE_{st.get('state', 'PENDING')}"),
        resource=st.get("resource", ""),
        outputs={k: str(v) for k, v in (st.get("outputs") or {}).items()},
        start_time=_time(st.get("start_time")),
        end_time=_time(st.get("end_time")),
        fraction=float(st.get("fraction") or 0.0),
        attempt_count=int(st.get("attempts") or 0),
    )
    if st.get("error"):
        msg.error.CopyFrom(to_status_proto(error_to_domain(st["error"])))
    return msg


def report_to_proto(r: dict[str, Any]) -> pb.PipelineReport:
    return pb.PipelineReport(
        rows=[pb.ReportRow(**row) for row in r.get("rows", [])],
        deltas=[pb.ReportDelta(**d) for d in r.get("deltas", [])],
        step_times=[pb.StepTime(step=t["step"], duration=_duration(t["seconds"])) for t in r.get("step_times", [])],
        notes=r.get("notes", []),
        benchmark=r.get("benchmark", ""),
        metric=r.get("metric", ""),
    )


def job_to_proto(job: JobRecord) -> pb.PipelineRun:
    out = job.outputs or {}
    states = out.get("steps") or {}
    outputs = pb.PipelineOutputs()
    if out.get("report"):
        outputs.report.CopyFrom(report_to_proto(out["report"]))
    return pb.PipelineRun(
        **job_fields(job),
        outputs=outputs,
        display_name=job.spec.get("display_name", ""),
        source=job.spec.get("source", ""),
        params=job.spec.get("params", {}),
        labels=job.labels or {},
        steps=[_step(e, states.get(e["id"], {})) for e in job.spec.get("steps", [])],
        working_dir=job.spec.get("working_dir", ""),
    )


class PipelineServicer(pipeline_pb2_grpc.PipelineServiceServicer):
    def __init__(self, runs: PipelineRuns) -> None:
        self._runs = runs

    async def CreatePipelineRun(self, request, context):
        r = request.run
        req = RunRequest(
            source=r.source, params=dict(r.params), working_dir=r.working_dir, display_name=r.display_name,
            labels=dict(r.labels), run_id=request.run_id,
        )  # fmt: skip
        run = job_to_proto(await self._runs.create(req, validate_only=request.validate_only))
        if request.validate_only:  # as it would be queued: nothing was stored
            run.state = cpb.JOB_STATE_UNSPECIFIED
            run.ClearField("create_time")
        return run

    async def GetPipelineRun(self, request, context):
        return job_to_proto(await self._runs.get(request.name))

    async def ListPipelineRuns(self, request, context):
        page = await self._runs.list(
            filter=request.filter, order_by=request.order_by, page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListPipelineRunsResponse(
            runs=[job_to_proto(j) for j in page.items], next_page_token=page.next_page_token
        )

    async def CancelPipelineRun(self, request, context):
        return job_to_proto(await self._runs.cancel(request.name))

    async def RetryPipelineRun(self, request, context):
        return job_to_proto(await self._runs.retry(request.name))

    async def WatchPipelineRun(self, request, context) -> AsyncIterator[cpb.JobEvent]:
        async for event in events_to_proto(self._runs.watch(request.name, request.after_sequence)):
            yield event
