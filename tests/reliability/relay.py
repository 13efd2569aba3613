"""A TCP relay on loopback in front of the real S3 server, for timing a failure to a known point of a transfer.

The relay passes bytes through unchanged. A ``Tap`` watches the client's requests for a pattern (e.g. the
request line of one object's PUT); once it matches, the relay lets ``after_bytes`` more bytes through in the
tap's direction and then holds that connection: nothing more passes either way, the peers stay connected and
wait, and ``Tap.hit`` is set. The test then does its damage (SIGKILL the uploader, restart the S3 server) and
calls ``release()``, which closes the held connections. Each tap fires once.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass, field

_BODY = b"<html><body><h1>503 Service Unavailable</h1></body></html>\n"
UNAVAILABLE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/html\r\nContent-Length: %d\r\n"
               b"Connection: close\r\n\r\n%s" % (len(_BODY), _BODY))  # what nginx answers with no backend
_REQUEST_LINE = re.compile(rb"(GET|PUT|POST|DELETE|HEAD) (/\S*) HTTP/1\.[01]\r\n")


@dataclass
class Tap:
    pattern: bytes  # a regex, searched in what the client sends
    after_bytes: int = 0  # bytes let through after the match starts (counted in ``direction``)
    direction: str = "up"  # "up": client -> server, "down": server -> client (e.g. a response body)
    hit: asyncio.Event = field(default_factory=asyncio.Event)
    armed: bool = True
    matched: bytes = b""


class _Conn:
    def __init__(self) -> None:
        self.holding = asyncio.Event()
        self.released = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []
        self.tap: Tap | None = None  # the tap that matched on this connection
        self.left = 0  # bytes still let through in the tap's direction


class Relay:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.taps: list[Tap] = []
        self.requests: list[str] = []  # "METHOD /path?query" of every request the clients sent
        # When set, the relay stands for a load balancer whose backend is away: it answers every new connection's
        # first request with this (e.g. a 503 with an HTML body) and closes it.
        self.answer: bytes | None = None
        self.answered = 0
        self.server: asyncio.Server | None = None
        self.port = 0
        self._held: list[_Conn] = []
        self._conns: set[_Conn] = set()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> Relay:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.release()
        for conn in list(self._conns):
            _close(conn)
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def tap(self, pattern: bytes, after_bytes: int = 0, direction: str = "up") -> Tap:
        t = Tap(pattern, after_bytes, direction)
        self.taps.append(t)
        return t

    def release(self) -> None:
        """Close every held connection (both peers see it closed)."""
        held, self._held = self._held, []
        for conn in held:
            conn.released.set()
            _close(conn)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self.answer is not None:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                await client_r.readuntil(b"\r\n\r\n")
                client_w.write(self.answer)
                await client_w.drain()
                self.answered += 1
            client_w.close()
            return
        conn = _Conn()
        self._conns.add(conn)
        try:
            server_r, server_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()  # the S3 server is down: the client sees its connection closed
            self._conns.discard(conn)
            return
        conn.writers = [client_w, server_w]
        try:
            await asyncio.gather(self._pipe(conn, client_r, server_w, "up"), self._pipe(conn, server_r, client_w, "down"))
            if conn.holding.is_set():
                await conn.released.wait()  # held: both peers stay connected, nothing passes
        finally:
            _close(conn)
            self._conns.discard(conn)

    async def _pipe(self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        window = b""
        try:
            while not conn.holding.is_set():
                chunk = await reader.read(1 << 16)
                if not chunk or conn.holding.is_set():
                    break
                send = chunk
                if direction == "up":
                    self.requests += [f"{m[1].decode()} {m[2].decode()}" for m in _REQUEST_LINE.finditer(chunk)]
                if direction == "up" and conn.tap is None:
                    window = window[-256:] + chunk
                    for tap in self.taps:
                        m = re.search(tap.pattern, window) if tap.armed else None
                        if m:
                            tap.armed, tap.matched, conn.tap = False, m.group(0), tap
                            conn.left = tap.after_bytes
                            if tap.direction == "up":  # count from the start of the match
                                conn.left = max(0, conn.left + m.start() - (len(window) - len(chunk)))
                            break
                if conn.tap is not None and conn.tap.direction == direction:
                    if len(send) >= conn.left:
                        send = send[:conn.left]
                        self._hold(conn)
                    conn.left -= len(send)
                if send:
                    writer.write(send)
                    await writer.drain()
        except (ConnectionError, OSError):
            pass
        if not conn.holding.is_set():
            _close(conn)  # one side closed: so does the other

    def _hold(self, conn: _Conn) -> None:
        conn.holding.set()
        self._held.append(conn)
        assert conn.tap is not None
        conn.tap.hit.set()


def _close(conn: _Conn) -> None:
    for w in conn.writers:
        with contextlib.suppress(Exception):
            w.transport.abort()
