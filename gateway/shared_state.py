"""What gateway replicas share through Redis (``YARD_GATEWAY_REDIS__URL``): rate-limit windows and
key revocations. Without a Redis URL none of this runs and each process keeps its own state.

Rate limits (``RedisWindows``): the one-minute sliding window of ``gateway.quota`` per key, kept in
three Redis keys hash-tagged by the key id (one cluster slot):

- ``<prefix>rl:{<key id>}:at``: sorted set, reservation id -> when it was admitted (ms, Redis' clock);
- ``<prefix>rl:{<key id>}:tokens``: hash, reservation id -> tokens it holds;
- ``<prefix>rl:{<key id>}:used``: the tokens the window holds.

A reserve is one Lua script (drop what left the window, check rpm then tpm, admit or refuse with how
long to wait), so requests on any number of replicas cannot race past a limit; a settle is another
(the reservation's tokens set to the real count while it is still in the window). Both read Redis'
own clock, so the replicas' clocks never matter. The keys expire a minute after their last admission.

Revocations (``RedisRevocations``): a revoking replica increments ``<prefix>revocations:epoch`` and
publishes ``<epoch>:<key id>`` on the channel ``<prefix>revocations`` (one script). Every replica
subscribes (the key is dropped from its cache at once) and also reads the epoch 4 times per
``revocation_max_delay_s`` (a message lost while it reconnected: it drops its whole cache). While it
cannot, its key cache re-reads keys older than that delay from the database (``KeyCache``), so a
revoked key is refused within the delay whether Redis is up or not.

Redis unreachable: every failure is logged (once per outage: ``redis_unavailable``, then
``redis_connected``) and counted (``gateway_redis_errors_total``, ``gateway_redis_up``); after a
failure the request path leaves Redis alone for ``retry_after_s`` while the revocation loop keeps
probing. Requests are then admitted on the replica's own windows (``fail_open``, the default) or
refused with 503 (``QuotaLimiter``); a settle that cannot be written leaves the estimate held (stricter,
never looser); a revocation that cannot be published is retried in the background.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Coroutine
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from services.core.logging import get_logger

from .auth.keys import ApiKey, KeyCache
from .metrics import REDIS_ERRORS, REDIS_UP
from .quota import (
    WINDOW_S,
    Reservation,
    SharedStateUnavailable,
    rate_headers,
    requests_limited,
    tokens_limited,
    too_large,
)
from .settings import RedisSettings

log = get_logger("modelyard.gateway.shared_state")

WINDOW_MS = int(WINDOW_S * 1000)
_REPUBLISH_FOR_S = 30.0  # a revocation that could not be published is retried this long

# KEYS: at, tokens, used. ARGV: rpm, tpm, tokens, window ms, reservation id.
# Returns {status, requests, used, reset ms, wait ms}: status 0 admitted, 1 rpm reached, 2 the request
# alone is over tpm, 3 tpm reached; requests and used as they were before this request.
_RESERVE = """
local rpm, tpm, tokens = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
while true do
  local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - window, 'LIMIT', 0, 500)
  if #old == 0 then break end
  local held = redis.call('HMGET', KEYS[2], unpack(old))
  local sum = 0
  for _, v in ipairs(held) do sum = sum + (tonumber(v) or 0) end
  redis.call('DECRBY', KEYS[3], sum)
  redis.call('ZREM', KEYS[1], unpack(old))
  redis.call('HDEL', KEYS[2], unpack(old))
end
local count = redis.call('ZCARD', KEYS[1])
local used = tonumber(redis.call('GET', KEYS[3]) or '0')
local reset = 0
if count > 0 then
  reset = tonumber(redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2]) + window - now
end
if rpm > 0 and count >= rpm then
  local nth = redis.call('ZRANGE', KEYS[1], count - rpm, count - rpm, 'WITHSCORES')
  return {1, count, used, reset, tonumber(nth[2]) + window - now}
end
if tpm > 0 and tokens > tpm then
  return {2, count, used, reset, window}
end
if tpm > 0 and used + tokens > tpm then
  local left, start, wait, found = used, 0, window, false
  while start < count and not found do
    local batch = redis.call('ZRANGE', KEYS[1], start, start + 499, 'WITHSCORES')
    local ids = {}
    for i = 1, #batch, 2 do ids[#ids + 1] = batch[i] end
    local held = redis.call('HMGET', KEYS[2], unpack(ids))
    for i = 1, #ids do
      left = left - (tonumber(held[i]) or 0)
      if left + tokens <= tpm then
        wait, found = tonumber(batch[2 * i]) + window - now, true
        break
      end
    end
    start = start + 500
  end
  return {3, count, used, reset, wait}
