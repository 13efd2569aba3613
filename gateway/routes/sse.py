"""Responses of the generation routes: the lean SSE stream and plain JSON."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping

from fastapi.responses import Response
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from ..serving import DONE

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
        assert task is not None
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


def event_stream(events: AsyncGenerator[bytes, None], headers: Mapping[str, str]) -> EventStream:
    return EventStream(events, SSE_HEADERS | dict(headers))


def json_response(model: BaseModel, headers: Mapping[str, str]) -> Response:
    return Response(model.model_dump_json(), media_type="application/json", headers=dict(headers))
