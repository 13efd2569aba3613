"""API keys: created once (the secret is shown once), stored as sha256 hashes, looked up through a
bounded LRU + TTL cache so the request path never touches the database on a hit.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from sqlalchemy import select, update

from services.core.db import Database, utcnow
from services.core.errors import InvalidArgument, NotFound, Unauthenticated

from ..store import DEFAULT_PROJECT, api_keys, projects

KEY_PREFIX = "sk-yard-"


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    prefix: str
    rpm: int
    tpm: int
    created_at: datetime
    revoked_at: datetime | None = None
    project: str = DEFAULT_PROJECT  # the project the key belongs to (gateway/auth/projects.py)

    @property
    def active(self) -> bool:
        return self.revoked_at is None


ANONYMOUS = ApiKey(id="anonymous", name="anonymous", prefix="", rpm=0, tpm=0, created_at=utcnow())


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _row_to_key(row) -> ApiKey:
    return ApiKey(
        id=row.id,
        name=row.name,
        prefix=row.prefix,
        rpm=row.rpm,
        tpm=row.tpm,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        project=row.project,
    )


class KeyStore:
    """Keys in the gateway database (blocking calls: run them off the event loop)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def create(self, name: str, rpm: int = 0, tpm: int = 0, project: str = DEFAULT_PROJECT) -> tuple[ApiKey, str]:
        """A new key of ``project`` (which must exist) and its secret (returned once, never stored)."""
        if not name.strip():
            raise InvalidArgument.for_field("name", "must not be empty")
        if rpm < 0 or tpm < 0:
            raise InvalidArgument.for_field("rpm" if rpm < 0 else "tpm", "must be >= 0 (0: unlimited)")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(
            id=f"key_{secrets.token_hex(8)}",
            name=name.strip(),
            prefix=secret[:14],
            rpm=rpm,
            tpm=tpm,
            created_at=utcnow(),
            project=project,
        )
        with self._db.session() as s:
            if s.execute(select(projects.c.name).where(projects.c.name == project)).first() is None:
                raise InvalidArgument.for_field("project", f"no project named {project!r} (`yard projects create`)")
            s.execute(
                api_keys.insert().values(
                    id=key.id,
                    name=key.name,
                    key_hash=hash_key(secret),
                    prefix=key.prefix,
                    rpm=rpm,
                    tpm=tpm,
                    created_at=key.created_at,
                    project=project,
                )
            )
        return key, secret

    def list(self, include_revoked: bool = True, project: str | None = None) -> list[ApiKey]:
        query = select(api_keys).order_by(api_keys.c.created_at)
        if project is not None:
            query = query.where(api_keys.c.project == project)
        if not include_revoked:
            query = query.where(api_keys.c.revoked_at.is_(None))
        with self._db.session() as s:
            return [_row_to_key(r) for r in s.execute(query)]

    def revoke(self, key_id: str) -> ApiKey:
        with self._db.session() as s:
            row = s.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
            if row is None:
                raise NotFound(f"API key {key_id!r} not found", reason="KEY_NOT_FOUND", metadata={"id": key_id})
            if row.revoked_at is None:
                s.execute(update(api_keys).where(api_keys.c.id == key_id).values(revoked_at=utcnow()))
            row = s.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
        return _row_to_key(row)

    def lookup(self, secret: str) -> ApiKey | None:
        with self._db.session() as s:
            row = s.execute(select(api_keys).where(api_keys.c.key_hash == hash_key(secret))).first()
        return _row_to_key(row) if row else None


class KeyLookup(Protocol):
    """Where the cache reads a secret's key on a miss (KeyStore; blocking, run off the event loop)."""

    def lookup(self, secret: str) -> ApiKey | None: ...


class RevocationFeed(Protocol):
    """Revocations shared by the gateway replicas (``gateway.shared_state.RevocationFeed``, Redis)."""

    max_delay_s: float

    def fresh(self, now: float) -> bool:
        """Whether every revocation published anywhere before ``now - max_delay_s`` has reached this
        replica (false while Redis cannot be read)."""
        ...

    async def publish(self, key_id: str | None) -> None:
        """Tell every replica (never raises: a failure is logged, counted and retried)."""
        ...


@dataclass
class _Cached:
    key: ApiKey | None
    expires: float  # time.monotonic()
    loaded: float


