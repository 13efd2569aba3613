"""A job collection as a gRPC resource (``{collection}/{id}``): get, cancel, watch and list over the
``JobStore``, shared by the services whose resources are jobs (training, quantization, evaluation).
A service subclasses it and adds its own create."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

from ..errors import InvalidArgument
from ..listing import Page, Schema, parse
from ..logging import get_logger
from .records import JobEvent, JobRecord, JobState
from .store import JobStore
from .stream import watch

log = get_logger(__name__)

JOB_ID_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class JobResource:
    """Reads and cancel of the jobs of ``kinds`` named ``{collection}/{id}``, listed with ``schema``."""

    def __init__(
        self, store: JobStore, *, collection: str, kinds: Sequence[str], schema: Schema, max_attempts: int = 3
    ) -> None:
        self.store = store
        self.collection = collection
        self.kinds = tuple(kinds)
        self.schema = schema
        self.max_attempts = max_attempts

    def job_id(self, name: str, field_name: str = "name") -> str:
        """``{collection}/{id}`` -> id (InvalidArgument naming ``field_name`` otherwise)."""
        collection, _, jid = name.partition("/")
        if collection != self.collection or not JOB_ID_RE.match(jid):
            raise InvalidArgument.for_field(field_name, f"{name!r} must look like {self.collection}/{{job}}")
        return jid

    def preview(self, kind: str, name: str, spec: dict[str, Any], labels: dict[str, str]) -> JobRecord:
        """The job as it would be queued, not stored (``validate_only`` creates)."""
        return JobRecord(
            name=name,
            kind=kind,
            state=JobState.QUEUED,
            spec=spec,
            attempt=0,
            max_attempts=self.max_attempts,
            worker=None,
            created_at=datetime.now(UTC),
            started_at=None,
            finished_at=None,
            heartbeat_at=None,
            labels=labels,
        )

    async def get(self, name: str) -> JobRecord:
        self.job_id(name)
        return await asyncio.to_thread(self.store.get, name)

    async def cancel(self, name: str) -> JobRecord:
        self.job_id(name)
        job = await asyncio.to_thread(self.store.request_cancel, name)
        log.info("job_cancel_requested", job=name, state=job.state.value)
        return job

    async def retry(self, name: str) -> JobRecord:
        """Queue a FAILED or CANCELLED job again as a new attempt; what earlier attempts saved
        (``save_resume_state``) tells it where to resume."""
        self.job_id(name)
        job = await asyncio.to_thread(self.store.retry, name)
        log.info("job_retried", job=name, attempt=job.attempt)
        return job

    async def watch(self, name: str, after_seq: int = 0) -> AsyncIterator[JobEvent]:
        self.job_id(name)
        if after_seq < 0:
            raise InvalidArgument.for_field("after_sequence", f"must be >= 0, got {after_seq}")
        await asyncio.to_thread(self.store.get, name)  # NotFound before the stream starts
        async for event in watch(self.store, name, after_seq):
            yield event

    async def list(
        self, *, filter: str = "", order_by: str = "", page_size: int = 0, page_token: str = ""
    ) -> Page[JobRecord]:
        """One page of this collection's jobs, filtered, ordered and paged in SQL."""
        query = parse(self.schema, filter=filter, order_by=order_by, page_size=page_size, page_token=page_token)
        return await asyncio.to_thread(self.store.list, query, self.schema, kinds=self.kinds)
