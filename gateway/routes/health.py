"""/healthz (the process answers), /readyz (some inference replica answers), /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..deps import state

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    router_ = state(request).router
    replicas = [
        {
            "address": r.addr,
            "listed": r.listed,
            "ejected": r.ejected,
            "outstanding": r.outstanding,
            "models": sorted(r.ready),
            "error": r.last_error or None,
        }
        for r in router_.replicas
    ]
    ready = router_.ready
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "replicas": replicas}, status_code=200 if ready else 503
    )


@router.get("/metrics")
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
