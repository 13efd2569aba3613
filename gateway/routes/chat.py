"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from .. import protocol as p
from ..auth.keys import ApiKey
from ..auth.projects import ModelAccess
from ..deps import api_key, call_context, model_access, state
from ..serving import until_disconnect
from .hot import JsonBodyRoute
from .sse import event_stream, json_response

router = APIRouter(route_class=JsonBodyRoute)  # see hot.py: the body validated from its bytes


@router.post("/v1/chat/completions")
async def chat_completions(
    body: p.ChatCompletionRequest,
    request: Request,
    key: ApiKey = Depends(api_key),
    access: ModelAccess = Depends(model_access),
) -> Response:
    st = state(request)
    body.check_limits(st.settings.limits)
    serving = st.chat
    ctx = call_context(request, key, body.model, "chat.completions", access)
    if body.stream:
        events = await serving.stream(ctx, body)
        return event_stream(events, ctx.headers)
    result = await until_disconnect(request.receive, serving.create(ctx, body))
    return json_response(result, ctx.headers)
