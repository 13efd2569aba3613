"""POST /v1/chat/completions, /v1/completions, /v1/embeddings."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from .. import protocol as p
from ..auth.keys import ApiKey
from ..deps import api_key, call_context, state
from ..serving import until_disconnect

router = APIRouter()

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def _json(model, headers: dict[str, str]) -> Response:
    return Response(model.model_dump_json(), media_type="application/json", headers=headers)


@router.post("/v1/chat/completions")
async def chat_completions(body: p.ChatCompletionRequest, request: Request,
                           key: ApiKey = Depends(api_key)) -> Response:
    serving = state(request).serving
    ctx = call_context(request, key, body.model, "chat.completions")
    if body.stream:
        upstream = await serving.start_chat(ctx, body)
        events = serving.sse(ctx, serving.chat_events(ctx, body, upstream), [upstream])
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers=SSE_HEADERS | ctx.reservation.headers)

    async def work() -> p.ChatCompletion:
        upstream = await serving.start_chat(ctx, body)
        return await serving.chat_collect(ctx, body, upstream)

    result = await until_disconnect(request.receive, work())
    return _json(result, ctx.reservation.headers)


@router.post("/v1/completions")
async def completions(body: p.CompletionRequest, request: Request, key: ApiKey = Depends(api_key)) -> Response:
    serving = state(request).serving
    ctx = call_context(request, key, body.model, "completions")
    if body.stream:
        upstreams = await serving.start_completion(ctx, body)
        events = serving.sse(ctx, serving.completion_events(ctx, body, upstreams), upstreams)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers=SSE_HEADERS | ctx.reservation.headers)

    async def work() -> p.Completion:
        upstreams = await serving.start_completion(ctx, body)
        return await serving.completion_collect(ctx, body, upstreams)

    result = await until_disconnect(request.receive, work())
    return _json(result, ctx.reservation.headers)


@router.post("/v1/embeddings")
async def embeddings(body: p.EmbeddingRequest, request: Request, key: ApiKey = Depends(api_key)) -> Response:
    serving = state(request).serving
    ctx = call_context(request, key, body.model, "embeddings")
    result = await until_disconnect(request.receive, serving.embed(ctx, body))
    return _json(result, ctx.reservation.headers)
