"""Gateway replicas sharing rate limits and revocations through Redis (gateway/shared_state.py).

Two real gateway apps under uvicorn, on one gateway database and the real Redis at 127.0.0.1:6379
(each test under a key prefix of its own, deleted after it), in front of one real gRPC fake inference
service: one key's rpm and tpm hold once across both, not once per replica; a key revoked on one
replica is refused by the other within a second; with Redis unreachable, requests are admitted on
each replica's own windows (fail_open) or refused with 503, never a 500; without Redis each replica
keeps its own state as before.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from gateway.app import create_app
from gateway.auth.keys import ApiKey, KeyStore
from gateway.errors import RateLimited
from gateway.quota import QuotaLimiter
from gateway.settings import GatewaySettings, RedisSettings
from gateway.shared_state import SharedState
from gateway.store import open_database
from services.core.db import utcnow
from tests.support.fake_inference import BackgroundLoop, FakeInference, GatewayServer, start_fake

REDIS_URL = "redis://127.0.0.1:6379/0"
ADMIN = "admin-secret"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "a"}], "max_tokens": 20}


@pytest.fixture(scope="module")
def backend():
    bg = BackgroundLoop()
    server = bg.run(start_fake(FakeInference()))
    yield bg, server.address
    bg.run(server.stop(0))
    bg.close()


@pytest.fixture
def redis_prefix():
    prefix = f"yard-test:{uuid.uuid4().hex[:12]}:"
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    client.ping()
    yield prefix
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)
    client.close()


class Gateways:
    """Gateway replicas on one database (and one Redis, when given), each its own app and server."""

    def __init__(self, backend, tmp_path, **overrides) -> None:
        self.bg, self.address = backend
        self.db_url = f"sqlite:///{tmp_path / 'gateway.db'}"
        self.tmp_path = tmp_path
        self.overrides = overrides
        self.servers: list[GatewayServer] = []
        self.clients: list[httpx.Client] = []

    def start(self, n: int = 2, **overrides) -> list[httpx.Client]:
        started = []
        for _ in range(n):
            settings = GatewaySettings(
                data_dir=self.tmp_path / f"gw{len(self.servers)}", database_url=self.db_url,
                inference_addr=self.address, admin_token=ADMIN, log_json=False,
                routing={"refresh_interval_s": 5.0}, quota={"usage_flush_s": 0.2}, **(self.overrides | overrides))
            server = GatewayServer(self.bg, create_app(settings))
            server.wait_started()
            self.servers.append(server)
            client = httpx.Client(base_url=server.url, timeout=20)
            self.clients.append(client)
            started.append(client)
        return started

    def create_key(self, **limits) -> dict:
        r = self.clients[0].post("/admin/keys", json={"name": "scaleout", **limits}, headers=admin_auth())
        assert r.status_code == 201, r.text
        return r.json()

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        for server in self.servers:
            server.stop()


def admin_auth() -> dict[str, str]:
    return {"authorization": f"Bearer {ADMIN}"}


def auth(key: dict) -> dict[str, str]:
    return {"authorization": f"Bearer {key['key']}"}


@pytest.fixture
def gateways(backend, tmp_path):
    gws = Gateways(backend, tmp_path)
    yield gws
    gws.stop()


def redis_settings(prefix: str, **more) -> dict:
    return {"url": REDIS_URL, "key_prefix": prefix, **more}


def metric(text: str, sample: str) -> float:
    """A sample's value in a Prometheus exposition (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_keys_rpm_holds_once_across_two_replicas(redis_prefix, gateways):
    a, b = gateways.start(2, redis=redis_settings(redis_prefix))
    key = gateways.create_key(rpm=6)

    def call(i: int) -> httpx.Response:
        return (a, b)[i % 2].post("/v1/chat/completions", json=CHAT | {"max_tokens": 1}, headers=auth(key))

    with ThreadPoolExecutor(8) as pool:  # concurrent, on both replicas at once
        responses = list(pool.map(call, range(20)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 6 + [429] * 14  # 12 if each replica counted on its own
    refused = next(r for r in responses if r.status_code == 429)
    error = refused.json()["error"]
    assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded" and key["id"] in error["message"]
    assert refused.headers["x-ratelimit-limit-requests"] == "6"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert 50 <= int(refused.headers["retry-after"]) <= 60
    assert float(refused.headers["x-ratelimit-reset-requests"].rstrip("s")) <= 60.0
    remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in responses if r.status_code == 200)
    assert remaining == [0, 1, 2, 3, 4, 5]  # one window: every admission counted once


def test_one_keys_tpm_holds_once_and_settles_to_real_usage(redis_prefix, gateways):
    a, b = gateways.start(2, redis=redis_settings(redis_prefix))
    key = gateways.create_key(tpm=50)
    store = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    used_key = f"{redis_prefix}rl:{{{key['id']}}}:used"
    results: list[int] = []
    for i in range(10):
        r = (a, b)[i % 2].post("/v1/chat/completions", json=CHAT, headers=auth(key))
        results.append(r.status_code)
        if r.status_code != 200:
            break
        admitted = len(results)
        if i == 0:
            reserved = 50 - int(r.headers["x-ratelimit-remaining-tokens"])
            assert reserved == 21  # 1 prompt token (estimate) + max_tokens 20
        real = r.json()["usage"]["total_tokens"]
        assert real == 5
        deadline = time.monotonic() + 2
        while int(store.get(used_key) or 0) != real * admitted:  # the settle is written right after the reply
            assert time.monotonic() < deadline, store.get(used_key)
            time.sleep(0.005)
    store.close()
    # admitted while 5 * settled + 21 <= 50: 6 in all (12 per-replica; 2 without settling to real usage)
    assert results == [200] * 6 + [429]
    refused = b.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "tokens"
    assert refused.headers["x-ratelimit-limit-tokens"] == "50" and refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert "used 30, requested 21" in refused.json()["error"]["message"]
    too_big = a.post("/v1/chat/completions", json=CHAT | {"max_tokens": 60}, headers=auth(key))
    assert too_big.status_code == 429 and "Request too large" in too_big.json()["error"]["message"]


def test_key_revoked_on_one_replica_is_refused_by_the_other_within_a_second(redis_prefix, gateways):
    a, b = gateways.start(2, redis=redis_settings(redis_prefix), auth={"cache_ttl_s": 600})
    key = gateways.create_key()
    for replica in (a, b):  # both have the key cached now (for 10 minutes)
        assert replica.get("/v1/models", headers=auth(key)).status_code == 200
    assert a.post(f"/admin/keys/{key['id']}/revoke", headers=admin_auth()).status_code == 200
    revoked = time.monotonic()
    assert a.get("/v1/models", headers=auth(key)).status_code == 401
    while (status := b.get("/v1/models", headers=auth(key)).status_code) == 200:
        assert time.monotonic() - revoked < 1.0, "replica B still accepts the revoked key after 1 s"
        time.sleep(0.01)
    elapsed = time.monotonic() - revoked
    assert status == 401 and elapsed < 1.0
    print(f"revocation seen by the other replica after {elapsed * 1000:.0f} ms")

    # a revocation whose message was lost (written straight to the database, only the epoch moved):
    # the epoch check catches it within the same second
    other = gateways.create_key()
    assert b.get("/v1/models", headers=auth(other)).status_code == 200
    db = open_database(gateways.db_url)
    KeyStore(db).revoke(other["id"])
    db.dispose()
    redis.Redis.from_url(REDIS_URL).incr(f"{redis_prefix}revocations:epoch")
    revoked = time.monotonic()
    while b.get("/v1/models", headers=auth(other)).status_code == 200:
        assert time.monotonic() - revoked < 1.0, "the epoch check did not drop the cached key within 1 s"
        time.sleep(0.01)


def test_redis_unreachable_fails_open_to_each_replicas_own_windows(gateways):
    down = {"url": f"redis://127.0.0.1:{free_port()}/0", "connect_timeout_s": 0.2, "timeout_s": 0.2}
    (gw,) = gateways.start(1, redis=down)
    limited, unlimited = gateways.create_key(rpm=2), gateways.create_key()
    before = gw.get("/metrics").text
    statuses = [gw.post("/v1/chat/completions", json=CHAT, headers=auth(limited)).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]  # the key's limit still holds, on this replica's own window
    assert gw.post("/v1/chat/completions", json=CHAT, headers=auth(unlimited)).status_code == 200
    revoke = gw.post(f"/admin/keys/{unlimited['id']}/revoke", headers=admin_auth())
    assert revoke.status_code == 200  # the database revocation stands; publishing it is retried
    assert gw.get("/v1/models", headers=auth(unlimited)).status_code == 401
    after = gw.get("/metrics").text
    assert metric(after, 'gateway_redis_fallbacks_total{outcome="local"}') - metric(
        before, 'gateway_redis_fallbacks_total{outcome="local"}') == 3  # the limited key's requests
    assert metric(after, 'gateway_redis_errors_total{operation="revocations"}') >= 1  # the feed could not connect
    assert metric(after, "gateway_redis_up") == 0


def test_redis_unreachable_fails_closed_with_503_when_configured(gateways):
    down = {"url": f"redis://127.0.0.1:{free_port()}/0", "connect_timeout_s": 0.2, "timeout_s": 0.2,
            "fail_open": False}
    (gw,) = gateways.start(1, redis=down)
    limited, unlimited = gateways.create_key(rpm=2), gateways.create_key()
    for _ in range(2):  # the first one finds Redis down, the next one skips it for retry_after_s
        r = gw.post("/v1/chat/completions", json=CHAT, headers=auth(limited))
        assert r.status_code == 503
        assert r.json() == {"error": {
            "message": "Rate limits cannot be checked right now (the gateway's shared state is unreachable); "
                       "retry in a moment.",
            "type": "server_error", "param": None, "code": "rate_limiter_unavailable"}}
    assert gw.post("/v1/chat/completions", json=CHAT, headers=auth(unlimited)).status_code == 200  # no limits


def test_without_redis_each_replica_keeps_its_own_state(gateways):
    a, b = gateways.start(2, auth={"cache_ttl_s": 0.5})
    key = gateways.create_key(rpm=2)
    for replica in (a, b):  # a window per replica: the key's limit holds on each one
        statuses = [replica.post("/v1/chat/completions", json=CHAT, headers=auth(key)).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
    other = gateways.create_key()
    for replica in (a, b):
        assert replica.get("/v1/models", headers=auth(other)).status_code == 200
    assert a.post(f"/admin/keys/{other['id']}/revoke", headers=admin_auth()).status_code == 200
    assert a.get("/v1/models", headers=auth(other)).status_code == 401  # here at once
    revoked = time.monotonic()
    while b.get("/v1/models", headers=auth(other)).status_code == 200:  # there within auth.cache_ttl_s
        assert time.monotonic() - revoked < 0.5 + 0.5
        time.sleep(0.02)


class PrivateRedis:
    """A redis-server of this test's own (no persistence), so that it can be stopped and started again."""

    def __init__(self, tmp_path) -> None:
        self.port, self.dir, self.proc = free_port(), tmp_path, None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline and self.proc.poll() is None, "redis-server did not start"
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")
def test_redis_lost_mid_run_never_fails_a_request_and_revocations_still_hold(gateways, tmp_path):
    private = PrivateRedis(tmp_path)
    private.start()
    try:
        a, b = gateways.start(2, redis={"url": private.url, "timeout_s": 0.2, "connect_timeout_s": 0.2},
                              auth={"cache_ttl_s": 600})
        limited, other = gateways.create_key(rpm=100), gateways.create_key()
        assert a.post("/v1/chat/completions", json=CHAT, headers=auth(limited)).status_code == 200
        assert redis.Redis.from_url(private.url).zcard(f"yard:gateway:rl:{{{limited['id']}}}:at") == 1
        for replica in (a, b):
            assert replica.get("/v1/models", headers=auth(other)).status_code == 200
        private.stop()  # Redis gone while both replicas run

        statuses = [r.post("/v1/chat/completions", json=CHAT, headers=auth(limited)).status_code for r in (a, b, a)]
        assert statuses == [200, 200, 200]  # fail_open: each replica's own window (rpm 100 each)
        assert a.post(f"/admin/keys/{other['id']}/revoke", headers=admin_auth()).status_code == 200
        revoked = time.monotonic()
        while b.get("/v1/models", headers=auth(other)).status_code == 200:  # B re-reads stale keys from the DB
            assert time.monotonic() - revoked < 1.0 + 0.2, "revocation not seen by B while Redis is down"
            time.sleep(0.02)

        private.start()  # back (empty): the replicas use it again as soon as they reconnect
        fresh = redis.Redis.from_url(private.url)
        deadline = time.monotonic() + 3
        while not fresh.zcard(f"yard:gateway:rl:{{{limited['id']}}}:at"):
            assert time.monotonic() < deadline, "the replicas did not go back to Redis"
            assert b.post("/v1/chat/completions", json=CHAT, headers=auth(limited)).status_code == 200
            time.sleep(0.05)
        fresh.close()
    finally:
        gateways.stop()
        gateways.servers, gateways.clients = [], []
        private.stop()


async def test_redis_windows_answer_exactly_like_the_in_process_ones(redis_prefix):
    """The same reserves and settles on both limiters: the same admissions, 429 messages and headers."""
    shared = SharedState(RedisSettings(url=REDIS_URL, key_prefix=redis_prefix))
    limiters = {"redis": QuotaLimiter(shared.windows, fail_open=False), "local": QuotaLimiter()}
    key = ApiKey(id="key_parity", name="parity", prefix="sk-yard-par", rpm=4, tpm=100, created_at=utcnow())
    steps: list[tuple[str, int, int]] = [  # (op, tokens, reservation to settle)
        ("reserve", 30, 0), ("reserve", 30, 0), ("reserve", 50, 0), ("reserve", 150, 0), ("settle", 5, 0),
        ("reserve", 50, 0), ("settle", 10, 1), ("reserve", 10, 0), ("reserve", 1, 0), ("reserve", 1, 0)]
    seen: dict[str, list] = {}
    try:
        for name, limiter in limiters.items():
            held, outcomes = [], []
            for op, tokens, which in steps:
                if op == "settle":
                    held[which].settle(tokens)
                    await shared._background.drain(2)
                    continue
                try:
                    reservation = await limiter.acquire(key, tokens)
                    held.append(reservation)
                    outcomes.append(("ok", reservation.headers))
                except RateLimited as err:
                    outcomes.append((err.message, err.headers))
            seen[name] = outcomes
    finally:
        await shared.stop()
    assert [o[0] for o in seen["redis"]] == [o[0] for o in seen["local"]]
    for (_, remote), (_, local) in zip(seen["redis"], seen["local"], strict=True):
        timed = {k for k in local if k.startswith("x-ratelimit-reset") or k == "retry-after"}
        assert {k: v for k, v in remote.items() if k not in timed} == {k: v for k, v in local.items() if k not in timed}
        for k in timed:
            assert abs(float(remote[k].rstrip("s")) - float(local[k].rstrip("s"))) <= 1.0, (k, remote, local)
    messages = [o[0] for o in seen["local"]]
    assert messages[0] == messages[1] == "ok"
    assert "Rate limit reached for tokens per minute: limit 100, used 60, requested 50" in messages[2]
    assert "Request too large" in messages[3]
    assert messages[4:6] == ["ok", "ok"]  # settled to 5 and 10: 5 + 10 + 50 + 10 fits in 100
    assert all("Rate limit reached for requests per minute: limit 4" in m for m in messages[6:])
