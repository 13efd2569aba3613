"""What a gRPC client presents to a ModelYard service: the bearer token and the TLS files.

``ClientCredentials`` is built in one of three ways:

- from a service's settings (``ServiceSettings.client_credentials()``, the gateway's ``service_auth`` /
  ``service_tls``): a service calls the others with its own token and TLS files;
- from the environment of the SDK / CLI (``ClientCredentials.from_environment()``): ``YARD_TOKEN``,
  ``YARD_TOKEN_FILE``, ``YARD_TLS_CA_FILE``, ``YARD_TLS_CERT_FILE``, ``YARD_TLS_KEY_FILE``; what is not set
  there comes from the files ``yard up`` wrote under the data directory (``YARD_DATA_DIR``, else
  ``YARD_STACK_DATA_DIR``, else ``~/.modelyard``): ``secrets/service_token`` and ``secrets/tls/``;
- explicitly (the SDK clients' ``token=`` / ``ca_file=`` ... arguments).

A variable set to the empty string means "none" (no token, no TLS) and stops the data-dir lookup: that is
how a service hands its own (possibly empty) credentials to its job children (``child_env``).
``services.core.grpc_client.make_channel`` turns the credentials into the channel's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import FailedPrecondition, InvalidArgument
from .settings import DEFAULT_DATA_DIR, ClientTlsSettings, ServiceAuthSettings, read_tokens

AUTHORIZATION_HEADER = "authorization"


@dataclass(frozen=True)
class SecretsLayout:
    """Where ``yard up`` keeps the secrets of one data directory (directory 0700, files 0600)."""

    data_dir: Path

    @property
    def dir(self) -> Path:
        return self.data_dir / "secrets"

    @property
    def token_file(self) -> Path:
        return self.dir / "service_token"

    @property
    def s3_env_file(self) -> Path:
        return self.dir / "s3.env"

    @property
    def tls_dir(self) -> Path:
        return self.dir / "tls"

    @property
    def ca_cert(self) -> Path:
        return self.tls_dir / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.tls_dir / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.tls_dir / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.tls_dir / "server.key"

    @property
    def client_cert(self) -> Path:
        return self.tls_dir / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.tls_dir / "client.key"


class _ClientEnvironment(BaseSettings):
    """The SDK's environment (read once per ``from_environment`` call)."""

    model_config = SettingsConfigDict(env_prefix="YARD_", extra="ignore")

    token: SecretStr | None = None
    token_file: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    data_dir: str | None = None
    stack_data_dir: str | None = None


def _path(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None


@dataclass(frozen=True)
class ClientCredentials:
    """A token (empty: none) and TLS files (no ``ca_file`` and no ``cert_file``: plaintext)."""

    token: str = ""
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise InvalidArgument.for_field("cert_file", "a client certificate and its key go together")

    def __repr__(self) -> str:  # never the token
        token = "***" if self.token else ""
        return (
            f"ClientCredentials(token={token!r}, ca_file={self.ca_file}, cert_file={self.cert_file}, "
            f"key_file={self.key_file})"
        )

    @property
    def tls(self) -> bool:
        return self.ca_file is not None or self.cert_file is not None

    @property
    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata a call on a plaintext channel carries itself (gRPC attaches call credentials only to
        TLS channels; there the channel's credentials carry the token and this is empty)."""
        if self.token and not self.tls:
            return ((AUTHORIZATION_HEADER, f"Bearer {self.token}"),)
        return ()

    def read_tls_files(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(CA, key, certificate chain) as bytes, for ``grpc.ssl_channel_credentials``."""

        def read(path: Path | None, what: str) -> bytes | None:
            if path is None:
                return None
            try:
                return path.read_bytes()
            except OSError as exc:
                raise FailedPrecondition(
                    f"cannot read the {what} {path}: {exc.strerror or exc}", reason="TLS_FILE_UNREADABLE"
                ) from None

        return (
            read(self.ca_file, "TLS CA file"),
            read(self.key_file, "TLS key"),
            read(self.cert_file, "TLS certificate"),
        )

    @classmethod
    def from_settings(cls, auth: ServiceAuthSettings, tls: ClientTlsSettings) -> ClientCredentials:
        """A service's (or the gateway's) outgoing credentials: the first token of ``auth``, the TLS files of
        ``tls`` (a server certificate doubles as the client certificate of mTLS)."""
        tokens = auth.tokens() if auth.enabled else []
        if not tls.enabled:
            return cls(token=tokens[0] if tokens else "")
        return cls(
            token=tokens[0] if tokens else "", ca_file=tls.ca_file, cert_file=tls.cert_file, key_file=tls.key_file
        )

    @classmethod
    def from_environment(cls) -> ClientCredentials:
        """The SDK's defaults: ``YARD_TOKEN`` / ``YARD_TOKEN_FILE`` / ``YARD_TLS_*_FILE``, else the files
        ``yard up`` wrote under the data directory (see the module docstring)."""
        env = _ClientEnvironment()
        layout = SecretsLayout(Path(env.data_dir or env.stack_data_dir or DEFAULT_DATA_DIR).expanduser())
        if env.token is not None:
            token = env.token.get_secret_value().strip()
        elif env.token_file is not None:
            token = read_tokens(Path(env.token_file).expanduser(), "YARD_TOKEN_FILE")[0] if env.token_file else ""
        elif layout.token_file.is_file():
            token = read_tokens(layout.token_file, str(layout.token_file))[0]
        else:
            token = ""
        if any(value is not None for value in (env.tls_ca_file, env.tls_cert_file, env.tls_key_file)):
            return cls(
                token=token,
                ca_file=_path(env.tls_ca_file),
                cert_file=_path(env.tls_cert_file),
                key_file=_path(env.tls_key_file),
            )
        if layout.ca_cert.is_file():
            has_client = layout.client_cert.is_file() and layout.client_key.is_file()
            return cls(
                token=token,
                ca_file=layout.ca_cert,
                cert_file=layout.client_cert if has_client else None,
                key_file=layout.client_key if has_client else None,
            )
        return cls(token=token)

    def child_env(self) -> dict[str, str]:
        """These credentials as the SDK's variables, for a child process (empty values: none)."""
        return {
            "YARD_TOKEN": self.token,
            "YARD_TLS_CA_FILE": str(self.ca_file or ""),
            "YARD_TLS_CERT_FILE": str(self.cert_file or ""),
            "YARD_TLS_KEY_FILE": str(self.key_file or ""),
        }


__all__ = ["AUTHORIZATION_HEADER", "ClientCredentials", "SecretsLayout"]
