"""Pacing of token streams between the engine and the gRPC calls.

Every message of a stream costs the same on each hop after the engine (a gRPC write and read, an
SSE event, the client's parse), whatever it carries; under load those costs take CPU from the
engine. ``Pacer`` turns pacing on while at least ``min_streams`` streams are open on this service
(under that, every chunk is forwarded as it arrives). A paced stream forwards its first batch at
once (time to first token is never delayed), then at most one batch per interval: whatever the
engine produced meanwhile goes out together, merged by ``protocol.chat_chunks`` into one message
per run. The interval grows with the load so that the service's messages per second stay about
``messages_per_s`` whatever the number of streams: ``interval_s`` (the floor) up to
``max_interval_s``, ``open streams / messages_per_s`` in between (16 streams at 80/s: 200 ms).
A stream slower than one token per interval is forwarded token by token, as it arrives; a fast
one (a light load on a fast engine, or many streams) is sent in bursts — fewer, larger messages
for the same tokens. The end of the stream (the last tokens, finish reason and usage) and an
engine error are forwarded as soon as they come. An engine that paces a stream itself (the
transformers engine with this rule, vLLM with a per-request ``stream_interval``) does it before it
serializes anything; the service then forwards that stream as it comes (``Pacer.stream(pace=False)``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from services.core.logging import get_logger

from .metrics import OPEN_STREAMS, TASK_ERRORS

log = get_logger(__name__)

Batch = list[dict[str, Any]]


@dataclass(frozen=True)
class Pacing:
    """The pacing rule (see ``Pacer``), shared by the service and the transformers engine's server,
    which applies it before its SSE writes (fewer events for the engine to write and the service
    to read)."""

    interval_s: float = 0.0
    max_interval_s: float = 0.0
    messages_per_s: float = 0.0
    min_streams: int = 1

    def pacer(self) -> Pacer:
        return Pacer(self.interval_s, self.min_streams, max_interval_s=self.max_interval_s,
                     messages_per_s=self.messages_per_s)

    def args(self) -> list[str]:
        """Command-line flags of ``transformers_server`` for this rule."""
        return ["--stream-interval-ms", f"{self.interval_s * 1000:g}",
                "--stream-max-interval-ms", f"{self.max_interval_s * 1000:g}",
                "--stream-messages-per-s", f"{self.messages_per_s:g}",
                "--stream-pacing-min-streams", str(self.min_streams)]


class Pacer:
    """Counts the open streams of the service and paces them while there are ``min_streams`` or more."""

    def __init__(self, interval_s: float, min_streams: int, *, max_interval_s: float | None = None,
                 messages_per_s: float = 0.0) -> None:
        self.interval_s = max(0.0, interval_s)
        self.max_interval_s = self.interval_s if max_interval_s is None else max(self.interval_s, max_interval_s)
        self.messages_per_s = max(0.0, messages_per_s)
        self.min_streams = max(1, min_streams)
        self.open_streams = 0

    def interval(self) -> float:
        """Seconds between two messages of a paced stream now (0: not paced)."""
        if self.open_streams < self.min_streams or self.interval_s <= 0:
            return 0.0
        if self.messages_per_s <= 0:
            return self.interval_s
        return min(self.max_interval_s, max(self.interval_s, self.open_streams / self.messages_per_s))

    async def stream(self, stream: AsyncIterator[Batch], *, pace: bool = True) -> AsyncIterator[Batch]:
        """``stream`` paced while the service is busy; closing it closes ``stream`` (the engine aborts).
        ``pace=False``: counted as open but forwarded as it comes (the engine paces it already)."""
        self.open_streams += 1
        OPEN_STREAMS.inc()
        try:
            if self.interval_s <= 0 or not pace:
                async for batch in stream:
                    yield batch
            else:
                async with contextlib.aclosing(paced(stream, self.interval)) as batches:
                    async for batch in batches:
                        yield batch
        finally:
            self.open_streams -= 1
            OPEN_STREAMS.dec()
            await stream.aclose()


async def paced(stream: AsyncIterator[Batch], interval: Callable[[], float]) -> AsyncIterator[Batch]:
    """The batches of ``stream``, merged so that at most one goes out per ``interval()`` seconds after
    the first (``interval()`` is read at each send: 0 forwards each batch as it comes).

    A reader task collects the batches; the writer (this generator) sleeps until the first batch
    after a send, then, if its slot is still ahead, until the slot (one timer, no task: this runs
    for every message of every stream) or the end of the stream, whichever comes first.

    Closing this generator (the gRPC call was cancelled) cancels the reader and closes ``stream``,
    which aborts the engine request."""
    loop = asyncio.get_running_loop()
    pending: Batch = []
    wake = asyncio.Event()  # set by the reader on the first batch after a send and at the end
    outcome: list[BaseException | None] = []  # set when the engine stream ended (None) or failed

    async def read() -> None:
        try:
            async for batch in stream:
                if not pending:
                    wake.set()
                pending.extend(batch)
            outcome.append(None)
        except Exception as exc:  # noqa: BLE001 - re-raised by the writer after what came before it
            outcome.append(exc)
        finally:
            wake.set()

    reader = asyncio.ensure_future(read())
    timer: asyncio.TimerHandle | None = None
    last_sent = float("-inf")
    try:
        while True:
            await wake.wait()
            wake.clear()
            slot = last_sent + interval()
            if not outcome and slot > loop.time():
                # gather what else arrives until this stream's next slot; the end of the stream
                # (finish reason, usage) goes out at once
                timer = loop.call_at(slot, wake.set)
                await wake.wait()
                wake.clear()
                timer.cancel()
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
        if timer is not None:
            timer.cancel()
        reader.cancel()
        try:
            await _reap(reader)
        finally:
            await stream.aclose()


async def _reap(reader: asyncio.Future) -> None:
    """Wait for the cancelled reader of ``paced`` (the engine stream must not be closed while it
    still reads it). Its own cancellation is expected; a cancellation of the caller is passed on;
    any other error (the reader keeps the engine's errors for the writer, so one here is a bug)
    is logged and counted rather than raised over what the caller is already handling."""
    try:
        await reader
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
    except Exception as exc:  # noqa: BLE001 - logged and counted, see above
        TASK_ERRORS.labels("stream_reader", type(exc).__name__).inc()
        log.error("stream_reader_failed", error=f"{type(exc).__name__}: {exc}")
