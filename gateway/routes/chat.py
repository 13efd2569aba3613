"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from .. import protocol as p
from ..auth.keys import ApiKey
from ..deps import api_key, call_context, state
from ..serving import until_disconnect
from .sse import event_stream, json_response

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(body: p.ChatCompletionRequest, request: Request, key: ApiKey = Depends(api_key)) -> Response:
    serving = state(request).chat
    ctx = call_context(request, key, body.model, "chat.completions")
    if body.stream:
        events = await serving.stream(ctx, body)
        return event_stream(events, ctx.headers)
    result = await until_disconnect(request.receive, serving.create(ctx, body))
    return json_response(result, ctx.headers)
