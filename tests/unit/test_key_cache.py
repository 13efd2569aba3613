"""The gateway's key cache on its own: bounded LRU + TTL, negative entries bounded apart, revocations
(here and, through a feed, from other replicas), lookups racing with a revocation."""

from __future__ import annotations

import asyncio
import secrets
import threading
import time

import pytest

from gateway.auth.keys import KEY_PREFIX, ApiKey, KeyCache, KeyStore
from gateway.store import open_database
from services.core.db import utcnow
from services.core.errors import Unauthenticated


class CountingStore(KeyStore):
    """The real key store (SQLite), counting lookups per secret."""

    def __init__(self, db) -> None:
        super().__init__(db)
        self.lookups: dict[str, int] = {}

    def lookup(self, secret: str) -> ApiKey | None:
        self.lookups[secret] = self.lookups.get(secret, 0) + 1
        return super().lookup(secret)


class UnknownEverywhere:
    """A store that knows no key at all, without a database: the 100k-token flood measures the cache,
    not SQLite (a real lookup costs ~0.3 ms; 100k of them would be 30 s)."""

    def __init__(self, known: dict[str, ApiKey]) -> None:
        self.known = known
        self.lookups = 0

    def lookup(self, secret: str) -> ApiKey | None:
        self.lookups += 1
        return self.known.get(secret)


class Feed:
    """A revocation feed whose freshness the test sets (Redis' is gateway.shared_state.RedisRevocations)."""

    def __init__(self, max_delay_s: float) -> None:
        self.max_delay_s = max_delay_s
        self.is_fresh = True
        self.published: list[str | None] = []

    def fresh(self, now: float) -> bool:
        return self.is_fresh

    async def publish(self, key_id: str | None) -> None:
        self.published.append(key_id)


@pytest.fixture
def store(tmp_path) -> CountingStore:
    db = open_database(f"sqlite:///{tmp_path / 'gateway.db'}")
    yield CountingStore(db)
    db.dispose()


def bearer(secret: str) -> str:
    return f"Bearer {secret}"


async def test_flood_of_random_tokens_keeps_the_cache_bounded_and_the_real_key_cached():
    real = ApiKey(id="key_real", name="real", prefix="sk-yard-real", rpm=0, tpm=0, created_at=utcnow())
    secret = KEY_PREFIX + "the-real-one"
    store = UnknownEverywhere({secret: real})
    cache = KeyCache(store, ttl_s=600, negative_ttl_s=600, max_entries=100, negative_max_entries=50)
    assert await cache.authenticate(bearer(secret)) == real

    refused = 0

    async def attempt(token: str) -> None:
        nonlocal refused
        try:
            await cache.authenticate(bearer(token))
        except Unauthenticated:
            refused += 1

    started = time.perf_counter()
    for round_ in range(25_000):  # rounds of 4 concurrent requests, each with a new random token
        await asyncio.gather(*(attempt(KEY_PREFIX + secrets.token_urlsafe(24)) for _ in range(4)))
        if round_ % 1000 == 0:
            assert cache.sizes[1] <= 50 and len(cache) <= 51
    elapsed = time.perf_counter() - started

    assert refused == 100_000
    assert cache.sizes == (1, 50)  # the real key, and the 50 most recent unknown tokens
    assert not cache._inflight
    lookups = store.lookups
    assert await cache.authenticate(bearer(secret)) == real and store.lookups == lookups  # still a hit
    # random tokens without the issued prefix never reach the store, nor the cache
    for _ in range(1000):
        with pytest.raises(Unauthenticated):
            await cache.authenticate(bearer(secrets.token_urlsafe(24)))
    assert store.lookups == lookups and cache.sizes == (1, 50)
    print(f"100k random tokens in {elapsed:.1f}s")


