"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, events, checkpoints (gateway/finetune/jobs.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request

from services.core.errors import InvalidArgument

from ..auth.keys import ApiKey
from ..auth.projects import ModelAccess
from ..deps import api_key, model_access
from ..finetune.jobs import FineTuning
from ..finetune.protocol import FineTuningJobRequest

router = APIRouter()
JOBS = "/v1/fine_tuning/jobs"


def jobs(request: Request) -> FineTuning:
    service: FineTuning = request.app.state.fine_tuning
    return service


def _page(data: list[dict[str, Any]], more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "has_more": more}


def _metadata_filter(request: Request) -> dict[str, str]:
    """``metadata[k]=v`` query parameters (the SDK's deep-object form) as a dict."""
    out: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name.startswith("metadata[") and name.endswith("]"):
            out[name[9:-1]] = value
        elif name == "metadata" and value not in ("", "null"):
            raise InvalidArgument.for_field("metadata", "filter with metadata[KEY]=VALUE")
    return out


@router.post(JOBS)
async def create_job(
    body: FineTuningJobRequest,
    request: Request,
    key: ApiKey = Depends(api_key),
    access: ModelAccess = Depends(model_access),
) -> dict[str, Any]:
    request.scope.setdefault("state", {})["model"] = body.model
    return await jobs(request).create(key.project, access, body)


@router.get(JOBS)
async def list_jobs(
    request: Request,
    after: str | None = Query(None, max_length=100),
    limit: int = Query(20, ge=1, le=100),
    key: ApiKey = Depends(api_key),
) -> dict[str, Any]:
    data, more = await jobs(request).list(key.project, limit=limit, after=after, metadata=_metadata_filter(request))
    return _page(data, more)


@router.get(JOBS + "/{job_id}")
async def retrieve_job(job_id: str, request: Request, key: ApiKey = Depends(api_key)) -> dict[str, Any]:
    return await jobs(request).get(key.project, job_id)


@router.post(JOBS + "/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request, key: ApiKey = Depends(api_key)) -> dict[str, Any]:
    return await jobs(request).cancel(key.project, job_id)


@router.get(JOBS + "/{job_id}/events")
async def list_events(
    job_id: str,
    request: Request,
    after: str | None = Query(None, max_length=100),
    limit: int = Query(20, ge=1, le=1000),
    key: ApiKey = Depends(api_key),
) -> dict[str, Any]:
    data, more = await jobs(request).events(key.project, job_id, limit=limit, after=after)
    return _page(data, more)


@router.get(JOBS + "/{job_id}/checkpoints")
async def list_checkpoints(
    job_id: str,
    request: Request,
    after: str | None = Query(None, max_length=100),
    limit: int = Query(10, ge=1, le=100),
    key: ApiKey = Depends(api_key),
) -> dict[str, Any]:
    data, more = await jobs(request).checkpoints(key.project, job_id, limit=limit, after=after)
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return {**_page(data, more), "first_id": first, "last_id": last}
