"""GET /v1/models, /v1/models/{model}: the models the key's project may use (others: 404, as if absent)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from .. import protocol as p
from ..auth.projects import ModelAccess
from ..deps import model_access, state

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request, access: ModelAccess = Depends(model_access)) -> p.ModelList:
    return state(request).models.list(access)


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request, access: ModelAccess = Depends(model_access)) -> p.ModelCard:
    st = state(request)
    p.check_model_name(model, st.settings.limits)
    return await st.models.get(model, access)
