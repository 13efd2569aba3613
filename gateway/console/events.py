"""A job's events as Server-Sent Events, from the services' Watch RPCs.

Each JobEvent is one SSE message (``id:`` its sequence, ``data:`` its JSON): the stored events first,
then live ones. When the job ends the stream sends ``event: end`` and closes; a failure (the service
went away, the job does not exist) is ``event: problem`` with the OpenAI-style error JSON, then the
end of the stream. A browser that loses the connection reconnects with ``Last-Event-ID`` and the
stream resumes after that sequence. A comment line every ``KEEPALIVE_S`` keeps idle proxies open.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

from services.core.errors import DomainError, Internal

from ..errors import error_body
from .convert import TERMINAL, event_json, job_state
from .services import ConsoleServices

KEEPALIVE_S = 15.0
REWATCH_BACKOFF_S = 0.5
_END = object()


def sse(data: dict[str, Any], *, event: str | None = None, event_id: int | None = None) -> bytes:
    head = (f"event: {event}\n" if event else "") + (f"id: {event_id}\n" if event_id is not None else "")
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


async def _with_keepalive(source: AsyncIterator[Any], interval: float) -> AsyncGenerator[Any, None]:
    """Items of ``source``, and None whenever ``interval`` passes without one (the source is read by a
    task of its own, so a keep-alive never cancels a pending read of the gRPC stream)."""
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=256)

    async def pump() -> None:
        try:
            async for item in source:
                await queue.put(item)
            await queue.put(_END)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put(_Failure(exc))

    task = asyncio.ensure_future(pump())
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), interval)
            except TimeoutError:
                yield None
                continue
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        task.cancel()
        try:
            await task
        except BaseException:  # noqa: BLE001 - the pump's own cancellation
            pass


# kind -> (service, client property of ConsoleServices, its Watch method, its Get method)
_WATCH = {
    "training": ("training", "training", "watch_training_job", "get_training_job"),
    "quantization": ("quantization", "quantization", "watch_quantization_job", "get_quantization_job"),
    "evaluation": ("evaluation", "evaluation", "watch_evaluation", "get_evaluation"),
    "import": ("registry", "registry", "watch_import", "get_import"),
    "pipeline": ("pipeline", "pipeline", "watch_pipeline_run", "get_pipeline_run"),
}


def watchers(
    services: ConsoleServices, kind: str, name: str
) -> tuple[str, Callable[[int], AsyncIterator[Any]], Callable[[], Awaitable[Any]]]:
    """(service, watch(after_sequence), get()) of the job ``name`` of ``kind``."""
    if kind not in _WATCH:
        raise Internal(f"no watcher for job kind {kind!r}")
    service, attr, watch, get = _WATCH[kind]
    with services.calling(service):
        client = getattr(services, attr)  # the pipeline SDK may be missing: ServiceDown
    return (
        service,
        lambda after: getattr(client, watch)(name, after_sequence=after),
        lambda: getattr(client, get)(name),
    )


async def job_event_stream(
    services: ConsoleServices, kind: str, name: str, after: int, keepalive_s: float = KEEPALIVE_S
) -> AsyncGenerator[bytes, None]:
    """The SSE body of one job's events after sequence ``after``."""
    yield b"retry: 2000\n\n"
    last = after
    try:
        service, watch, get = watchers(services, kind, name)
        while True:
            seen = last
            with services.calling(service):
                async with aclosing(_with_keepalive(watch(last), keepalive_s)) as events:
                    async for event in events:
                        if event is None:
                            yield b": keepalive\n\n"
                            continue
                        last = event.sequence
                        yield sse(event_json(event), event_id=last)
                job = await get()
            if job.state in TERMINAL:
                yield sse({"state": job_state(job.state)}, event="end")
                return
            if last == seen:  # the watch ended early with nothing new (a server draining): watch again
                await asyncio.sleep(REWATCH_BACKOFF_S)
    except DomainError as exc:
        _, body = error_body(exc)
        yield sse(body, event="problem")
