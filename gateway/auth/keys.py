"""API keys: created once (the secret is shown once), stored as sha256 hashes, looked up through a
TTL cache so the request path never touches the database on a hit.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update

from services.core.db import Database, utcnow
from services.core.errors import InvalidArgument, NotFound, Unauthenticated

from ..store import api_keys

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
    )


class KeyStore:
    """Keys in the gateway database (blocking calls: run them off the event loop)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def create(self, name: str, rpm: int = 0, tpm: int = 0) -> tuple[ApiKey, str]:
        """A new key and its secret (returned once, never stored)."""
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
        )
        with self._db.session() as s:
            s.execute(
                api_keys.insert().values(
                    id=key.id,
                    name=key.name,
                    key_hash=hash_key(secret),
                    prefix=key.prefix,
                    rpm=rpm,
                    tpm=tpm,
                    created_at=key.created_at,
                )
            )
        return key, secret

    def list(self, include_revoked: bool = True) -> list[ApiKey]:
        query = select(api_keys).order_by(api_keys.c.created_at)
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


class KeyCache:
    """Bearer secret -> active ApiKey, cached for ``ttl_s`` (misses for ``negative_ttl_s``)."""

    def __init__(self, store: KeyStore, ttl_s: float, negative_ttl_s: float) -> None:
        self._store = store
        self._ttl = ttl_s
        self._negative_ttl = negative_ttl_s
        self._entries: dict[str, tuple[ApiKey | None, float]] = {}
        self._inflight: dict[str, asyncio.Future] = {}

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
        digest = hash_key(secret)
        now = time.monotonic()
        hit = self._entries.get(digest)
        if hit is not None and hit[1] > now:
            key = hit[0]
        else:
            key = await self._load(digest, secret)
        if key is None or not key.active:
            shown = secret[:10] + "..." if len(secret) > 10 else "***"
            raise Unauthenticated(f"Incorrect API key provided: {shown}", reason="INVALID_API_KEY")
        return key

    async def _load(self, digest: str, secret: str) -> ApiKey | None:
        pending = self._inflight.get(digest)
        if pending is not None:  # one DB lookup per key at a time, however many requests wait on it
            return await asyncio.shield(pending)
        future = asyncio.get_running_loop().create_future()
        self._inflight[digest] = future
        try:
            key = await asyncio.to_thread(self._store.lookup, secret)
            ttl = self._ttl if key is not None else self._negative_ttl
            self._entries[digest] = (key, time.monotonic() + ttl)
            future.set_result(key)
            return key
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved
            raise
        finally:
            del self._inflight[digest]

    def invalidate(self) -> None:
        """Forget every cached lookup (this process revoked a key)."""
        self._entries.clear()
