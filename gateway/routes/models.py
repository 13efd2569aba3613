"""GET /v1/models."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from .. import protocol as p
from ..auth.keys import ApiKey
from ..deps import api_key, state

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request, key: ApiKey = Depends(api_key)) -> p.ModelList:
    cards = []
    for t in state(request).serving.router.models():
        parent = t.model.rsplit(":", 1)[0] if t.adapter else None
        cards.append(p.ModelCard(id=t.model, created=t.created, root=t.model_version, parent=parent))
    return p.ModelList(data=cards)


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request, key: ApiKey = Depends(api_key)) -> p.ModelCard:
    router_ = state(request).serving.router
    await router_.resolve(model)  # 404 when unknown
    _, t = router_.pick(model)  # 503 when known but not ready anywhere
    parent = t.model.rsplit(":", 1)[0] if t.adapter else None
    return p.ModelCard(id=t.model, created=t.created, root=t.model_version, parent=parent)
