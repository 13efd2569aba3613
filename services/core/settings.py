"""pydantic-settings base classes. One settings class per service (env prefix
``YARD_<SERVICE>_``, nested fields with ``__``), built once in ``__main__`` and passed down.
Nothing else in the code base reads ``os.environ``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATA_DIR = Path.home() / ".modelyard"

# The asyncio event loop of a service: "auto" takes uvloop when it is installed (a cheaper loop
# iteration for every message of a stream), "asyncio" keeps the standard loop.
EventLoop = Literal["auto", "asyncio"]

# Default ports of the local stack (ARCHITECTURE / issue 2).
DEFAULT_PORTS = {
    "gateway": 8000,
    "registry": 50051,
    "training": 50052,
    "quantization": 50053,
    "evaluation": 50054,
    "inference": 50055,
    "s3": 9000,
}


class S3Settings(BaseModel):
    """Where artifacts live: any S3 API (MinIO in production, nanio on loopback locally)."""

    endpoint: str = "127.0.0.1:9000"  # host:port, no scheme
    access_key: str = "modelyard"
    secret_key: SecretStr = SecretStr("modelyard-secret")
    bucket: str = "modelyard"
    secure: bool = False
    region: str = "us-east-1"
    # Retries when the endpoint is unreachable, with exponential backoff.
    connect_retries: int = 4
    retry_backoff_s: float = 0.25
    # Files at least this large are uploaded in parts of part_size bytes.
    multipart_threshold: int = 64 * 1024 * 1024
    part_size: int = 16 * 1024 * 1024


class GrpcServerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 0  # 0 = the service's default port
    metrics_port: int = 0  # 0 = an ephemeral port (logged and reported through health metadata)
    max_message_bytes: int = 16 * 1024 * 1024
    grace_period_s: float = 20.0  # SIGTERM: time in-flight calls get to finish
    drain_notice_s: float = 0.0  # SIGTERM: health NOT_SERVING this long before new calls are refused
    max_workers: int = 16


class ServiceSettings(BaseSettings):
    """Fields every service has. Subclasses set ``model_config`` with their env prefix."""

    model_config = SettingsConfigDict(env_prefix="YARD_", env_nested_delimiter="__", extra="ignore")

    data_dir: Path = DEFAULT_DATA_DIR
    log_level: str = "INFO"
    log_json: bool = True
    event_loop: EventLoop = "auto"
    database_url: str = ""  # empty: sqlite file <data_dir>/<service>.db
    grpc: GrpcServerSettings = Field(default_factory=GrpcServerSettings)
    s3: S3Settings = Field(default_factory=S3Settings)

    def db_url_for(self, service: str) -> str:
        if self.database_url:
            return self.database_url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{(self.data_dir / f'{service}.db').resolve()}"


class JobServiceSettings(ServiceSettings):
    """A service that runs jobs (training, quantization): its job worker's settings."""

    # Run a job worker in this process (false: an API-only replica).
    worker_enabled: bool = True
    # Jobs run at once by this process's worker.
    worker_slots: int = 1
    worker_poll_interval_s: float = 0.5
    heartbeat_s: float = 2.0
    heartbeat_timeout_s: float = 30.0
    # SIGTERM -> SIGKILL delay when a job is cancelled.
    cancel_grace_s: float = 15.0
    # Attempts of a job whose worker died.
    max_attempts: int = 3
    # Job working directories; empty: <data_dir>/<service>-work.
    workdir: Path | None = None

    def workdir_for(self, service: str) -> Path:
        path = self.workdir or (self.data_dir / f"{service}-work")
        path.mkdir(parents=True, exist_ok=True)
        return path


def service_settings_class(service: str, **extra_fields):
    """A settings class with env prefix ``YARD_<SERVICE>_`` (plus optional extra fields)."""

    prefix = f"YARD_{service.upper()}_"
    annotations: dict[str, Any] = {}
    namespace: dict[str, Any] = {
        "model_config": SettingsConfigDict(env_prefix=prefix, env_nested_delimiter="__", extra="ignore"),
        "__annotations__": annotations,
    }
    for name, (typ, default) in extra_fields.items():
        annotations[name] = typ
        namespace[name] = default
    return type(f"{service.capitalize()}Settings", (ServiceSettings,), namespace)