class KeyCache:
    """Bearer secret -> active ApiKey: an LRU with a TTL (``ttl_s`` for keys, ``negative_ttl_s`` for
    unknown secrets) holding at most ``max_entries`` keys and, apart from them, ``negative_max_entries``
    unknown secrets, so a flood of random bearer tokens neither grows memory nor pushes the real keys
    out. Secrets without the ``sk-yard-`` prefix were never issued: refused without a lookup.

    Without a revocation feed a revocation is seen here at once (``revoked``) and on other replicas
    when their entry expires (``ttl_s``). With one (Redis), every replica drops the key when it is
    revoked anywhere; while the feed cannot vouch that it is up to date, cached keys older than its
    ``max_delay_s`` are read again from the database, so a revoked key is refused within that delay
    either way.
    """

    def __init__(
        self,
        store: KeyLookup,
        ttl_s: float,
        negative_ttl_s: float,
        *,
        max_entries: int = 10_000,
        negative_max_entries: int = 1_000,
        revocations: RevocationFeed | None = None,
    ) -> None:
        self._store = store
        self._ttl = ttl_s
        self._negative_ttl = negative_ttl_s
        self._max = max(1, max_entries)
        self._negative_max = max(0, negative_max_entries)
        self._feed = revocations
        self._keys: OrderedDict[str, _Cached] = OrderedDict()  # digest -> known key, least recent first
        self._unknown: OrderedDict[str, _Cached] = OrderedDict()  # digest -> None (no such key)
        self._inflight: dict[str, asyncio.Future] = {}
        self._generation = 0  # bumped by every invalidation: a lookup that raced with one is not kept

    def __len__(self) -> int:
        return len(self._keys) + len(self._unknown)

    @property
    def sizes(self) -> tuple[int, int]:
        """(cached keys, cached unknown secrets)."""
        return len(self._keys), len(self._unknown)

    async def authenticate(self, authorization: str | None) -> ApiKey:
        if not authorization:
            raise Unauthenticated(
                "You didn't provide an API key. Send it as 'Authorization: Bearer sk-yard-...'.",
                reason="INVALID_API_KEY",
            )
        scheme, _, secret = authorization.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise Unauthenticated("The Authorization header must be 'Bearer <key>'.", reason="INVALID_API_KEY")
        key: ApiKey | None = None
        if secret.startswith(KEY_PREFIX):  # anything else was never issued: no lookup, nothing cached
            digest = hash_key(secret)
            hit = self._get(digest, time.monotonic())
            key = hit.key if hit is not None else await self._load(digest, secret)
        if key is None or not key.active:
            shown = secret[:10] + "..." if len(secret) > 10 else "***"
            raise Unauthenticated(f"Incorrect API key provided: {shown}", reason="INVALID_API_KEY")
        return key

    def _get(self, digest: str, now: float) -> _Cached | None:
        entry = self._keys.get(digest)
        if entry is not None:
            feed = self._feed
            stale = feed is not None and entry.loaded + feed.max_delay_s <= now and not feed.fresh(now)
            if entry.expires > now and not stale:
                self._keys.move_to_end(digest)
                return entry
            del self._keys[digest]
            return None
        entry = self._unknown.get(digest)
        if entry is not None:
            if entry.expires > now:
                self._unknown.move_to_end(digest)
                return entry
            del self._unknown[digest]
        return None

    def _put(self, digest: str, key: ApiKey | None) -> None:
        now = time.monotonic()
        if key is None:
            table, bound, ttl = self._unknown, self._negative_max, self._negative_ttl
            self._keys.pop(digest, None)
        else:
            table, bound, ttl = self._keys, self._max, self._ttl
            self._unknown.pop(digest, None)
        if bound == 0:
            return
        table[digest] = _Cached(key, now + ttl, now)
        table.move_to_end(digest)
        while len(table) > bound:
            table.popitem(last=False)  # the least recently used

    async def _load(self, digest: str, secret: str) -> ApiKey | None:
        pending = self._inflight.get(digest)
        if pending is not None:  # one DB lookup per key at a time, however many requests wait on it
            return await asyncio.shield(pending)
        future = asyncio.get_running_loop().create_future()
        self._inflight[digest] = future
        generation = self._generation
        try:
            key = await asyncio.to_thread(self._store.lookup, secret)
            if generation == self._generation:  # no revocation arrived while it was read
                self._put(digest, key)
            future.set_result(key)
            return key
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved
            raise
        finally:
            del self._inflight[digest]

    def invalidate(self, key_id: str | None = None) -> None:
        """Forget the cached lookups of one key, or every cached lookup (``None``)."""
        self._generation += 1
        if key_id is None:
            self._keys.clear()
            self._unknown.clear()
            return
        for digest in [d for d, e in self._keys.items() if e.key is not None and e.key.id == key_id]:
            del self._keys[digest]

    async def revoked(self, key_id: str | None = None) -> None:
        """This process revoked a key (``None``: one or more, unnamed): forget it here at once and,
        with a revocation feed, on every other replica."""
        self.invalidate(key_id)
        if self._feed is not None:
            await self._feed.publish(key_id)