end
redis.call('ZADD', KEYS[1], now, ARGV[5])
redis.call('HSET', KEYS[2], ARGV[5], tokens)
redis.call('INCRBY', KEYS[3], tokens)
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], window + 1000) end
return {0, count, used, reset, 0}
"""

# KEYS: at, tokens, used. ARGV: reservation id, real tokens. Only while the reservation is in the window.
_SETTLE = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
local held = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('INCRBY', KEYS[3], tonumber(ARGV[2]) - held)
return 1
"""

# KEYS: epoch. ARGV: channel, key id ('' for "some keys").
_PUBLISH = """
local epoch = redis.call('INCR', KEYS[1])
redis.call('PUBLISH', ARGV[1], epoch .. ':' .. ARGV[2])
return epoch
"""


class _Link:
    """Whether Redis is worth asking now: after a failure the request path skips it for a while."""

    def __init__(self, settings: RedisSettings) -> None:
        self._retry_after = settings.retry_after_s
        self._fail_open = settings.fail_open
        self._max_delay = settings.revocation_max_delay_s
        self._down_until = 0.0
        self._up: bool | None = None

    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def ok(self) -> None:
        self._down_until = 0.0
        if self._up is not True:
            self._up = True
            REDIS_UP.set(1)
            log.info("redis_connected")

    def failed(self, operation: str, exc: BaseException) -> None:
        REDIS_ERRORS.labels(operation).inc()
        self._down_until = time.monotonic() + self._retry_after
        if self._up is not False:
            self._up = False
            REDIS_UP.set(0)
            log.error(
                "redis_unavailable",
                operation=operation,
                error=f"{type(exc).__name__}: {exc}",
                rate_limits="this replica's own windows" if self._fail_open else "requests refused (503)",
                revocations=f"cached keys re-read from the database after {self._max_delay}s",
            )


