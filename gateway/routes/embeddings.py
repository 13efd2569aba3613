"""POST /v1/embeddings."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from .. import protocol as p
from ..auth.keys import ApiKey
from ..deps import api_key, call_context, state
from ..serving import until_disconnect
from .sse import json_response

router = APIRouter()


@router.post("/v1/embeddings")
async def embeddings(body: p.EmbeddingRequest, request: Request, key: ApiKey = Depends(api_key)) -> Response:
    serving = state(request).embeddings
    ctx = call_context(request, key, body.model, "embeddings")
    result = await until_disconnect(request.receive, serving.create(ctx, body))
    return json_response(result, ctx.headers)
