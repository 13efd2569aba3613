"""Per-key request (rpm) and token (tpm) limits, and usage accounting.

``QuotaLimiter.reserve`` and ``Reservation.settle`` are plain synchronous code on the event loop,
so each is one atomic step per key: concurrent requests can never race past a limit. A request
reserves its prompt estimate + max_tokens before the call and settles to the engine's real usage
after. Usage records are keyed by request id (a retried id counts once) and written in batches by
a background task, never on the request path.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite

from services.core.db import Database, utcnow
from services.core.logging import get_logger

from .auth.keys import ApiKey
from .errors import RateLimited
from .store import usage_records

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

    def settle(self, tokens: int) -> None:
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


class QuotaLimiter:
    def __init__(self) -> None:
        self._windows: dict[str, _Window] = {}

    def reserve(self, key: ApiKey, tokens: int, *, now: float | None = None) -> Reservation:
        """Count one request and hold ``tokens``, or raise RateLimited (429) with its headers."""
        if not key.rpm and not key.tpm:
            return Reservation(None, None, {})
        now = time.monotonic() if now is None else now
        window = self._windows.setdefault(key.id, _Window())
        window.prune(now)
        oldest = window.entries[0].at if window.entries else now
        reset = oldest + WINDOW_S - now if window.entries else 0.0
        headers: dict[str, str] = {}
        if key.rpm:
            headers |= {
                "x-ratelimit-limit-requests": str(key.rpm),
                "x-ratelimit-remaining-requests": str(max(0, key.rpm - len(window.entries))),
                "x-ratelimit-reset-requests": _reset(reset),
            }
        if key.tpm:
            headers |= {
                "x-ratelimit-limit-tokens": str(key.tpm),
                "x-ratelimit-remaining-tokens": str(max(0, key.tpm - window.tokens)),
                "x-ratelimit-reset-tokens": _reset(reset),
            }
        if key.rpm and len(window.entries) >= key.rpm:
            raise self._limited(
                key,
                "requests",
                f"Rate limit reached for requests per minute: limit {key.rpm}",
                headers,
                self._wait_for(window, now, lambda w: len(w.entries) < key.rpm),
            )
        if key.tpm and tokens > key.tpm:
            raise self._limited(
                key,
                "tokens",
                f"Request too large: it needs about {tokens} tokens, the key allows "
                f"{key.tpm} per minute; lower max_tokens or the prompt",
                headers,
                WINDOW_S,
            )
        if key.tpm and window.tokens + tokens > key.tpm:
            raise self._limited(
                key,
                "tokens",
                f"Rate limit reached for tokens per minute: limit {key.tpm}, used {window.tokens}, requested {tokens}",
                headers,
                self._wait_for(window, now, lambda w: w.tokens + tokens <= key.tpm),
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

    @staticmethod
    def _limited(key: ApiKey, limit: str, message: str, headers: dict[str, str], wait_s: float) -> RateLimited:
        headers = dict(headers)
        headers["retry-after"] = str(max(1, math.ceil(wait_s)))
        headers[f"x-ratelimit-remaining-{limit}"] = "0"
        return RateLimited(
            f"{message} (key {key.id}). Retry after {headers['retry-after']}s.", limit=limit, headers=headers
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


class UsageRecorder:
    """Queues usage records in memory and writes them in batches, once per request id."""

    def __init__(self, db: Database, flush_interval_s: float) -> None:
        self._db = db
        self._interval = flush_interval_s
        self._pending: dict[str, UsageRecord] = {}
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    def record(self, request_id: str, key_id: str, model: str, endpoint: str, prompt: int, completion: int) -> None:
        if request_id in self._pending:
            return  # the first record of a request id wins, like the database's
        self._pending[request_id] = UsageRecord(request_id, key_id, model, endpoint, prompt, completion, utcnow())

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
        rows = [r.__dict__ for r in batch]
        dialect = self._db.engine.dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        with self._db.session() as s:
            for start in range(0, len(rows), 500):
                stmt = insert(usage_records).values(rows[start : start + 500])
                s.execute(stmt.on_conflict_do_nothing(index_elements=["request_id"]))

    def totals(self, key_id: str | None = None) -> list[dict]:
        """Usage per key and model (blocking; flush first to include the newest requests)."""
        c = usage_records.c
        query = (
            select(
                c.key_id,
                c.model,
                func.count().label("requests"),
                func.sum(c.prompt_tokens).label("prompt_tokens"),
                func.sum(c.completion_tokens).label("completion_tokens"),
            )
            .group_by(c.key_id, c.model)
            .order_by(c.key_id, c.model)
        )
        if key_id:
            query = query.where(c.key_id == key_id)
        with self._db.session() as s:
            return [
                {
                    "key_id": r.key_id,
                    "model": r.model,
                    "requests": int(r.requests),
                    "prompt_tokens": int(r.prompt_tokens or 0),
                    "completion_tokens": int(r.completion_tokens or 0),
                    "total_tokens": int((r.prompt_tokens or 0) + (r.completion_tokens or 0)),
                }
                for r in s.execute(query)
            ]
