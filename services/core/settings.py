"""pydantic-settings base classes. One settings class per service (env prefix
``YARD_<SERVICE>_``, nested fields with ``__``), built once in ``__main__`` and passed down.
Nothing else in the code base reads ``os.environ``.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import FailedPrecondition

if TYPE_CHECKING:
    from .credentials import ClientCredentials

DEFAULT_DATA_DIR = Path.home() / ".modelyard"

# The S3 credentials of local development (a loopback S3 server only: refused on any other endpoint).
DEV_S3_ACCESS_KEY = "modelyard"
DEV_S3_SECRET_KEY = "modelyard-secret"
# Shortest bearer token a service accepts (`yard up` generates 43 characters).
MIN_TOKEN_CHARS = 16

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
    "pipeline": 50056,
    "s3": 9000,
}


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (an IP address or a name, ``[::1]`` brackets allowed) is this machine only:
    127.0.0.0/8, ::1 or ``localhost``. Any other name counts as reachable from elsewhere."""
    host = host.strip().strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def endpoint_host(endpoint: str) -> str:
    """The host of ``host:port`` (``[v6]:port`` too; a bare host passes through)."""
    endpoint = endpoint.strip()
    if endpoint.startswith("["):
        return endpoint[1:].partition("]")[0]
    if endpoint.count(":") > 1:  # a bare IPv6 address
        return endpoint
    return endpoint.rpartition(":")[0] if ":" in endpoint else endpoint


class S3Settings(BaseModel):
    """Where artifacts live: any S3 API (MinIO in production, nanio on loopback locally).

    The default credentials are those of local development; with an endpoint that is not loopback they
    are refused (set ``S3__ACCESS_KEY`` / ``S3__SECRET_KEY``). ``yard up`` generates its own per data dir.
    """

    endpoint: str = "127.0.0.1:9000"  # host:port, no scheme
    access_key: str = DEV_S3_ACCESS_KEY
    secret_key: SecretStr = SecretStr(DEV_S3_SECRET_KEY)
    bucket: str = "modelyard"
    secure: bool = False
    region: str = "us-east-1"
    # Retries when the endpoint is unreachable, with exponential backoff.
    connect_retries: int = 4
    retry_backoff_s: float = 0.25
    # Files at least this large are uploaded in parts of part_size bytes.
    multipart_threshold: int = 64 * 1024 * 1024
    part_size: int = 16 * 1024 * 1024

    @model_validator(mode="after")
    def _no_dev_credentials_off_loopback(self) -> Self:
        if is_loopback_host(endpoint_host(self.endpoint)):
            return self
        if self.secret_key.get_secret_value() == DEV_S3_SECRET_KEY or (
            self.access_key == DEV_S3_ACCESS_KEY and not self.secret_key.get_secret_value()
        ):
            raise ValueError(
                f"S3 endpoint {self.endpoint!r} is not loopback and the S3 credentials are the built-in development "
                "ones (modelyard / modelyard-secret): set S3__ACCESS_KEY and S3__SECRET_KEY (e.g. "
                "YARD_REGISTRY_S3__ACCESS_KEY / YARD_REGISTRY_S3__SECRET_KEY) to the S3 server's credentials"
            )
        return self


def read_tokens(path: Path, setting: str = "AUTH__TOKEN_FILE") -> list[str]:
    """The tokens in a token file: one per line, blank lines and ``#`` comments skipped. The first is the
    one a client sends; a server accepts every one (two lines while a token is being rotated)."""
    try:
        text = path.expanduser().read_text()
    except OSError as exc:
        raise FailedPrecondition(
            f"cannot read the token file {path} ({setting}): {exc.strerror or exc}", reason="TOKEN_FILE_UNREADABLE"
        ) from None
    tokens = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not tokens:
        raise FailedPrecondition(f"the token file {path} ({setting}) holds no token", reason="TOKEN_FILE_EMPTY")
    return tokens


class ServiceAuthSettings(BaseModel):
    """The bearer token of gRPC calls between ModelYard processes (``authorization: Bearer <token>``).

    A service requires it on every call but the health (and reflection) service, and sends it on its own
    calls to the other services. Set one of ``token`` and ``token_file`` (one token a line: the first is
    sent, every one is accepted, for rotation). Neither: no authentication, allowed on loopback only.
    """

    token: SecretStr = SecretStr("")
    token_file: Path | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if self.token.get_secret_value() and self.token_file is not None:
            raise ValueError("set either auth.token or auth.token_file, not both")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.token.get_secret_value()) or self.token_file is not None

    def tokens(self, prefix: str = "AUTH__") -> list[str]:
        """Every accepted token (the first is sent); empty without authentication. ``prefix`` names the
        settings in errors (``YARD_REGISTRY_AUTH__`` -> ``YARD_REGISTRY_AUTH__TOKEN_FILE``)."""
        if self.token_file is not None:
            setting = f"{prefix}TOKEN_FILE"
            tokens = read_tokens(self.token_file, setting)
        else:
            setting = f"{prefix}TOKEN"
            tokens = [self.token.get_secret_value().strip()] if self.token.get_secret_value().strip() else []
        for token in tokens:
            if len(token) < MIN_TOKEN_CHARS or not token.isascii() or not token.isprintable() or " " in token:
                raise FailedPrecondition(
                    f"{setting}: a service token must be at least {MIN_TOKEN_CHARS} printable ASCII characters "
                    "without spaces",
                    reason="TOKEN_INVALID",
                )
        return tokens


class ClientTlsSettings(BaseModel):
    """TLS of outgoing gRPC calls: the CA that signed the servers' certificates (empty: the system's
    roots) and, for servers that require client certificates (mTLS), this client's certificate and key.
    TLS is on when ``ca_file`` or ``cert_file`` is set."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @model_validator(mode="after")
    def _pair(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file go together")
        return self

    @property
    def enabled(self) -> bool:
        return self.ca_file is not None or self.cert_file is not None


class TlsSettings(ClientTlsSettings):
    """TLS of a service's gRPC server (``cert_file`` + ``key_file``, PEM) and of its calls to the other
    services (``ca_file`` verifies them; the same certificate is its client certificate). With
    ``client_auth`` (mTLS) the server refuses clients without a certificate signed by ``ca_file``."""

    client_auth: bool = False

    @model_validator(mode="after")
    def _client_auth_needs_ca(self) -> Self:
        if self.client_auth and (self.ca_file is None or self.cert_file is None):
            raise ValueError("tls.client_auth (mTLS) needs tls.cert_file, tls.key_file and tls.ca_file")
        return self

    @property
    def server_enabled(self) -> bool:
        return self.cert_file is not None


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
    # Bearer token required on calls to this service and sent on its calls to the others.
    auth: ServiceAuthSettings = Field(default_factory=ServiceAuthSettings)
    # TLS (mTLS with client_auth) of this service's server and of its calls to the others.
    tls: TlsSettings = Field(default_factory=TlsSettings)

    def client_credentials(self) -> ClientCredentials:
        """What this service's calls to the other services carry: its token and TLS files."""
        from .credentials import ClientCredentials

        return ClientCredentials.from_settings(self.auth, self.tls)

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
