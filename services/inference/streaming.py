"""Pacing of token streams between the engine and the gRPC calls.

Every message of a stream costs the same on each hop after the engine (a gRPC write and read, an
SSE event, the client's parse), whatever it carries; under load those costs take CPU from the
engine. ``Pacer`` turns pacing on while at least ``min_streams`` streams are open on this service
(under that, every chunk is forwarded as it arrives). A paced stream forwards its first batch at
once (time to first token is never delayed), then at most one batch per ``interval_s``:
whatever the engine produced meanwhile goes out together, merged by ``protocol.chat_chunks`` into
one message per run. A stream slower than one token per interval is forwarded token by token, as
it arrives; a fast one (a light load on a fast engine, or many streams) is sent in bursts of at
most ``interval_s`` — fewer, larger messages for the same tokens. The end of the stream (the
last tokens, finish reason and usage) and an engine error are forwarded as soon as they come.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

Batch = list[dict[str, Any]]


class Pacer:
    """Counts the open streams of the service and paces them while there are ``min_streams`` or more."""

    def __init__(self, interval_s: float, min_streams: int) -> None:
        self.interval_s = max(0.0, interval_s)
        self.min_streams = max(1, min_streams)
        self.open_streams = 0

    def interval(self) -> float:
        return self.interval_s if self.open_streams >= self.min_streams else 0.0

    async def stream(self, stream: AsyncIterator[Batch]) -> AsyncIterator[Batch]:
        """``stream`` paced while the service is busy; closing it closes ``stream`` (the engine aborts)."""
        self.open_streams += 1
        try:
            if self.interval_s <= 0:
                async for batch in stream:
                    yield batch
            else:
                async with contextlib.aclosing(paced(stream, self.interval)) as batches:
                    async for batch in batches:
                        yield batch
        finally:
            self.open_streams -= 1
            await stream.aclose()


async def paced(stream: AsyncIterator[Batch], interval: Callable[[], float]) -> AsyncIterator[Batch]:
    """The batches of ``stream``, merged so that at most one goes out per ``interval()`` seconds after
    the first (``interval()`` is read at each send: 0 forwards each batch as it comes).

    Closing this generator (the gRPC call was cancelled) cancels the reader and closes ``stream``,
    which aborts the engine request."""
    loop = asyncio.get_running_loop()
    pending: Batch = []
    wake = asyncio.Event()
    ended = asyncio.Event()
    outcome: list[BaseException | None] = []  # set when the engine stream ended (None) or failed

    async def read() -> None:
        try:
            async for batch in stream:
                pending.extend(batch)
                wake.set()
            outcome.append(None)
        except Exception as exc:  # noqa: BLE001 - re-raised by the writer after what came before it
            outcome.append(exc)
        finally:
            ended.set()
            wake.set()

    reader = asyncio.ensure_future(read())
    last_sent = float("-inf")
    try:
        while True:
            await wake.wait()
            wake.clear()
            wait = last_sent + interval() - loop.time()
            if wait > 0 and not ended.is_set():
                # gather what else arrives until this stream's next slot; the end of the stream
                # (finish reason, usage) goes out at once
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ended.wait(), wait)
            if pending:
                out = pending[:]
                pending.clear()
                last_sent = loop.time()
                yield out
            if outcome and not pending:
                if outcome[0] is not None:
                    raise outcome[0]
                return
    finally:
        reader.cancel()
        with contextlib.suppress(BaseException):
            await reader
        await stream.aclose()
