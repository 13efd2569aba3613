"""GET /v1/models, /v1/models/{model}."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from .. import protocol as p
from ..auth.keys import ApiKey
from ..deps import api_key, state

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request, key: ApiKey = Depends(api_key)) -> p.ModelList:
    return state(request).models.list()


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request, key: ApiKey = Depends(api_key)) -> p.ModelCard:
    return await state(request).models.get(model)
