"""S3 settings for tests: a fresh bucket of the session's nanio server."""

from __future__ import annotations

import uuid
from typing import Any

from services.core.settings import S3Settings


def s3_bucket(s3_server: Any) -> S3Settings:
    """A fresh bucket of the session's S3 server (created by the store on start), with short retries
    (a test fails fast)."""
    return S3Settings(
        endpoint=s3_server.endpoint,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        bucket=f"t-{uuid.uuid4().hex[:12]}",
        connect_retries=2,
        retry_backoff_s=0.05,
    )
