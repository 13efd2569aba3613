"""Settings of the registry service (env prefix ``YARD_REGISTRY_``, nested with ``__``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, BaseModel, Field, SecretStr, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from services.core.local_paths import LocalSourceSettings, split_list
from services.core.settings import ServiceSettings

ALLOWED_ROOTS_SETTING = "YARD_REGISTRY_IMPORTS__ALLOWED_ROOTS"
ALLOWED_BUCKETS_SETTING = "YARD_REGISTRY_IMPORTS__ALLOWED_BUCKETS"
MAX_UPLOAD_SETTING = "YARD_REGISTRY_DATASETS__MAX_UPLOAD_BYTES"


class ImportSettings(LocalSourceSettings):
    """Where ImportModel may read from (env ``YARD_REGISTRY_IMPORTS__...``; a list as "a,b" or as JSON).

    ``allowed_roots``: folders local imports (a folder or .gguf file) may come from; empty: on a loopback listen
    address the single-machine defaults (home, the system temp folder, the registry's working folder, the
    Python site-packages folders), on any other address local imports are off.
    """

    # Buckets s3:// imports may read with the registry's own S3 credentials. Empty: only the registry's artifact
    # bucket (``S3__BUCKET``); "*": any bucket those credentials can read.
    allowed_buckets: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @field_validator("allowed_buckets", mode="before")
    @classmethod
    def _split_buckets(cls, value: object) -> object:
        return split_list(value)


class DatasetSettings(BaseModel):
    """Dataset uploads (env ``YARD_REGISTRY_DATASETS__...``)."""

    # An UploadDataset stream is refused (RESOURCE_EXHAUSTED) as soon as it carries more bytes than this.
    max_upload_bytes: int = Field(default=1024**3, gt=0)
    # ValidateDataset against a vision-language model: a row with more images than this is invalid, unless the
    # model's config names its own limit (max_images, max_num_images, ...).
    max_images_per_row: int = Field(default=8, gt=0)
    # Whether rows may refer to http(s) images (fetched by the registry when validating). Off: such a row is
    # invalid (images belong in the archive, or inline as data: URLs).
    allow_remote_images: bool = False


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
    # Imports this replica runs at once (job worker slots; each import runs in a child process).
    import_workers: int = 2
    # Run the import worker in this process (off: the replica only serves; other replicas import).
    worker_enabled: bool = True
    # The worker's id in the job store; empty: host-pid-random.
    worker_id: str = ""
    worker_poll_interval_s: float = 0.5
    # How often a running import's heartbeat is written, and after how long without one another
    # replica takes the import over (requeues it, or fails it once its attempts are used up).
    heartbeat_s: float = 2.0
    heartbeat_timeout_s: float = 15.0
    # After a cancel, how long an import child gets between SIGTERM and SIGKILL.
    cancel_grace_s: float = 10.0
    # Attempts of one import (a replica dying mid-import costs one).
    import_max_attempts: int = 3
    # How often every replica sweeps for failed or cancelled imports to clean up.
    reconcile_interval_s: float = 30.0
    # Local scratch space for imports and downloads; empty: <data_dir>/registry-staging.
    staging_dir: Path | None = None
    # Chunk size of DownloadFile responses.
    download_chunk_bytes: int = 1024 * 1024
    imports: ImportSettings = Field(default_factory=ImportSettings)
    datasets: DatasetSettings = Field(default_factory=DatasetSettings)

    def jobs_workdir(self) -> Path:
        """Where import attempts keep their files (<data_dir>/registry-jobs)."""
        return self.data_dir / "registry-jobs"

    def staging_path(self) -> Path:
        path = self.staging_dir or (self.data_dir / "registry-staging")
        path.mkdir(parents=True, exist_ok=True)
        return path
