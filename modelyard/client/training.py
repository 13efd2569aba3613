"""``TrainingClient``: training and merge jobs of the training service."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from modelyard.common.v1 import common_pb2 as jpb
from modelyard.training.v1 import training_pb2 as tpb
from modelyard.training.v1 import training_pb2_grpc

from ._base import ServiceClient, follow_job, follow_pages

# Short spellings accepted in a TrainingJobSpec given as data (YAML, --set): `precision: bf16`, `type: deepspeed`.
ENUM_PREFIXES = {
    "method": "TRAINING_METHOD_",
    "lr_scheduler": "LR_SCHEDULER_",
    "precision": "PRECISION_",
    "type": "LAUNCHER_TYPE_",
    "zero_stage": "ZERO_STAGE_",
}


def full_enum_names(value: Any, key: str = "") -> Any:
    """Short enum spellings (``bf16``, ``deepspeed``, ``2``) -> the proto JSON names, recursively."""
    if isinstance(value, dict):
        return {k: full_enum_names(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [full_enum_names(v, key) for v in value]
    prefix = ENUM_PREFIXES.get(key)
    if prefix and isinstance(value, str | int) and not str(value).upper().startswith(prefix):
        return prefix + str(value).upper()
    return value


class TrainingClient(ServiceClient):
    """Typed async client of ``modelyard.training.v1.TrainingService``."""

    _stub_class = training_pb2_grpc.TrainingServiceStub

    async def create_training_job(
        self,
        training_job: tpb.TrainingJob,
        *,
        training_job_id: str = "",
        validate_only: bool = False,
        timeout: float | None = None,
    ) -> tpb.TrainingJob:
        """Queue a job (checked first: a bad spec raises ``InvalidArgument`` with field violations).

        ``validate_only`` runs preflight and returns the job as it would be queued (every default
        resolved, state unspecified) without storing anything."""
        return await self._unary(
            "CreateTrainingJob",
            tpb.CreateTrainingJobRequest(
                training_job=training_job, training_job_id=training_job_id, validate_only=validate_only
            ),
            timeout,
        )

    async def get_training_job(self, name: str, *, timeout: float | None = None) -> tpb.TrainingJob:
        return await self._unary("GetTrainingJob", tpb.GetTrainingJobRequest(name=name), timeout)

    async def list_training_jobs(
        self,
        *,
        filter: str = "",
        order_by: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> tpb.ListTrainingJobsResponse:
        return await self._unary(
            "ListTrainingJobs",
            tpb.ListTrainingJobsRequest(filter=filter, order_by=order_by, page_size=page_size, page_token=page_token),
            timeout,
        )

    def iter_training_jobs(
        self, *, filter: str = "", order_by: str = "", page_size: int = 0, limit: int = 0, timeout: float | None = None
    ) -> AsyncIterator[tpb.TrainingJob]:
        return follow_pages(
            lambda token: self.list_training_jobs(
                filter=filter, order_by=order_by, page_size=page_size, page_token=token, timeout=timeout
            ),
            "training_jobs",
            limit,
        )

    async def cancel_training_job(self, name: str, *, timeout: float | None = None) -> tpb.TrainingJob:
        return await self._unary("CancelTrainingJob", tpb.CancelTrainingJobRequest(name=name), timeout)

    def watch_training_job(
        self, name: str, *, after_sequence: int = 0, timeout: float | None = None
    ) -> AsyncIterator[jpb.JobEvent]:
        """The job's events (stored ones after ``after_sequence``, then live) until it ends."""
        return self._server_stream(
            "WatchTrainingJob", tpb.WatchTrainingJobRequest(name=name, after_sequence=after_sequence), timeout
        )

    async def wait_training_job(
        self, name: str, *, on_event: Callable[[jpb.JobEvent], None] | None = None, timeout: float | None = None
    ) -> tpb.TrainingJob:
        """Follow the job until it ends (``on_event`` sees each event); the finished job."""
        return await follow_job(
            lambda after: self.watch_training_job(name, after_sequence=after, timeout=timeout),
            lambda: self.get_training_job(name),
            on_event,
        )

    async def list_checkpoints(
        self,
        *,
        parent: str,
        filter: str = "",
        order_by: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> tpb.ListCheckpointsResponse:
        return await self._unary(
            "ListCheckpoints",
            tpb.ListCheckpointsRequest(
                parent=parent, filter=filter, order_by=order_by, page_size=page_size, page_token=page_token
            ),
            timeout,
        )

    def iter_checkpoints(
        self,
        *,
        parent: str,
        filter: str = "",
        order_by: str = "",
        page_size: int = 0,
        limit: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[tpb.Checkpoint]:
        return follow_pages(
            lambda token: self.list_checkpoints(
                parent=parent, filter=filter, order_by=order_by, page_size=page_size, page_token=token, timeout=timeout
            ),
            "checkpoints",
            limit,
        )

    async def merge_adapter(
        self,
        *,
        adapter_version: str,
        output_model: str = "",
        training_job_id: str = "",
        display_name: str = "",
        timeout: float | None = None,
    ) -> tpb.MergeAdapterResponse:
        """Queue a job merging ``adapter_version`` into its base (``response.training_job``)."""
        return await self._unary(
            "MergeAdapter",
            tpb.MergeAdapterRequest(
                adapter_version=adapter_version,
                output_model=output_model,
                training_job_id=training_job_id,
                display_name=display_name,
            ),
            timeout,
        )
