"""``QuantizationClient``: quantization jobs of the quantization service."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from modelyard.common.v1 import common_pb2 as jpb
from modelyard.quantization.v1 import quantization_pb2 as qpb
from modelyard.quantization.v1 import quantization_pb2_grpc

from ._base import ServiceClient, follow_job, follow_pages


class QuantizationClient(ServiceClient):
    """Typed async client of ``modelyard.quantization.v1.QuantizationService``."""

    _stub_class = quantization_pb2_grpc.QuantizationServiceStub

    async def create_quantization_job(
        self,
        quantization_job: qpb.QuantizationJob,
        *,
        quantization_job_id: str = "",
        validate_only: bool = False,
        timeout: float | None = None,
    ) -> qpb.QuantizationJob:
        """Queue a job (checked first: a bad spec raises ``InvalidArgument`` with field violations).

        ``validate_only`` runs preflight and returns the job as it would be queued (every default
        resolved, state unspecified) without storing anything."""
        return await self._unary(
            "CreateQuantizationJob",
            qpb.CreateQuantizationJobRequest(
                quantization_job=quantization_job,
                quantization_job_id=quantization_job_id,
                validate_only=validate_only,
            ),
            timeout,
        )

    async def get_quantization_job(self, name: str, *, timeout: float | None = None) -> qpb.QuantizationJob:
        return await self._unary("GetQuantizationJob", qpb.GetQuantizationJobRequest(name=name), timeout)

    async def list_quantization_jobs(
        self,
        *,
        filter: str = "",
        order_by: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> qpb.ListQuantizationJobsResponse:
        return await self._unary(
            "ListQuantizationJobs",
            qpb.ListQuantizationJobsRequest(
                filter=filter, order_by=order_by, page_size=page_size, page_token=page_token
            ),
            timeout,
        )

    def iter_quantization_jobs(
        self, *, filter: str = "", order_by: str = "", page_size: int = 0, limit: int = 0, timeout: float | None = None
    ) -> AsyncIterator[qpb.QuantizationJob]:
        return follow_pages(
            lambda token: self.list_quantization_jobs(
                filter=filter, order_by=order_by, page_size=page_size, page_token=token, timeout=timeout
            ),
            "quantization_jobs",
            limit,
        )

    async def cancel_quantization_job(self, name: str, *, timeout: float | None = None) -> qpb.QuantizationJob:
        return await self._unary("CancelQuantizationJob", qpb.CancelQuantizationJobRequest(name=name), timeout)

    def watch_quantization_job(
        self, name: str, *, after_sequence: int = 0, timeout: float | None = None
    ) -> AsyncIterator[jpb.JobEvent]:
        """The job's events (stored ones after ``after_sequence``, then live) until it ends."""
        return self._server_stream(
            "WatchQuantizationJob", qpb.WatchQuantizationJobRequest(name=name, after_sequence=after_sequence), timeout
        )

    async def wait_quantization_job(
        self, name: str, *, on_event: Callable[[jpb.JobEvent], None] | None = None, timeout: float | None = None
    ) -> qpb.QuantizationJob:
        """Follow the job until it ends (``on_event`` sees each event); the finished job."""
        return await follow_job(
            lambda after: self.watch_quantization_job(name, after_sequence=after, timeout=timeout),
            lambda: self.get_quantization_job(name),
            on_event,
        )
