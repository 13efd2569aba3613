"""``EvaluationClient``: evaluations and the benchmark catalogue of the evaluation service."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from modelyard.common.v1 import common_pb2 as jpb
from modelyard.evaluation.v1 import evaluation_pb2 as epb
from modelyard.evaluation.v1 import evaluation_pb2_grpc

from ._base import ServiceClient, follow_job, follow_pages


class EvaluationClient(ServiceClient):
    """Typed async client of ``modelyard.evaluation.v1.EvaluationService``."""

    _stub_class = evaluation_pb2_grpc.EvaluationServiceStub

    async def create_evaluation(
        self,
        evaluation: epb.Evaluation,
        *,
        evaluation_id: str = "",
        validate_only: bool = False,
        timeout: float | None = None,
    ) -> epb.Evaluation:
        """Queue an evaluation (checked first: an unknown benchmark or target raises ``InvalidArgument`` /
        ``NotFound`` naming the field). ``validate_only`` checks without storing anything."""
        return await self._unary(
            "CreateEvaluation",
            epb.CreateEvaluationRequest(
                evaluation=evaluation, evaluation_id=evaluation_id, validate_only=validate_only
            ),
            timeout,
        )

    async def get_evaluation(self, name: str, *, timeout: float | None = None) -> epb.Evaluation:
        return await self._unary("GetEvaluation", epb.GetEvaluationRequest(name=name), timeout)

    async def list_evaluations(
        self,
        *,
        filter: str = "",
        order_by: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> epb.ListEvaluationsResponse:
        return await self._unary(
            "ListEvaluations",
            epb.ListEvaluationsRequest(filter=filter, order_by=order_by, page_size=page_size, page_token=page_token),
            timeout,
        )

    def iter_evaluations(
        self, *, filter: str = "", order_by: str = "", page_size: int = 0, limit: int = 0, timeout: float | None = None
    ) -> AsyncIterator[epb.Evaluation]:
        return follow_pages(
            lambda token: self.list_evaluations(
                filter=filter, order_by=order_by, page_size=page_size, page_token=token, timeout=timeout
            ),
            "evaluations",
            limit,
        )

    async def cancel_evaluation(self, name: str, *, timeout: float | None = None) -> epb.Evaluation:
        return await self._unary("CancelEvaluation", epb.CancelEvaluationRequest(name=name), timeout)

    def watch_evaluation(
        self, name: str, *, after_sequence: int = 0, timeout: float | None = None
    ) -> AsyncIterator[jpb.JobEvent]:
        """The evaluation's events (stored ones after ``after_sequence``, then live) until it ends."""
        return self._server_stream(
            "WatchEvaluation", epb.WatchEvaluationRequest(name=name, after_sequence=after_sequence), timeout
        )

    async def wait_evaluation(
        self, name: str, *, on_event: Callable[[jpb.JobEvent], None] | None = None, timeout: float | None = None
    ) -> epb.Evaluation:
        """Follow the evaluation until it ends (``on_event`` sees each event); the finished evaluation."""
        return await follow_job(
            lambda after: self.watch_evaluation(name, after_sequence=after, timeout=timeout),
            lambda: self.get_evaluation(name),
            on_event,
        )

    async def compare_evaluations(
        self,
        names: list[str],
        *,
        benchmarks: list[str] | None = None,
        max_changed_samples: int = 0,
        timeout: float | None = None,
    ) -> epb.CompareEvaluationsResponse:
        """Metrics side by side; paired deltas (with 95% intervals) of each evaluation against the first; the
        samples whose primary score changed."""
        return await self._unary(
            "CompareEvaluations",
            epb.CompareEvaluationsRequest(
                names=names, benchmarks=benchmarks or [], max_changed_samples=max_changed_samples
            ),
            timeout,
        )

    async def list_benchmarks(
        self,
        *,
        filter: str = "",
        order_by: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> epb.ListBenchmarksResponse:
        return await self._unary(
            "ListBenchmarks",
            epb.ListBenchmarksRequest(filter=filter, order_by=order_by, page_size=page_size, page_token=page_token),
            timeout,
        )

    def iter_benchmarks(
        self, *, filter: str = "", order_by: str = "", limit: int = 0, timeout: float | None = None
    ) -> AsyncIterator[epb.Benchmark]:
        return follow_pages(
            lambda token: self.list_benchmarks(
                filter=filter, order_by=order_by, page_size=200, page_token=token, timeout=timeout
            ),
            "benchmarks",
            limit,
        )