async def test_known_keys_are_evicted_least_recently_used_first(store):
    secrets_ = [store.create(f"k{i}")[1] for i in range(4)]
    cache = KeyCache(store, ttl_s=600, negative_ttl_s=600, max_entries=3, negative_max_entries=0)
    for s in secrets_[:3]:
        await cache.authenticate(bearer(s))
    await cache.authenticate(bearer(secrets_[0]))  # k0 used again: k1 is now the least recent
    await cache.authenticate(bearer(secrets_[3]))  # evicts k1
    assert cache.sizes == (3, 0)
    for s in (secrets_[0], secrets_[2], secrets_[3]):
        await cache.authenticate(bearer(s))
    assert [store.lookups[s] for s in secrets_] == [1, 1, 1, 1]
    await cache.authenticate(bearer(secrets_[1]))
    assert store.lookups[secrets_[1]] == 2
    # negative_max_entries=0: unknown tokens are looked up every time, never kept
    unknown = KEY_PREFIX + "nope"
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            await cache.authenticate(bearer(unknown))
    assert store.lookups[unknown] == 2 and cache.sizes == (3, 0)


async def test_entries_expire_after_their_ttl(store):
    key, secret = store.create("ttl")
    cache = KeyCache(store, ttl_s=0.2, negative_ttl_s=0.1)
    unknown = KEY_PREFIX + "unknown"
    assert (await cache.authenticate(bearer(secret))).id == key.id
    with pytest.raises(Unauthenticated):
        await cache.authenticate(bearer(unknown))
    await cache.authenticate(bearer(secret))
    with pytest.raises(Unauthenticated):
        await cache.authenticate(bearer(unknown))
    assert store.lookups == {secret: 1, unknown: 1}
    await asyncio.sleep(0.25)
    await cache.authenticate(bearer(secret))
    with pytest.raises(Unauthenticated):
        await cache.authenticate(bearer(unknown))
    assert store.lookups == {secret: 2, unknown: 2}


async def test_revoking_one_key_drops_only_that_key_and_tells_the_feed(store):
    a, secret_a = store.create("a")
    b, secret_b = store.create("b")
    feed = Feed(max_delay_s=1.0)
    cache = KeyCache(store, ttl_s=600, negative_ttl_s=600, revocations=feed)
    await cache.authenticate(bearer(secret_a))
    await cache.authenticate(bearer(secret_b))
    store.revoke(a.id)
    await cache.revoked(a.id)
    assert feed.published == [a.id]
    with pytest.raises(Unauthenticated, match="Incorrect API key"):
        await cache.authenticate(bearer(secret_a))
    await cache.authenticate(bearer(secret_b))
    assert store.lookups == {secret_a: 2, secret_b: 1}


async def test_lookup_racing_with_a_revocation_is_not_kept(store):
    key, secret = store.create("race")
    reading, release = threading.Event(), threading.Event()

    class SlowStore:
        def lookup(self, s: str) -> ApiKey | None:
            found = store.lookup(s)  # read before the revocation commits
            reading.set()
            release.wait(5)
            return found

    cache = KeyCache(SlowStore(), ttl_s=600, negative_ttl_s=600)
    pending = asyncio.ensure_future(cache.authenticate(bearer(secret)))
    await asyncio.to_thread(reading.wait, 5)
    store.revoke(key.id)
    cache.invalidate(key.id)  # the revocation arrives while the old row is on its way
    release.set()
    assert (await pending).id == key.id  # the request that started before the revocation passes
    assert cache.sizes == (0, 0)  # but its stale row is not cached
    with pytest.raises(Unauthenticated):
        await cache.authenticate(bearer(secret))


async def test_keys_are_read_again_while_the_revocation_feed_is_stale(store):
    key, secret = store.create("stale")
    feed = Feed(max_delay_s=0.1)
    cache = KeyCache(store, ttl_s=600, negative_ttl_s=600, revocations=feed)
    await cache.authenticate(bearer(secret))
    await asyncio.sleep(0.15)
    await cache.authenticate(bearer(secret))  # feed fresh: a hit, whatever the entry's age
    assert store.lookups[secret] == 1
    feed.is_fresh = False  # Redis unreachable: no revocation can be heard of
    store.revoke(key.id)  # on another replica, which could not publish it
    with pytest.raises(Unauthenticated):
        await cache.authenticate(bearer(secret))
    assert store.lookups[secret] == 2
