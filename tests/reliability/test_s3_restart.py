"""The S3 server (nanio, a real process) dies in the middle of an upload or a download and comes back: the
artifact store retries and succeeds, or, when the server stays away longer than its retries, fails with
Unavailable; it never hands out a corrupt or partial file.

A relay between the store and the server passes the bytes through unchanged and holds the transfer at a known
point (part 2 of a multipart upload, 3 MiB into a download) while the server is killed.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import time
import uuid
from pathlib import Path

import pytest

from cli.s3server import S3Server, start_s3_server
from services.core.artifacts import S3ArtifactStore
from services.core.errors import Unavailable
from services.core.settings import S3Settings
from tests.reliability.relay import UNAVAILABLE, Relay

MIB = 1 << 20
SIZE = 12 * MIB  # three 5 MiB parts (the last one 2 MiB) with the settings below


class Nanio:
    """A nanio process of this test's own (the session's server is shared by every test and must stay up)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.server: S3Server = start_s3_server(data_dir)
        self.restarts = 0

    def kill(self) -> None:
        assert self.server.process is not None
        self.server.process.kill()
        self.server.process.wait()

    def start(self) -> float:
        """Start it again on the same port and data; the seconds that took."""
        t = time.monotonic()
        old = self.server
        self.server = start_s3_server(self.data_dir, port=old.port, access_key=old.access_key,
                                      secret_key=old.secret_key)
        self.restarts += 1
        return time.monotonic() - t


@pytest.fixture
def nanio(tmp_path):
    n = Nanio(tmp_path / "s3")
    yield n
    n.server.stop()


@pytest.fixture
async def relay(nanio):
    r = await Relay(nanio.server.host, nanio.server.port).start()
    yield r
    await r.stop()


def settings(nanio: Nanio, relay: Relay, bucket: str, **kw) -> S3Settings:
    base = dict(endpoint=relay.endpoint, access_key=nanio.server.access_key, secret_key=nanio.server.secret_key,
                bucket=bucket, multipart_threshold=5 * MIB, part_size=5 * MIB)
    return S3Settings(**{**base, **kw})


def random_file(path: Path, size: int = SIZE) -> str:
    path.write_bytes(random.Random(size).randbytes(size))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


async def outage(nanio: Nanio, relay: Relay, tap, down_s: float | None) -> float | None:
    """Once the transfer reaches the tap: kill the server, drop the held connection, keep the server down for
    ``down_s`` (the client retries against nothing), start it again (None: leave it down)."""
    await asyncio.wait_for(tap.hit.wait(), 60)
    nanio.kill()
    relay.release()
    if down_s is None:
        return None
    await asyncio.sleep(down_s)
    return await asyncio.to_thread(nanio.start)


async def test_upload_interrupted_by_an_s3_restart_is_retried_and_stored_intact(nanio, relay, tmp_path):
    s = settings(nanio, relay, f"r-{uuid.uuid4().hex[:10]}", connect_retries=8, retry_backoff_s=0.1)
    store = await asyncio.to_thread(S3ArtifactStore.connect, s)  # the relay runs on this loop: never block it
    src = tmp_path / "big.bin"
    sha = random_file(src)
    tap = relay.tap(rb"PUT /" + s.bucket.encode() + rb"/big\.bin\?partNumber=2&", after_bytes=MIB)
    upload = asyncio.create_task(asyncio.to_thread(store.put_file, "big.bin", src))
    started = time.monotonic()
    restart_s = await outage(nanio, relay, tap, down_s=0.5)
    entry = await asyncio.wait_for(upload, 120)
    print(f"\nupload: server killed 1 MiB into part 2, back after {restart_s:.2f}s; stored "
          f"{time.monotonic() - started:.2f}s after the start")
    assert (entry.size, entry.sha256) == (SIZE, sha)
    assert relay.requests.count(f"POST /{s.bucket}/big.bin?uploads=") >= 2  # the whole upload started again
    back = await asyncio.to_thread(store.get_file, "big.bin", tmp_path / "back.bin")  # verified on the way
    assert back.sha256 == sha and hashlib.sha256((tmp_path / "back.bin").read_bytes()).hexdigest() == sha


