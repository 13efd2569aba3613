"""Shared fixtures: a real S3 server (nanio) on loopback for the whole session, a fresh bucket
per test, and S3 settings pointing at it."""

from __future__ import annotations

import os
import uuid

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cli.s3server import start_s3_server  # noqa: E402
from services.core.settings import S3Settings  # noqa: E402


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = start_s3_server(tmp_path_factory.mktemp("s3-data"))
    yield server
    server.stop()


@pytest.fixture
def s3_settings(s3_server) -> S3Settings:
    """S3 settings with a bucket of its own for this test (created by the store on start)."""
    return S3Settings(
        endpoint=s3_server.endpoint,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        bucket=f"t-{uuid.uuid4().hex[:12]}",
        connect_retries=2,
        retry_backoff_s=0.05,
    )
