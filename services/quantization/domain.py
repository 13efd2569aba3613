"""Quantization jobs as a resource: create (after preflight), get, list, cancel, watch.

Jobs live in the shared job runtime (``JobStore``, kind ``quantize``); names are
``quantizationJobs/{id}``; ListQuantizationJobs filters and orders in SQL (``services.core.listing``).
"""

from __future__ import annotations

import asyncio
import uuid

from services.core.jobs import JobRecord, JobStore
from services.core.jobs.resource import JobResource
from services.core.jobs.store import job_schema, jobs
from services.core.listing import EQUALITY, Field, enum_value
from services.core.logging import get_logger

from .methods import BACKENDS, METHODS, PROTO_METHODS
from .preflight import Preflight, QuantizationRequest

log = get_logger(__name__)

COLLECTION = "quantizationJobs"
KIND_QUANTIZE = "quantize"
JOB_KINDS = {KIND_QUANTIZE: "services.quantization.job:run_quantization"}

_METHOD_BY_PROTO = {k.lower(): v for k, v in PROTO_METHODS.items()}


def _method_value(text: str) -> str:
    """``gptq``, ``QUANTIZATION_METHOD_GPTQ`` or ``w8a8_int8`` -> the method name stored in the job's labels."""
    v = text.strip().strip('"').lower().removeprefix("quantization_method_")
    v = _METHOD_BY_PROTO.get(v, v)
    if v not in METHODS:
        raise ValueError(f"unknown method {text!r}; one of {', '.join(METHODS)}")
    return v


# ListQuantizationJobs: the shared job fields plus ``method``, ``backend`` and ``source_model_version``.
JOB_SCHEMA = job_schema(
    {
        "method": Field(
            jobs.c.labels["method"].as_string(), lambda j: j.labels.get("method"), parse=_method_value, ops=EQUALITY
        ),
        "backend": Field(
            jobs.c.labels["backend"].as_string(),
            lambda j: j.labels.get("backend"),
            parse=enum_value("QUANTIZATION_BACKEND_", choices=list(BACKENDS)),
            ops=EQUALITY,
        ),
        "source_model_version": Field(
            jobs.c.labels["source"].as_string(), lambda j: j.labels.get("source"), ops=EQUALITY
        ),
    }
)


class QuantizationJobs(JobResource):
    """The quantization service's domain: preflight then queue; reads (get, list, cancel, watch) are
    ``JobResource``'s."""

    def __init__(self, store: JobStore, preflight: Preflight, *, max_attempts: int = 3) -> None:
        super().__init__(
            store, collection=COLLECTION, kinds=list(JOB_KINDS), schema=JOB_SCHEMA, max_attempts=max_attempts
        )
        self.preflight = preflight

    async def create(self, req: QuantizationRequest, *, validate_only: bool = False) -> JobRecord:
        result = await self.preflight.check(req)
        spec = {**result.spec, "preflight": result.summary}
        labels = {"method": spec["method"], "backend": spec["backend"], "source": req.source_model_version}
        if validate_only:
            return self.preview(KIND_QUANTIZE, f"{COLLECTION}/{req.job_id}" if req.job_id else "", spec, labels)
        name = f"{COLLECTION}/{req.job_id or _new_id(spec['method'])}"
        job = await asyncio.to_thread(self.store.create, KIND_QUANTIZE, spec, name, self.max_attempts, labels)
        log.info(
            "quantization_job_created",
            job=name,
            method=spec["method"],
            backend=spec["backend"],
            source=req.source_model_version,
            estimated_bytes=result.summary["estimated_memory_bytes"],
        )
        return job


def _new_id(method: str) -> str:
    return f"{method}-{uuid.uuid4().hex[:10]}"
