"""Per-key request (rpm) and token (tpm) limits, and usage accounting.

``QuotaLimiter.reserve`` and ``Reservation.settle`` are plain synchronous code on the event loop,
so each is one atomic step per key: concurrent requests can never race past a limit. A request
reserves its prompt estimate + max_tokens before the call and settles to the engine's real usage
after. With Redis configured (``gateway.shared_state``) ``QuotaLimiter.acquire`` reserves in one
window per key shared by every gateway replica instead (one Lua script per reserve and per settle,
so atomic there too); the in-process windows are its fallback while Redis is unreachable.

Usage records are keyed by request id (a retried id counts once) and written in batches by a
background task, never on the request path.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite

from services.core.db import Database, utcnow
from services.core.errors import Unavailable
from services.core.logging import get_logger

from .auth.keys import ApiKey
from .errors import RateLimited
from .metrics import REDIS_FALLBACKS
from .store import DEFAULT_PROJECT, usage_records

log = get_logger("modelyard.gateway.quota")

WINDOW_S = 60.0


@dataclass(eq=False)
class _Entry:
    at: float
    tokens: int
    expired: bool = False


@dataclass
class _Window:
    entries: deque[_Entry] = field(default_factory=deque)
    tokens: int = 0

    def prune(self, now: float) -> None:
        while self.entries and self.entries[0].at <= now - WINDOW_S:
            old = self.entries.popleft()
            old.expired = True
            self.tokens -= old.tokens


@dataclass
class Reservation:
    """Tokens held for one request until it settles to the real count."""

    window: _Window | None
    entry: _Entry | None
    headers: dict[str, str]
    on_settle: Callable[[int], None] | None = None  # a shared (Redis) window's correction

    def settle(self, tokens: int) -> None:
        if self.on_settle is not None:
            settle, self.on_settle = self.on_settle, None
            settle(tokens)
            return
        if self.window is None or self.entry is None:
            return
        if not self.entry.expired:  # still counted in the window
            self.window.tokens += tokens - self.entry.tokens
        self.entry.tokens = tokens
        self.entry = None


def estimate_tokens(text_chars: int) -> int:
    """A cheap prompt estimate (about 4 characters a token) for the reservation; settled later."""
    return max(1, math.ceil(text_chars / 4))


def _reset(seconds: float) -> str:
    return f"{max(0.0, seconds):.3f}s"


def rate_headers(key: ApiKey, requests: int, tokens: int, reset_s: float) -> dict[str, str]:
    """The x-ratelimit-* headers for a window holding ``requests`` and ``tokens``."""
    headers: dict[str, str] = {}
    if key.rpm:
        headers |= {
            "x-ratelimit-limit-requests": str(key.rpm),
            "x-ratelimit-remaining-requests": str(max(0, key.rpm - requests)),
            "x-ratelimit-reset-requests": _reset(reset_s),
        }
    if key.tpm:
        headers |= {
            "x-ratelimit-limit-tokens": str(key.tpm),
            "x-ratelimit-remaining-tokens": str(max(0, key.tpm - tokens)),
            "x-ratelimit-reset-tokens": _reset(reset_s),
        }
    return headers


class SharedWindows(Protocol):
    """Rate-limit windows shared by the gateway replicas (``gateway.shared_state.RedisWindows``)."""

    async def reserve(self, key: ApiKey, tokens: int) -> Reservation:
        """Like ``QuotaLimiter.reserve``; raises ``SharedStateUnavailable`` when it cannot tell."""
        ...


class SharedStateUnavailable(Exception):
    """Redis could not be asked (down, timed out, or skipped for a while after a failure)."""


class QuotaLimiter:
    """Per-key sliding windows of one minute. ``shared``: Redis windows, used by ``acquire``; while
    Redis is unreachable, ``fail_open`` picks between this process's own windows (the limits then
    hold per replica) and refusing the request with 503."""

    def __init__(self, shared: SharedWindows | None = None, *, fail_open: bool = True) -> None:
        self._windows: dict[str, _Window] = {}
        self._shared = shared
        self._fail_open = fail_open

    async def acquire(self, key: ApiKey, tokens: int) -> Reservation:
        """Reserve for one request, in the shared windows when there are some (the request path)."""
        if self._shared is None or (not key.rpm and not key.tpm):
            return self.reserve(key, tokens)
        try:
            return await self._shared.reserve(key, tokens)
        except SharedStateUnavailable:
            REDIS_FALLBACKS.labels("local" if self._fail_open else "refused").inc()
            if self._fail_open:
                return self.reserve(key, tokens)
            raise Unavailable(
                "Rate limits cannot be checked right now (the gateway's shared state is unreachable); "
                "retry in a moment.",
                reason="RATE_LIMITER_UNAVAILABLE",
            ) from None

    def reserve(self, key: ApiKey, tokens: int, *, now: float | None = None) -> Reservation:
        """Count one request and hold ``tokens``, or raise RateLimited (429) with its headers."""
        if not key.rpm and not key.tpm:
            return Reservation(None, None, {})
        now = time.monotonic() if now is None else now
        window = self._windows.setdefault(key.id, _Window())
        window.prune(now)
        oldest = window.entries[0].at if window.entries else now
        reset = oldest + WINDOW_S - now if window.entries else 0.0
        headers = rate_headers(key, len(window.entries), window.tokens, reset)
        if key.rpm and len(window.entries) >= key.rpm:
            raise requests_limited(key, headers, self._wait_for(window, now, lambda w: len(w.entries) < key.rpm))
        if key.tpm and tokens > key.tpm:
            raise too_large(key, tokens, headers)
        if key.tpm and window.tokens + tokens > key.tpm:
            raise tokens_limited(
                key, window.tokens, tokens, headers, self._wait_for(window, now, lambda w: w.tokens + tokens <= key.tpm)
            )
        entry = _Entry(now, tokens)
        window.entries.append(entry)
        window.tokens += tokens
        if key.rpm:
            headers["x-ratelimit-remaining-requests"] = str(max(0, key.rpm - len(window.entries)))
        if key.tpm:
            headers["x-ratelimit-remaining-tokens"] = str(max(0, key.tpm - window.tokens))
        return Reservation(window, entry, headers)

    @staticmethod
    def _wait_for(window: _Window, now: float, ok) -> float:
        """Seconds until enough entries age out for ``ok(window)`` to hold."""
        probe = _Window(deque(window.entries), window.tokens)  # a copy: the real window is untouched
        while probe.entries and not ok(probe):
            last = probe.entries.popleft()
            probe.tokens -= last.tokens
            if ok(probe):
                return last.at + WINDOW_S - now
        return 0.0 if ok(probe) else WINDOW_S


def _limited(key: ApiKey, limit: str, message: str, headers: dict[str, str], wait_s: float) -> RateLimited:
    headers = dict(headers)
    headers["retry-after"] = str(max(1, math.ceil(wait_s)))
    headers[f"x-ratelimit-remaining-{limit}"] = "0"
    return RateLimited(
        f"{message} (key {key.id}). Retry after {headers['retry-after']}s.", limit=limit, headers=headers
    )


def requests_limited(key: ApiKey, headers: dict[str, str], wait_s: float) -> RateLimited:
    return _limited(key, "requests", f"Rate limit reached for requests per minute: limit {key.rpm}", headers, wait_s)


def too_large(key: ApiKey, tokens: int, headers: dict[str, str]) -> RateLimited:
    return _limited(
        key,
        "tokens",
        f"Request too large: it needs about {tokens} tokens, the key allows "
        f"{key.tpm} per minute; lower max_tokens or the prompt",
        headers,
        WINDOW_S,
    )


def tokens_limited(key: ApiKey, used: int, tokens: int, headers: dict[str, str], wait_s: float) -> RateLimited:
    return _limited(
        key,
        "tokens",
        f"Rate limit reached for tokens per minute: limit {key.tpm}, used {used}, requested {tokens}",
        headers,
        wait_s,
    )


@dataclass(frozen=True)
class UsageRecord:
    request_id: str
    key_id: str
    model: str
    endpoint: str
    prompt_tokens: int
    completion_tokens: int
    created_at: datetime
    project: str = DEFAULT_PROJECT


class UsageRecorder:
    """Queues usage records in memory and writes them in batches, once per request id."""

    def __init__(self, db: Database, flush_interval_s: float) -> None:
        self._db = db
        self._interval = flush_interval_s
        self._pending: dict[str, UsageRecord] = {}
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._insert: Any = None  # the usage INSERT (ON CONFLICT DO NOTHING) of this database's dialect

    def record(
        self,
        request_id: str,
        key_id: str,
        model: str,
        endpoint: str,
        prompt: int,
        completion: int,
        project: str = DEFAULT_PROJECT,
    ) -> None:
        if request_id in self._pending:
            return  # the first record of a request id wins, like the database's
        self._pending[request_id] = UsageRecord(
            request_id, key_id, model, endpoint, prompt, completion, utcnow(), project
        )

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-flush")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.flush()
            except Exception:  # noqa: BLE001 - keep the records and try again next round
                log.exception("usage_flush_failed", pending=len(self._pending))

    async def flush(self) -> int:
        async with self._lock:
            if not self._pending:
                return 0
            batch, self._pending = self._pending, {}
            try:
                await asyncio.to_thread(self._write, list(batch.values()))
            except BaseException:
                batch.update(self._pending)
                self._pending = batch
                raise
            return len(batch)

    def _write(self, batch: list[UsageRecord]) -> None:
        # one statement, built once and compiled once (SQLAlchemy caches it), run with every row as
        # its parameters (executemany: batched into multi-row INSERTs by the driver/dialect)
        if self._insert is None:
            insert = postgresql.insert if self._db.engine.dialect.name == "postgresql" else sqlite.insert
            self._insert = insert(usage_records).on_conflict_do_nothing(index_elements=["request_id"])
        with self._db.session() as s:
            s.execute(self._insert, [r.__dict__ for r in batch])

    def totals(self, key_id: str | None = None, project: str | None = None, by: str = "key") -> list[dict]:
        """Usage per key (``by="key"``) or per project (``by="project"``) and model, optionally of one
        key or project only (blocking; flush first to include the newest requests)."""
        c = usage_records.c
        group = c.project if by == "project" else c.key_id
        query = (
            select(
                group.label("group"),
                c.model,
                func.count().label("requests"),
                func.sum(c.prompt_tokens).label("prompt_tokens"),
                func.sum(c.completion_tokens).label("completion_tokens"),
            )
            .group_by(group, c.model)
            .order_by(group, c.model)
        )
        if key_id:
            query = query.where(c.key_id == key_id)
        if project:
            query = query.where(c.project == project)
        with self._db.session() as s:
            return [
                {
                    ("project" if by == "project" else "key_id"): r.group,
                    "model": r.model,
                    "requests": int(r.requests),
                    "prompt_tokens": int(r.prompt_tokens or 0),
                    "completion_tokens": int(r.completion_tokens or 0),
                    "total_tokens": int((r.prompt_tokens or 0) + (r.completion_tokens or 0)),
                }
                for r in s.execute(query)
            ]
