"""POST /v1/chat/completions, /v1/completions, /v1/embeddings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from .. import protocol as p
from ..auth.keys import ApiKey
from ..deps import api_key, call_context, state
from ..serving import DONE, until_disconnect

router = APIRouter()

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class EventStream(Response):
    """A ``text/event-stream`` of ready SSE events, each sent as it comes.

    Starlette's StreamingResponse watches for the client's disconnect with an anyio task group per
    request (uvicorn speaks ASGI 2.3), which costs more than the rest of a short stream. Here one
    plain task watches ``receive``: a disconnect cancels the streaming (so the events' generator
    closes its upstream gRPC calls at once) and the response then returns normally, as Starlette's.
    The OpenAI stream's last event, ``data: [DONE]``, also ends the body: the server writes it with
    the chunked-encoding terminator, one write (and one pass through the middlewares) less.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[bytes, None], headers: Mapping[str, str]) -> None:
        self.events = events
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        body_open, disconnected = True, False

        async def watch() -> None:
            nonlocal disconnected
            while (await receive())["type"] != "http.disconnect":
                pass
            if body_open:  # the end of the response (and receive's answer to it) cancels nothing
                disconnected = True
                task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for event in self.events:
                body_open = event != DONE
                await send({"type": "http.response.body", "body": event, "more_body": body_open})
            if body_open:
                body_open = False
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not disconnected or task.uncancel():
                raise
            await self.events.aclose()  # cancelled in a send: the generator waits at a yield
        finally:
            watcher.cancel()


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
        return EventStream(events, SSE_HEADERS | ctx.reservation.headers)

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
        return EventStream(events, SSE_HEADERS | ctx.reservation.headers)

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