class _Background:
    """Fire-and-forget calls (settles, republished revocations), awaited on stop."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro: Coroutine[Any, Any, None], operation: str) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no running loop (a stream finalized at interpreter exit): nothing to write with
            coro.close()
            REDIS_ERRORS.labels(operation).inc()
            log.warning("redis_call_dropped", operation=operation, reason="no running event loop")
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout_s: float) -> None:
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


class RedisWindows:
    """``gateway.quota.SharedWindows`` in Redis: one window per key for every replica."""

    def __init__(self, client: aioredis.Redis, settings: RedisSettings, link: _Link, background: _Background) -> None:
        self._prefix = settings.key_prefix
        self._link = link
        self._background = background
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)

    def keys(self, key_id: str) -> list[str]:
        base = f"{self._prefix}rl:{{{key_id}}}:"
        return [base + "at", base + "tokens", base + "used"]

    async def reserve(self, key: ApiKey, tokens: int) -> Reservation:
        if not self._link.available():
            raise SharedStateUnavailable("redis is marked down")
        keys, member = self.keys(key.id), secrets.token_hex(8)
        try:
            result = await self._reserve(keys=keys, args=[key.rpm, key.tpm, tokens, WINDOW_MS, member])
        except (RedisError, OSError) as exc:
            self._link.failed("reserve", exc)
            raise SharedStateUnavailable(str(exc)) from exc
        self._link.ok()
        status, count, used, reset_ms, wait_ms = (int(x) for x in result)
        headers = rate_headers(key, count, used, reset_ms / 1000)
        if status == 1:
            raise requests_limited(key, headers, wait_ms / 1000)
        if status == 2:
            raise too_large(key, tokens, headers)
        if status == 3:
            raise tokens_limited(key, used, tokens, headers, wait_ms / 1000)
        if key.rpm:
            headers["x-ratelimit-remaining-requests"] = str(max(0, key.rpm - count - 1))
        if key.tpm:
            headers["x-ratelimit-remaining-tokens"] = str(max(0, key.tpm - used - tokens))

        def settle(real: int) -> None:
            if real != tokens:
                self._background.spawn(self._write_settle(keys, member, real), "settle")

        return Reservation(None, None, headers, on_settle=settle)

    async def _write_settle(self, keys: list[str], member: str, tokens: int) -> None:
        if not self._link.available():
            REDIS_ERRORS.labels("settle").inc()
            return  # the estimate stays held until it leaves the window
        try:
            await self._settle(keys=keys, args=[member, tokens])
        except (RedisError, OSError) as exc:
            self._link.failed("settle", exc)
        else:
            self._link.ok()


class RedisRevocations:
    """``gateway.auth.keys.RevocationFeed`` in Redis: pub/sub for speed, an epoch for certainty."""

    def __init__(self, client: aioredis.Redis, settings: RedisSettings, link: _Link, background: _Background) -> None:
        self.max_delay_s = settings.revocation_max_delay_s
        self._poll_s = settings.revocation_max_delay_s / 4
        self._client = client
        self._link = link
        self._background = background
        self._channel = settings.key_prefix + "revocations"
        self._epoch_key = settings.key_prefix + "revocations:epoch"
        self._publish = client.register_script(_PUBLISH)
        self._confirmed = float("-inf")  # time.monotonic() when the epoch was last read
        self._epoch: int | None = None
        self._cache: KeyCache | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False

    def fresh(self, now: float) -> bool:
        return now - self._confirmed < self.max_delay_s

    async def publish(self, key_id: str | None) -> None:
        if not await self._try_publish(key_id):
            self._background.spawn(self._republish(key_id), "revoke")

    async def _try_publish(self, key_id: str | None) -> bool:
        try:
            await self._publish(keys=[self._epoch_key], args=[self._channel, key_id or ""])
        except (RedisError, OSError) as exc:
            self._link.failed("revoke", exc)
            return False
        self._link.ok()
        log.info("revocation_published", key=key_id)
        return True

    async def _republish(self, key_id: str | None) -> None:
        deadline = time.monotonic() + _REPUBLISH_FOR_S
        while time.monotonic() < deadline:
            await asyncio.sleep(self._poll_s)
            if await self._try_publish(key_id):
                return
        log.error("revocation_not_published", key=key_id, tried_s=_REPUBLISH_FOR_S)

    def start(self, cache: KeyCache) -> None:
        self._cache = cache
        self._task = asyncio.create_task(self._run(), name="gateway-revocations")

    async def stop(self) -> None:
        # The flag as well as the cancel: on Python 3.11 a cancel that lands while redis-py's read
        # timeout fires at the same moment is swallowed (asyncio.timeout), and the loop would go on.
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            done, _ = await asyncio.wait({self._task}, timeout=self._poll_s * 4 + 1.0)
            if not done:
                log.warning("revocation_listener_not_stopped", waited_s=self._poll_s * 4 + 1.0)

    async def _run(self) -> None:
        pubsub: aioredis.client.PubSub | None = None
        while not self._stopping:
            try:
                if pubsub is None:
                    pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                    await pubsub.subscribe(self._channel)  # before the epoch: nothing falls between
                await self._check_epoch()
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=self._poll_s)
                while message is not None:
                    self._received(str(message["data"]))
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0)
            except (RedisError, OSError) as exc:
                self._link.failed("revocations", exc)
                if pubsub is not None:
                    await self._close(pubsub)
                    pubsub = None
                await asyncio.sleep(self._poll_s)
            except asyncio.CancelledError:
                if pubsub is not None:
                    await self._close(pubsub)
                raise
        if pubsub is not None:
            await self._close(pubsub)

    @staticmethod
    async def _close(pubsub: aioredis.client.PubSub) -> None:
        try:
            await pubsub.aclose()
        except (RedisError, OSError) as exc:  # the connection is being dropped anyway
            log.debug("redis_pubsub_close_failed", error=str(exc))

    async def _check_epoch(self) -> None:
        started = time.monotonic()
        epoch = int(await self._client.get(self._epoch_key) or 0)
        if self._epoch is not None and epoch != self._epoch and self._cache is not None:
            # revocations this replica was not told about (or a Redis that lost its data: start over)
            self._cache.invalidate()
            log.info("revocations_caught_up", epoch=epoch, previous=self._epoch)
        self._epoch = epoch
        self._confirmed = started
        self._link.ok()

    def _received(self, data: str) -> None:
        raw_epoch, _, key_id = data.partition(":")
        try:
            epoch = int(raw_epoch)
        except ValueError:
            log.warning("revocation_message_malformed", data=data[:100])
            return
        if self._cache is None or (self._epoch is not None and epoch <= self._epoch):
            return  # seen already through the epoch (or Redis lost its data: the next epoch read sees it)
        if self._epoch is not None and epoch == self._epoch + 1:
            self._cache.invalidate(key_id or None)
        else:  # one or more messages in between were lost
            self._cache.invalidate()
        self._epoch = epoch


class SharedState:
    """The Redis connection of one gateway process and what uses it."""

    def __init__(self, settings: RedisSettings) -> None:
        self.settings = settings
        self.client = aioredis.Redis.from_url(
            settings.url,
            socket_timeout=settings.timeout_s,
            socket_connect_timeout=settings.connect_timeout_s,
            retry=Retry(NoBackoff(), 1),  # one immediate retry (a pooled connection Redis closed), no backoff
            decode_responses=True,
        )
        link, self._background = _Link(settings), _Background()
        self.windows = RedisWindows(self.client, settings, link, self._background)
        self.revocations = RedisRevocations(self.client, settings, link, self._background)

    def start(self, cache: KeyCache) -> None:
        self.revocations.start(cache)
        log.info("shared_state_started", prefix=self.settings.key_prefix, fail_open=self.settings.fail_open)

    async def stop(self) -> None:
        await self.revocations.stop()
        await self._background.drain(self.settings.timeout_s * 2)
        await self.client.aclose()
