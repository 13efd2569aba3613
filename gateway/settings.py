"""Settings of the gateway (env prefix ``YARD_GATEWAY_``, nested fields with ``__``).

Built once in ``gateway.__main__`` (or by a test) and passed down; nothing else reads os.environ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.core.settings import DEFAULT_DATA_DIR, DEFAULT_PORTS, EventLoop


class HttpSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORTS["gateway"]
    # Idle keep-alive connections are closed after this. Longer than the clients' own expiry (httpx,
    # and so the OpenAI SDK: 5 s), so that a client never sends a request on a connection the
    # gateway is closing at that moment (uvicorn's 5 s default races with it: ReadError).
    keep_alive_s: float = 75.0


class AuthSettings(BaseModel):
    required: bool = True  # false: local development only, every request is "anonymous"
    cache_ttl_s: float = 10.0  # key lookups are cached this long; a revocation elsewhere takes effect within it
    negative_cache_ttl_s: float = 2.0  # unknown keys are remembered this long (no DB hit per bad request)


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
    auth: AuthSettings = Field(default_factory=AuthSettings)
    # Bearer token of the /admin endpoints. Empty: one is generated at start and written to
    # <data_dir>/admin_token (mode 0600), where the local `yard keys` finds it.
    admin_token: SecretStr = SecretStr("")
    # Case-insensitive terms refused in prompts and cut from outputs ("a,b" or a JSON list).
    blocked_terms: Annotated[list[str], NoDecode] = Field(default_factory=list)
    timeouts: TimeoutSettings = Field(default_factory=TimeoutSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    quota: QuotaSettings = Field(default_factory=QuotaSettings)

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

    @property
    def inference_addrs(self) -> list[str]:
        return [a.strip() for a in self.inference_addr.split(",") if a.strip()]

    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{(self.data_dir / 'gateway.db').resolve()}"
