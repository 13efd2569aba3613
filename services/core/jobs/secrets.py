"""The only place job children read their environment: S3 credentials handed to the job by its service."""

from __future__ import annotations

from typing import Any

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..errors import FailedPrecondition
from ..settings import S3Settings


class JobSecrets(BaseSettings):
    """Credentials a service passes to its job children (``Worker(child_env=...)``)."""

    model_config = SettingsConfigDict(env_prefix="YARD_JOB_", extra="ignore")

    s3_access_key: str = ""
    s3_secret_key: SecretStr = SecretStr("")


def s3_settings_for(spec_s3: dict[str, Any]) -> S3Settings:
    """S3 settings from the spec's ``s3`` block (endpoint, bucket, secure) plus the secrets of the environment."""
    secrets = JobSecrets()
    if not secrets.s3_access_key or not secrets.s3_secret_key.get_secret_value():
        raise FailedPrecondition(
            "YARD_JOB_S3_ACCESS_KEY / YARD_JOB_S3_SECRET_KEY are not set in the job's environment",
            reason="S3_CREDENTIALS_MISSING",
        )
    return S3Settings(
        endpoint=spec_s3["endpoint"],
        bucket=spec_s3["bucket"],
        secure=bool(spec_s3.get("secure", False)),
        access_key=secrets.s3_access_key,
        secret_key=secrets.s3_secret_key,
    )
