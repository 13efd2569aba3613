"""/healthz (the process answers), /readyz (some inference replica answers; with ``?model=NAME``: a
ready replica serves that model; 503 while the gateway drains), /metrics (Prometheus)."""

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
async def readyz(request: Request, model: str | None = None) -> JSONResponse:
    """200 when this gateway can take requests: not draining, some inference replica answers and,
    with ``model``, a ready replica serves that model (so it is 503 from an engine's death until
    its deployment is READY again)."""
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
    draining = request.app.state.drain.draining
    ready = router_.ready and not draining
    body: dict = {"status": "draining" if draining else "ready" if ready else "not_ready", "replicas": replicas}
    if model is not None:
        body["model"] = model
        body["model_ready"] = routable = any(t.model == model for t in router_.models())
        ready = ready and routable
        if not draining and not routable:
            body["status"] = "not_ready"
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics")
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
