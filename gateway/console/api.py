"""The console's JSON API (``/console/api/...``): read-only views of the services for the pages.

Every route needs a signed-in session (``auth.session``). A service that does not answer is a 503
naming it (``ServiceDown``); lists that span services (jobs, deployments) show what the others
answered and name the ones that did not in ``errors``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from services.core.errors import DomainError, InvalidArgument, NotFound

from ..errors import error_body
from ..routes.sse import event_stream
from .auth import console, session
from .convert import COLLECTIONS, job_summary, lineage_graph, to_json
from .events import job_event_stream
from .services import ConsoleServices

router = APIRouter(dependencies=[Depends(session)])

JOB_KINDS = ("training", "quantization", "evaluation", "import", "pipeline")
MAX_COMPARED = 8


def _services(request: Request) -> ConsoleServices:
    return console(request).services


def _limit(request: Request) -> int:
    return console(request).settings.console.list_limit


def _error_entry(service: str, exc: DomainError) -> dict[str, Any]:
    status, body = error_body(exc)
    return {"service": service, "status": status, **body["error"]}


# ----------------------------------------------------------------------------- models


@router.get("/models")
async def list_models(request: Request, filter: str = "", page_token: str = "") -> dict[str, Any]:
    services = _services(request)
    with services.calling("registry"):
        page = await services.registry.list_models(filter=filter, page_token=page_token, page_size=_limit(request))
    return {"models": [to_json(m) for m in page.models], "next_page_token": page.next_page_token}


@router.get("/models/{model}")
async def get_model(model: str, request: Request) -> dict[str, Any]:
    services = _services(request)
    name = f"models/{model}"
    with services.calling("registry"):
        found, versions = await asyncio.gather(
            services.registry.get_model(name),
            services.registry.list_model_versions(parent=name, page_size=_limit(request)),
        )
    return {"model": to_json(found), "versions": [to_json(v) for v in versions.model_versions]}


@router.get("/models/{model}/versions/{version}")
async def get_model_version(model: str, version: str, request: Request) -> dict[str, Any]:
    services = _services(request)
    name = f"models/{model}/versions/{version}"
    with services.calling("registry"):
        found, lineage = await asyncio.gather(
            services.registry.get_model_version(name), services.registry.get_lineage(name)
        )
    return {"version": to_json(found), "lineage": lineage_graph(lineage, name)}


# ----------------------------------------------------------------------------- datasets


@router.get("/datasets")
async def list_datasets(request: Request, filter: str = "", page_token: str = "") -> dict[str, Any]:
    services = _services(request)
    with services.calling("registry"):
        page = await services.registry.list_datasets(filter=filter, page_token=page_token, page_size=_limit(request))
    return {"datasets": [to_json(d) for d in page.datasets], "next_page_token": page.next_page_token}


@router.get("/datasets/{dataset}")
async def get_dataset(dataset: str, request: Request) -> dict[str, Any]:
    services = _services(request)
    name = f"datasets/{dataset}"
    with services.calling("registry"):
        found, versions = await asyncio.gather(
            services.registry.get_dataset(name),
            services.registry.list_dataset_versions(parent=name, page_size=_limit(request)),
        )
    return {"dataset": to_json(found), "versions": [to_json(v) for v in versions.dataset_versions]}


@router.get("/datasets/{dataset}/versions/{version}")
async def get_dataset_version(
    dataset: str,
    version: str,
    request: Request,
    model_version: str = "",
    max_length: int = Query(default=0, ge=0),
) -> dict[str, Any]:
    """The version, its validation report (token statistics with ``model_version``'s tokenizer) and what was
    trained on it (its lineage)."""
    services = _services(request)
    name = f"datasets/{dataset}/versions/{version}"
    with services.calling("registry"):
        found = await services.registry.get_dataset_version(name)
        report, lineage = await asyncio.gather(
            services.registry.validate_dataset(name, model_version=model_version, max_length=max_length),
            services.registry.get_lineage(name),
        )
    return {"version": to_json(found), "validation": to_json(report), "lineage": lineage_graph(lineage, name)}


# ----------------------------------------------------------------------------- jobs


def _page_items(page: Any, field: str) -> list[Any]:
    """The items of a list response (or of a ``(items, next_page_token)`` pair)."""
    if isinstance(page, tuple):
        return list(page[0])
    return list(getattr(page, field))


async def _list_kind(services: ConsoleServices, kind: str, limit: int) -> list[dict[str, Any]]:
    calls: dict[str, tuple[str, Callable[[], Awaitable[Any]], str]] = {
        "training": ("training", lambda: services.training.list_training_jobs(page_size=limit), "training_jobs"),
        "quantization": (
            "quantization",
            lambda: services.quantization.list_quantization_jobs(page_size=limit),
            "quantization_jobs",
        ),
        "evaluation": ("evaluation", lambda: services.evaluation.list_evaluations(page_size=limit), "evaluations"),
        "import": ("registry", lambda: services.registry.list_imports(page_size=limit), "model_imports"),
        "pipeline": ("pipeline", lambda: services.pipeline.list_pipeline_runs(page_size=limit), "runs"),
    }
    service, call, field = calls[kind]
    with services.calling(service):
        page = await call()
    return [job_summary(kind, job) for job in _page_items(page, field)]


@router.get("/jobs")
async def list_jobs(request: Request, kind: str = "", state: str = "") -> dict[str, Any]:
    """Jobs of every service (or of ``kind``, comma-separated), newest first; ``state`` filters (RUNNING...)."""
    kinds = [k.strip() for k in kind.split(",") if k.strip()] or list(JOB_KINDS)
    unknown = [k for k in kinds if k not in JOB_KINDS]
    if unknown:
        raise InvalidArgument.for_field("kind", f"unknown job kind {unknown[0]!r}; one of {', '.join(JOB_KINDS)}")
    services, limit = _services(request), _limit(request)
    results = await asyncio.gather(*(_list_kind(services, k, limit) for k in kinds), return_exceptions=True)
    jobs: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for k, result in zip(kinds, results, strict=True):
        if isinstance(result, DomainError):
            errors.append({"kind": k, **_error_entry(getattr(result, "service", k), result)})
        elif isinstance(result, BaseException):
            raise result
        else:
            jobs.extend(result)
    wanted = {s.strip().upper().removeprefix("JOB_STATE_") for s in state.split(",") if s.strip()}
    if wanted:
        jobs = [j for j in jobs if j["state"] in wanted]
    jobs.sort(key=lambda j: j["create_time"] or "", reverse=True)
    return {"jobs": jobs, "errors": errors}


def _job_kind(collection: str) -> str:
    if collection not in COLLECTIONS:
        raise NotFound(
            f"unknown job collection {collection!r}: one of {', '.join(COLLECTIONS)}",
            reason="JOB_COLLECTION_NOT_FOUND",
        )
    return COLLECTIONS[collection]


async def _get_job(services: ConsoleServices, kind: str, name: str) -> Any:
    if kind == "training":
        with services.calling("training"):
            return await services.training.get_training_job(name)
    if kind == "quantization":
        with services.calling("quantization"):
            return await services.quantization.get_quantization_job(name)
    if kind == "evaluation":
        with services.calling("evaluation"):
            return await services.evaluation.get_evaluation(name)
    if kind == "import":
        with services.calling("registry"):
            return await services.registry.get_import(name)
    with services.calling("pipeline"):
        return await services.pipeline.get_pipeline_run(name)


@router.get("/jobs/{collection}/{job_id}")
async def get_job(collection: str, job_id: str, request: Request) -> dict[str, Any]:
    kind = _job_kind(collection)
    job = await _get_job(_services(request), kind, f"{collection}/{job_id}")
    return {"kind": kind, "summary": job_summary(kind, job), "job": to_json(job)}


@router.get("/jobs/{collection}/{job_id}/events")
async def job_events(collection: str, job_id: str, request: Request, after: int = Query(default=0, ge=0)) -> Response:
    """The job's events as Server-Sent Events (``Last-Event-ID`` resumes after that sequence)."""
    kind = _job_kind(collection)
    last_id = request.headers.get("last-event-id", "")
    if last_id.isdigit():
        after = max(after, int(last_id))
    return event_stream(job_event_stream(_services(request), kind, f"{collection}/{job_id}", after), {})


# ----------------------------------------------------------------------------- deployments


@router.get("/deployments")
async def list_deployments(request: Request) -> dict[str, Any]:
    """Deployments of every inference replica the gateway routes to, with their state."""
    services, limit = _services(request), _limit(request)

    async def one(addr: str, client: Any) -> list[dict[str, Any]]:
        with services.calling("inference", addr):
            page = await client.list_deployments(page_size=limit)
        return [{**to_json(d), "replica": addr} for d in page.deployments]

    replicas = services.inference_replicas()
    results = await asyncio.gather(*(one(a, c) for a, c in replicas), return_exceptions=True)
    deployments: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for (addr, _), result in zip(replicas, results, strict=True):
        if isinstance(result, DomainError):
            errors.append({"replica": addr, **_error_entry("inference", result)})
        elif isinstance(result, BaseException):
            raise result
        else:
            deployments.extend(result)
    return {"deployments": deployments, "errors": errors}


# ----------------------------------------------------------------------------- evaluations


@router.get("/evaluations")
async def list_evaluations(request: Request, filter: str = "", page_token: str = "") -> dict[str, Any]:
    services = _services(request)
    with services.calling("evaluation"):
        page = await services.evaluation.list_evaluations(
            filter=filter, page_token=page_token, page_size=_limit(request)
        )
    return {
        "evaluations": [{**to_json(e), "summary": job_summary("evaluation", e)} for e in page.evaluations],
        "next_page_token": page.next_page_token,
    }


@router.get("/evaluations/compare")
async def compare_evaluations(
    request: Request, names: list[str] = Query(default_factory=list), changed: int = Query(default=20, ge=0, le=500)
) -> dict[str, Any]:
    """Metrics of N evaluations side by side, paired deltas against the first, changed samples."""
    wanted = [n if n.startswith("evaluations/") else f"evaluations/{n}" for n in names if n.strip()]
    if len(wanted) < 2 or len(wanted) > MAX_COMPARED:
        raise InvalidArgument.for_field("names", f"give between 2 and {MAX_COMPARED} evaluations, got {len(wanted)}")
    services = _services(request)
    with services.calling("evaluation"):
        compared = await services.evaluation.compare_evaluations(wanted, max_changed_samples=changed)
        evaluations = await asyncio.gather(*(services.evaluation.get_evaluation(n) for n in wanted))
    return {
        "comparison": to_json(compared),
        "evaluations": [job_summary("evaluation", e) for e in evaluations],
    }
