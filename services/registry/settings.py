"""Settings of the registry service (env prefix ``YARD_REGISTRY_``, nested with ``__``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from services.core.settings import ServiceSettings


class RegistrySettings(ServiceSettings):
    """Everything the registry reads from its environment, built once in ``__main__``.

    The hub endpoint and token also honour the hub client's own ``HF_ENDPOINT`` / ``HF_TOKEN``
    variables (a mirror such as hf-mirror.com is set that way).
    """

    model_config = SettingsConfigDict(
        env_prefix="YARD_REGISTRY_", env_nested_delimiter="__", extra="ignore", populate_by_name=True
    )

    hf_endpoint: str = Field(
        default="https://huggingface.co",
        validation_alias=AliasChoices("YARD_REGISTRY_HF_ENDPOINT", "HF_ENDPOINT"),
    )
    hf_token: SecretStr | None = Field(default=None, validation_alias=AliasChoices("YARD_REGISTRY_HF_TOKEN", "HF_TOKEN"))
    # Imports running at once (each in a worker thread; GGUF conversion in a child process).
    import_workers: int = 2
    # Local scratch space for imports and downloads; empty: <data_dir>/registry-staging.
    staging_dir: Path | None = None
    # Chunk size of DownloadFile responses.
    download_chunk_bytes: int = 1024 * 1024
    # How often WatchImport looks for changes.
    watch_interval_s: float = 0.2

    def staging_path(self) -> Path:
        path = self.staging_dir or (self.data_dir / "registry-staging")
        path.mkdir(parents=True, exist_ok=True)
        return path