async def test_upload_fails_cleanly_when_the_s3_server_stays_down(nanio, relay, tmp_path):
    s = settings(nanio, relay, f"r-{uuid.uuid4().hex[:10]}", connect_retries=2, retry_backoff_s=0.05)
    store = await asyncio.to_thread(S3ArtifactStore.connect, s)  # the relay runs on this loop: never block it
    src = tmp_path / "big.bin"
    random_file(src)
    tap = relay.tap(rb"PUT /" + s.bucket.encode() + rb"/big\.bin\?partNumber=2&", after_bytes=MIB)
    upload = asyncio.create_task(asyncio.to_thread(store.put_file, "big.bin", src))
    await outage(nanio, relay, tap, down_s=None)
    with pytest.raises(Unavailable) as err:
        await asyncio.wait_for(upload, 60)
    assert err.value.reason == "S3_UNAVAILABLE" and "3 attempts" in err.value.message
    await asyncio.to_thread(nanio.start)
    assert not await asyncio.to_thread(store.exists, "big.bin")  # no partial object became visible
    assert await asyncio.to_thread(store.list, "") == []


async def test_download_interrupted_by_an_s3_restart_is_retried_and_verified(nanio, relay, tmp_path):
    s = settings(nanio, relay, f"r-{uuid.uuid4().hex[:10]}", connect_retries=8, retry_backoff_s=0.1)
    store = await asyncio.to_thread(S3ArtifactStore.connect, s)  # the relay runs on this loop: never block it
    src = tmp_path / "big.bin"
    sha = random_file(src)
    await asyncio.to_thread(store.put_file, "big.bin", src)
    out = tmp_path / "out"
    out.mkdir()
    tap = relay.tap(rb"GET /" + s.bucket.encode() + rb"/big\.bin HTTP", after_bytes=3 * MIB, direction="down")
    download = asyncio.create_task(asyncio.to_thread(store.get_file, "big.bin", out / "big.bin"))
    restart_s = await outage(nanio, relay, tap, down_s=0.5)
    entry = await asyncio.wait_for(download, 120)
    print(f"\ndownload: server killed 3 MiB into the body, back after {restart_s:.2f}s")
    assert (entry.size, entry.sha256) == (SIZE, sha)
    assert hashlib.sha256((out / "big.bin").read_bytes()).hexdigest() == sha
    assert relay.requests.count(f"GET /{s.bucket}/big.bin") >= 2  # downloaded again from the start
    assert leftovers(out) == []


async def test_download_fails_cleanly_and_leaves_the_previous_file_when_the_s3_server_stays_down(
        nanio, relay, tmp_path):
    s = settings(nanio, relay, f"r-{uuid.uuid4().hex[:10]}", connect_retries=2, retry_backoff_s=0.05)
    store = await asyncio.to_thread(S3ArtifactStore.connect, s)  # the relay runs on this loop: never block it
    src = tmp_path / "big.bin"
    random_file(src)
    await asyncio.to_thread(store.put_file, "big.bin", src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "big.bin").write_bytes(b"the previous version")
    tap = relay.tap(rb"GET /" + s.bucket.encode() + rb"/big\.bin HTTP", after_bytes=3 * MIB, direction="down")
    download = asyncio.create_task(asyncio.to_thread(store.get_file, "big.bin", out / "big.bin"))
    await outage(nanio, relay, tap, down_s=None)
    with pytest.raises(Unavailable):
        await asyncio.wait_for(download, 60)
    assert (out / "big.bin").read_bytes() == b"the previous version"  # never half overwritten
    assert leftovers(out) == [] and os.listdir(out) == ["big.bin"]


async def test_download_retried_while_a_load_balancer_answers_503_for_the_restarting_server(nanio, relay, tmp_path):
    """In front of S3 a load balancer answers 503 with an HTML body while its backend is away (minio-py raises
    that as InvalidResponseError, not as an S3 error): retried like a connection error, not a failure."""
    s = settings(nanio, relay, f"r-{uuid.uuid4().hex[:10]}", connect_retries=8, retry_backoff_s=0.1)
    store = await asyncio.to_thread(S3ArtifactStore.connect, s)
    src = tmp_path / "big.bin"
    sha = random_file(src)
    await asyncio.to_thread(store.put_file, "big.bin", src)
    tap = relay.tap(rb"GET /" + s.bucket.encode() + rb"/big\.bin HTTP", after_bytes=3 * MIB, direction="down")
    download = asyncio.create_task(asyncio.to_thread(store.get_file, "big.bin", tmp_path / "out.bin"))
    await asyncio.wait_for(tap.hit.wait(), 60)
    nanio.kill()
    relay.answer = UNAVAILABLE
    relay.release()
    while relay.answered < 2:  # the store's retries meet the 503s
        assert not download.done(), download.exception()
        await asyncio.sleep(0.02)
    await asyncio.to_thread(nanio.start)
    relay.answer = None
    entry = await asyncio.wait_for(download, 120)
    assert (entry.size, entry.sha256) == (SIZE, sha)
    assert hashlib.sha256((tmp_path / "out.bin").read_bytes()).hexdigest() == sha
