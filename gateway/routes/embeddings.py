"""POST /v1/embeddings."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from .. import protocol as p
from ..auth.keys import ApiKey
from ..auth.projects import ModelAccess
from ..deps import api_key, call_context, model_access, state
from ..serving import until_disconnect
from .sse import json_response

router = APIRouter()


@router.post("/v1/embeddings")
async def embeddings(
    body: p.EmbeddingRequest,
    request: Request,
    key: ApiKey = Depends(api_key),
    access: ModelAccess = Depends(model_access),
) -> Response:
    st = state(request)
    body.check_limits(st.settings.limits)
    serving = st.embeddings
    ctx = call_context(request, key, body.model, "embeddings", access)
    result = await until_disconnect(request.receive, serving.create(ctx, body))
    return json_response(result, ctx.headers)
