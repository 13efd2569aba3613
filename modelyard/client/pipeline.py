"""``PipelineClient``: pipeline runs of the pipeline service."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping

from modelyard.common.v1 import common_pb2 as jpb
from modelyard.pipeline.v1 import pipeline_pb2 as ppb
from modelyard.pipeline.v1 import pipeline_pb2_grpc

from ._base import ServiceClient, follow_job, follow_pages


class PipelineClient(ServiceClient):
    """Typed async client of ``modelyard.pipeline.v1.PipelineService``."""

    _stub_class = pipeline_pb2_grpc.PipelineServiceStub

    async def create_pipeline_run(
        self,
        source: str,
        *,
        params: Mapping[str, str] | None = None,
        working_dir: str = "",
        display_name: str = "",
        labels: Mapping[str, str] | None = None,
        run_id: str = "",
        validate_only: bool = False,
        timeout: float | None = None,
    ) -> ppb.PipelineRun:
        """Queue a run of the pipeline document ``source`` (YAML or JSON). A malformed document raises
        ``InvalidArgument`` with one violation per problem (``steps.sft.hyperparameters.lr``); nothing runs."""
        run = ppb.PipelineRun(
            source=source, params=dict(params or {}), working_dir=working_dir, display_name=display_name,
            labels=dict(labels or {}),
        )  # fmt: skip
        return await self._unary(
            "CreatePipelineRun",
            ppb.CreatePipelineRunRequest(run=run, run_id=run_id, validate_only=validate_only),
            timeout,
        )

    async def get_pipeline_run(self, name: str, *, timeout: float | None = None) -> ppb.PipelineRun:
        return await self._unary("GetPipelineRun", ppb.GetPipelineRunRequest(name=name), timeout)

    async def list_pipeline_runs(
        self,
        *,
        filter: str = "",
        order_by: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> ppb.ListPipelineRunsResponse:
        return await self._unary(
            "ListPipelineRuns",
            ppb.ListPipelineRunsRequest(filter=filter, order_by=order_by, page_size=page_size, page_token=page_token),
            timeout,
        )

    def iter_pipeline_runs(
        self, *, filter: str = "", order_by: str = "", page_size: int = 0, limit: int = 0, timeout: float | None = None
    ) -> AsyncIterator[ppb.PipelineRun]:
        return follow_pages(
            lambda token: self.list_pipeline_runs(
                filter=filter, order_by=order_by, page_size=page_size, page_token=token, timeout=timeout
            ),
            "runs",
            limit,
        )

    async def cancel_pipeline_run(self, name: str, *, timeout: float | None = None) -> ppb.PipelineRun:
        """Stop the run and the job of its running step."""
        return await self._unary("CancelPipelineRun", ppb.CancelPipelineRunRequest(name=name), timeout)

    async def retry_pipeline_run(self, name: str, *, timeout: float | None = None) -> ppb.PipelineRun:
        """Queue a failed or cancelled run again; it resumes at the step that did not finish."""
        return await self._unary("RetryPipelineRun", ppb.RetryPipelineRunRequest(name=name), timeout)

    def watch_pipeline_run(
        self, name: str, *, after_sequence: int = 0, timeout: float | None = None
    ) -> AsyncIterator[jpb.JobEvent]:
        """The run's events (stored ones after ``after_sequence``, then live) until it ends."""
        return self._server_stream(
            "WatchPipelineRun", ppb.WatchPipelineRunRequest(name=name, after_sequence=after_sequence), timeout
        )

    async def wait_pipeline_run(
        self, name: str, *, on_event: Callable[[jpb.JobEvent], None] | None = None, timeout: float | None = None
    ) -> ppb.PipelineRun:
        """Follow the run until it ends (``on_event`` sees each event); the finished run."""
        return await follow_job(
            lambda after: self.watch_pipeline_run(name, after_sequence=after, timeout=timeout),
            lambda: self.get_pipeline_run(name),
            on_event,
        )
