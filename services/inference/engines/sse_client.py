"""The streaming half of the engine client: POST a JSON body, read the SSE answer, on keep-alive
connections to the engine's loopback server.

Every token of every stream crosses this code, so it is built for cost per event rather than
generality: an ``asyncio.Protocol`` with the C HTTP parser of ``httptools`` (the one uvicorn uses),
body bytes parsed into events straight from ``data_received``, and one wake-up of the reading task
per socket read however many events it carried (httpx costs several awaits and a few layers per
read). Only what the engines' servers need is supported: HTTP/1.1 over plain TCP, a JSON body,
chunked or sized answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httptools

Batch = list[dict[str, Any]]


class SseEvents:
    """Incremental parser of an OpenAI SSE stream: ``feed`` takes bytes as they come and returns the
    JSON payloads of every event they completed. ``done`` turns true at ``data: [DONE]``."""

    def __init__(self) -> None:
        self._buf = b""
        self.done = False

    def feed(self, data: bytes) -> Batch:
        buf = self._buf + data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        complete, sep, self._buf = buf.rpartition(b"\n\n")
        out: Batch = []
        if not sep or self.done:
            return out
        for line in complete.split(b"\n"):
            if not line.startswith(b"data:"):
                continue  # blank separators, comments, other fields
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                break
            out.append(json.loads(payload))
        return out


class ConnectionLost(Exception):
    """The connection closed (or failed) before the answer ended; ``answered`` tells whether any
    byte of the answer had arrived (a request on a reused connection that got nothing may be sent again)."""

    def __init__(self, message: str, answered: bool) -> None:
        super().__init__(message)
        self.answered = answered


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; serves one request at a time."""

    def __init__(self, on_lost: Callable[[_Connection], None]) -> None:
        self.transport: asyncio.Transport | None = None
        self._on_lost = on_lost
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.answered = False
        self.error: ConnectionLost | None = None
        self.events: SseEvents | None = None
        self.pending: Batch = []
        self.raw = bytearray()  # the body of a non-200 answer
        self.wake = asyncio.Event()

    # -------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.answered = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"malformed HTTP answer: {exc}")
            if self.transport is not None:
                self.transport.close()
        except ValueError as exc:  # a data: line that is not JSON
            self._fail(f"malformed event in the stream: {exc}")
            if self.transport is not None:
                self.transport.close()
        self.wake.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            self._fail(f"connection closed: {exc}" if exc else "connection closed")
        self.wake.set()
        self._on_lost(self)

    def _fail(self, message: str) -> None:
        if self.error is None:
            self.error = ConnectionLost(message, self.answered)

    # -------------------------------------------------------------- httptools callbacks

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.headers_done = True
        if self.status == 200:
            self.events = SseEvents()

    def on_body(self, body: bytes) -> None:
        if self.events is not None:
            self.pending.extend(self.events.feed(body))
        else:
            self.raw.extend(body)

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self._parser.should_keep_alive()  # read now: the parser resets after the message

    # -------------------------------------------------------------- use

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed

    def send(self, request: bytes) -> None:
        self._reset()
        assert self.transport is not None
        self.transport.write(request)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()


class SseClient:
    """Streams SSE answers of POST requests from one ``host:port``, keeping idle connections."""

    def __init__(self, host: str, port: int, *, connect_timeout_s: float = 5.0, max_idle: int = 64) -> None:
        self._host = host
        self._port = port
        self._connect_timeout = connect_timeout_s
        self._max_idle = max_idle
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout):
            _, conn = await loop.create_connection(lambda: _Connection(self._forget), self._host, self._port)
        self._open.add(conn)
        return conn

    def _forget(self, conn: _Connection) -> None:
        self._open.discard(conn)
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)

    def _request(self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> bytes:
        payload = json.dumps(body).encode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        head = (f"POST {path} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\nContent-Type: application/json\r\n"
                f"Accept: text/event-stream\r\n{extra}Content-Length: {len(payload)}\r\n\r\n")
        return head.encode() + payload

    async def stream(self, path: str, body: dict[str, Any],
                     headers: dict[str, str] | None = None) -> AsyncIterator[tuple[int, Batch | bytes]]:
        """Yields ``(200, batch)`` for each read that completed events, until ``[DONE]``; or one
        ``(status, body)`` for an answer other than 200. Raises ``ConnectionLost`` (also for a 200
        answer that ended without ``[DONE]``), or ``OSError`` / ``TimeoutError`` from connecting.
        Closing the generator early closes the connection, which is how the engine learns that
        the request was abandoned."""
        request = self._request(path, body, headers)
        while True:
            reused = self._idle.pop() if self._idle else None
            conn = reused or await self._connect()
            conn.send(request)
            if reused is None:
                break
            await conn.wake.wait()  # a kept connection the server closed meanwhile answers nothing: retry
            if conn.error is None or conn.error.answered:
                break
        try:
            while True:
                if conn.events is not None and conn.events.done and not conn.pending:
                    # [DONE] came; the end of the chunked body follows at once (then the connection is kept)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            while not (conn.complete or conn.error):
                                await conn.wake.wait()
                                conn.wake.clear()
                    return
                await conn.wake.wait()
                conn.wake.clear()
                if conn.headers_done and conn.status != 200:
                    if conn.complete:
                        yield conn.status, bytes(conn.raw)
                        return
                elif conn.pending:
                    batch, conn.pending = conn.pending, []
                    yield 200, batch
                if conn.error is not None:
                    raise conn.error
                if conn.complete and not (conn.events is not None and conn.events.done):
                    raise ConnectionLost("the answer ended without [DONE]", True)
        finally:
            if conn.reusable() and len(self._idle) < self._max_idle:
                self._idle.append(conn)
            else:
                conn.close()

    async def aclose(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._idle.clear()
