"""Settings of the gateway (env prefix ``YARD_GATEWAY_``, nested fields with ``__``).

Built once in ``gateway.__main__`` (or by a test) and passed down; nothing else reads os.environ.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:
    from services.core.credentials import ClientCredentials
from services.core.settings import (
    DEFAULT_DATA_DIR,
    DEFAULT_PORTS,
    ClientTlsSettings,
    EventLoop,
    ServiceAuthSettings,
)


class HttpSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORTS["gateway"]
    # Idle keep-alive connections are closed after this. Longer than the clients' own expiry (httpx,
    # and so the OpenAI SDK: 5 s), so that a client never sends a request on a connection the
    # gateway is closing at that moment (uvicorn's 5 s default races with it: ReadError).
    keep_alive_s: float = 75.0
    # SIGTERM: /readyz answers 503 and new requests get 503 (OpenAI error shape, Connection: close) for
    # drain_notice_s, so a load balancer takes this replica out before it stops listening; then requests
    # in flight (streams too) get grace_period_s to finish, and whatever still runs is cut.
    drain_notice_s: float = Field(default=0.0, ge=0)
    grace_period_s: float = Field(default=20.0, ge=0)


class AuthSettings(BaseModel):
    required: bool = True  # false: local development only, every request is "anonymous"
    cache_ttl_s: float = 10.0  # key lookups are cached this long; a revocation elsewhere takes effect within it
    negative_cache_ttl_s: float = 2.0  # unknown keys are remembered this long (no DB hit per bad request)
    # The key cache is an LRU: at most this many known keys, and apart from them at most
    # negative_cache_max_entries unknown ones, so random bearer tokens cannot grow memory (or push
    # the real keys out).
    cache_max_entries: int = Field(default=10_000, ge=1)
    negative_cache_max_entries: int = Field(default=1_000, ge=0)


class RedisSettings(BaseModel):
    """Shared state of gateway replicas (rate-limit windows, key revocations). No URL: each process
    keeps its own (limits per replica, revocations seen by the other replicas within auth.cache_ttl_s)."""

    url: str = ""  # redis://host:6379/0, rediss://... for TLS; empty: in-process state
    key_prefix: str = "yard:gateway:"  # every key and channel the gateway uses starts with it
    timeout_s: float = Field(default=0.5, gt=0)  # one Redis call on the request path (socket read/write)
    connect_timeout_s: float = Field(default=1.0, gt=0)
    # Redis unreachable when a request is admitted. true: the replica falls back to its own in-process
    # windows (the key's limits still hold per replica); false: the request is refused with 503.
    fail_open: bool = True
    # After a failed call, the limiter does not try Redis again for this long (no timeout per request).
    retry_after_s: float = Field(default=1.0, gt=0)
    # A revoked key is refused on every replica within this: revocations are published at once and
    # every replica also checks the revocation epoch 4 times per interval; while it cannot, its cached
    # keys are re-read from the database after this long.
    revocation_max_delay_s: float = Field(default=1.0, gt=0)


class TimeoutSettings(BaseModel):
    connect_s: float = 5.0  # a replica's channel must be connected within this
    first_token_s: float = 120.0  # from the call to the first chunk (queueing + prefill)
    idle_chunk_s: float = 60.0  # between two chunks
    request_s: float = 1800.0  # deadline of one whole generation call
    unary_s: float = 30.0  # ListDeployments, Embed, Tokenize


class RoutingSettings(BaseModel):
    refresh_interval_s: float = 2.0  # how often every replica's ListDeployments is read
    eject_s: float = 5.0  # a failing replica is skipped this long, then checked again


class QuotaSettings(BaseModel):
    default_rpm: int = 0  # limits of keys created without their own; 0: unlimited
    default_tpm: int = 0
    default_max_tokens_estimate: int = 256  # reserved for a request without max_tokens (settled after)
    usage_flush_s: float = 1.0  # usage records are written in batches this often


class ConsoleSettings(BaseModel):
    """The web console at /console (gateway/console/)."""

    enabled: bool = True
    session_ttl_s: float = Field(default=8 * 3600.0, gt=0)  # a signed-in browser session lasts this long
    # HMAC key of the session cookies. Empty: a random one per process (a restart signs everyone out);
    # give every replica behind one load balancer the same value.
    session_secret: SecretStr = SecretStr("")
    rpc_timeout_s: float = Field(default=15.0, gt=0)  # deadline of each call the console makes to a service
    # Most rows a console list shows (per service in the jobs list).
    list_limit: int = Field(default=200, ge=1, le=1000)


class LimitSettings(BaseModel):
    """Bounds on what one request may ask (each excess is answered in the OpenAI error shape)."""

    # Largest request body, counted as it arrives (chunked bodies too): 413 beyond it. 20 MiB holds a 10 MiB
    # image as a base64 data URL (images.max_bytes) and stays within the services' 16 MiB gRPC messages once
    # decoded; text-only requests are far smaller.
    max_body_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    max_n: int = Field(default=16, ge=1, le=128)  # choices per prompt (`n`): 400 naming `n` beyond it
    max_prompts: int = Field(default=256, ge=1)  # prompts of one completion, inputs of one embedding request
    max_model_chars: int = Field(default=256, ge=1)  # length of the `model` string


class ImageSettings(BaseModel):
    """Image parts of chat messages (gateway/images.py): what one request may carry."""

    # http(s) image URLs: false (default) refuses them with a 400 naming the field (send data URLs); true fetches
    # them here, with fetch_timeout_s and max_bytes, so that engines never fetch anything.
    allow_remote_urls: bool = False
    max_bytes: int = Field(default=10 * 1024 * 1024, ge=1)  # one image, decoded (limits.max_body_bytes applies too)
    max_images: int = Field(default=8, ge=0)  # images in one request, all messages together
    fetch_timeout_s: float = Field(default=10.0, gt=0)  # one remote image, connect to last byte


class FineTuningSettings(BaseModel):
    """The OpenAI files and fine-tuning API (/v1/files, /v1/fine_tuning/jobs; gateway/finetune/)."""

    # Largest file POST /v1/files accepts (the body limit of that path; other paths keep limits.max_body_bytes).
    max_file_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    # How often each replica looks for unfinished jobs to follow (their events, their end).
    monitor_interval_s: float = Field(default=2.0, gt=0)
    # Deadline of each call to the registry, training and inference services (an upload: 10 times it).
    rpc_timeout_s: float = Field(default=30.0, gt=0)


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="YARD_GATEWAY_", env_nested_delimiter="__", extra="ignore")

    data_dir: Path = DEFAULT_DATA_DIR / "gateway"
    log_level: str = "INFO"
    log_json: bool = True
    event_loop: EventLoop = "auto"  # "asyncio": uvicorn's standard loop instead of uvloop
    database_url: str = ""  # empty: sqlite file <data_dir>/gateway.db
    http: HttpSettings = Field(default_factory=HttpSettings)
    # One inference replica "host:port", or several separated by commas.
    inference_addr: str = f"127.0.0.1:{DEFAULT_PORTS['inference']}"
    # The other services, read by the web console (/console) only.
    registry_addr: str = f"127.0.0.1:{DEFAULT_PORTS['registry']}"
    training_addr: str = f"127.0.0.1:{DEFAULT_PORTS['training']}"
    quantization_addr: str = f"127.0.0.1:{DEFAULT_PORTS['quantization']}"
    evaluation_addr: str = f"127.0.0.1:{DEFAULT_PORTS['evaluation']}"
    pipeline_addr: str = f"127.0.0.1:{DEFAULT_PORTS.get('pipeline', 50056)}"
    # The gRPC services' bearer token and TLS files for the gateway's calls to them (the services'
    # YARD_<SVC>_AUTH__TOKEN(_FILE); with mTLS a client certificate signed by their CA).
    service_auth: ServiceAuthSettings = Field(default_factory=ServiceAuthSettings)
    service_tls: ClientTlsSettings = Field(default_factory=ClientTlsSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    # Bearer token of the /admin endpoints. Empty: one is generated at start and written to
    # <data_dir>/admin_token (mode 0600), where the local `yard keys` finds it.
    admin_token: SecretStr = SecretStr("")
    # Where the generated admin token lives (default <data_dir>/admin_token): read when it exists,
    # created (0600, exclusively) only when it does not, so replicas sharing it keep one token.
    admin_token_file: Path | None = None
    # Case-insensitive terms refused in prompts and cut from outputs ("a,b" or a JSON list).
    blocked_terms: Annotated[list[str], NoDecode] = Field(default_factory=list)
    timeouts: TimeoutSettings = Field(default_factory=TimeoutSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    quota: QuotaSettings = Field(default_factory=QuotaSettings)
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    images: ImageSettings = Field(default_factory=ImageSettings)
    fine_tuning: FineTuningSettings = Field(default_factory=FineTuningSettings)

    @field_validator("blocked_terms", mode="before")
    @classmethod
    def _split_terms(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                import json

                return json.loads(value)
            return [t.strip() for t in value.split(",") if t.strip()]
        return value

    def service_credentials(self) -> ClientCredentials:
        """What the gateway's gRPC calls (routing, console) carry: ``service_auth`` and ``service_tls``."""
        from services.core.credentials import ClientCredentials

        return ClientCredentials.from_settings(self.service_auth, self.service_tls)

    @property
    def inference_addrs(self) -> list[str]:
        return [a.strip() for a in self.inference_addr.split(",") if a.strip()]

    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{(self.data_dir / 'gateway.db').resolve()}"
