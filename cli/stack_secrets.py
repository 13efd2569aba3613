"""The secrets `yard up` keeps in a data directory, made once and kept across restarts.

Layout (``services.core.credentials.SecretsLayout``; directories 0700, files 0600):

    <data_dir>/secrets/service_token      the bearer token every service requires and sends
    <data_dir>/secrets/s3.env             AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY of the stack's S3 server
    <data_dir>/secrets/tls/ca.pem, ca.key           a local CA (`yard up --tls`)
    <data_dir>/secrets/tls/server.pem, server.key   the services' certificate (also their mTLS client one)
    <data_dir>/secrets/tls/client.pem, client.key   the CLI's / SDK's client certificate

The SDK and the CLI read ``service_token`` and ``tls/`` by default (``ClientCredentials.from_environment``).
A file that is missing, unreadable or (for certificates) expiring within 30 days (``cli.stack_certs.RENEW_BEFORE``) is made again; a
certificate is also re-issued when it lacks a host the stack now listens on, or its CA changed.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.core.credentials import SecretsLayout
from services.core.errors import FailedPrecondition
from services.core.logging import get_logger
from services.core.settings import MIN_TOKEN_CHARS, read_tokens

log = get_logger(__name__)

S3_ACCESS_VAR = "AWS_ACCESS_KEY_ID"
S3_SECRET_VAR = "AWS_SECRET_ACCESS_KEY"


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@dataclass(frozen=True)
class StackSecrets:
    """What one start of the stack hands its processes."""

    token_file: Path
    s3_access_key: str
    s3_secret_key: str
    tls: TlsFiles | None = None


# --------------------------------------------------------------------------- files


def private_dir(path: Path) -> Path:
    """``path`` as a directory only its owner can enter (0700, created with its parents)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600 from its first byte (a temporary file, then a rename)."""
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _tighten(path: Path) -> None:
    """Mode 0600 for a kept file that someone made readable to others."""
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)


# --------------------------------------------------------------------------- token, S3


def ensure_service_token(layout: SecretsLayout) -> Path:
    """The token file of the data directory (made with a fresh random token when missing or invalid)."""
    private_dir(layout.dir)
    path = layout.token_file
    if path.is_file():
        try:
            tokens = read_tokens(path, str(path))
        except FailedPrecondition:
            tokens = []
        if tokens and all(len(t) >= MIN_TOKEN_CHARS for t in tokens):
            _tighten(path)
            return path
        log.warning("service_token_replaced", path=str(path), reason="unreadable, empty or too short")
    write_private(path, (secrets.token_urlsafe(32) + "\n").encode())
    log.info("service_token_created", path=str(path))
    return path


def ensure_s3_credentials(layout: SecretsLayout) -> tuple[str, str]:
    """(access key, secret key) of the stack's S3 server, from ``s3.env`` (made when missing)."""
    private_dir(layout.dir)
    path = layout.s3_env_file
    if path.is_file():
        values = {}
        for line in path.read_text().splitlines():
            key, sep, value = line.strip().partition("=")
            if sep and not key.startswith("#"):
                values[key.strip()] = value.strip()
        access, secret = values.get(S3_ACCESS_VAR, ""), values.get(S3_SECRET_VAR, "")
        if access and len(secret) >= MIN_TOKEN_CHARS:
            _tighten(path)
            return access, secret
        log.warning("s3_credentials_replaced", path=str(path), reason="incomplete")
    access, secret = f"yard-{secrets.token_hex(8)}", secrets.token_urlsafe(32)
    text = (
        "# Credentials of this data directory's S3 server (yard up). `set -a; . THIS_FILE` for the aws CLI.\n"
        f"{S3_ACCESS_VAR}={access}\n{S3_SECRET_VAR}={secret}\n"
    )
    write_private(path, text.encode())
    log.info("s3_credentials_created", path=str(path))
    return access, secret


# --------------------------------------------------------------------------- TLS


def stack_hosts(host: str) -> list[str]:
    """The names the services' certificate carries: loopback by address and name, plus the stack host."""
    return ["127.0.0.1", "::1", "localhost", host]


def ensure_tls(layout: SecretsLayout, hosts: Sequence[str]) -> TlsFiles:
    """The local CA, the services' certificate (SANs ``hosts``) and the client certificate, made or renewed as
    needed (see the module docstring)."""
    from cli import stack_certs as certs  # cryptography: the server extra, imported only here

    private_dir(layout.tls_dir)
    ca = certs.load_pair(layout.ca_cert, layout.ca_key)
    if ca is None:
        ca = certs.new_ca()
        _write_pair(certs.pair_pem(*ca), layout.ca_cert, layout.ca_key)
        log.info("tls_ca_created", path=str(layout.ca_cert))
    sans = certs.san_entries(hosts)
    server = certs.load_pair(layout.server_cert, layout.server_key)
    if server is None or not certs.signed_by(server[0], ca[0]) or not set(sans) <= certs.sans_of(server[0]):
        issued = certs.issue(ca, "modelyard-services", sans, server=True)
        _write_pair(certs.pair_pem(*issued), layout.server_cert, layout.server_key)
        log.info("tls_server_certificate_issued", path=str(layout.server_cert), hosts=list(hosts))
    client = certs.load_pair(layout.client_cert, layout.client_key)
    if client is None or not certs.signed_by(client[0], ca[0]):
        issued = certs.issue(ca, "modelyard-client", [], server=False)
        _write_pair(certs.pair_pem(*issued), layout.client_cert, layout.client_key)
        log.info("tls_client_certificate_issued", path=str(layout.client_cert))
    for path in (
        layout.ca_cert,
        layout.ca_key,
        layout.server_cert,
        layout.server_key,
        layout.client_cert,
        layout.client_key,
    ):
        _tighten(path)
    return TlsFiles(layout.ca_cert, layout.server_cert, layout.server_key, layout.client_cert, layout.client_key)


def _write_pair(pem: tuple[bytes, bytes], cert_path: Path, key_path: Path) -> None:
    cert, key = pem
    write_private(key_path, key)
    write_private(cert_path, cert)


def remove_tls(layout: SecretsLayout) -> bool:
    """Remove the TLS files (the stack runs without TLS from now on, and the SDK stops using them)."""
    if not layout.tls_dir.exists():
        return False
    shutil.rmtree(layout.tls_dir)
    log.info("tls_removed", path=str(layout.tls_dir))
    return True


def tls_files(layout: SecretsLayout) -> TlsFiles | None:
    """The TLS files of a data directory whose stack runs with TLS (None when it does not)."""
    if not layout.ca_cert.is_file():
        return None
    return TlsFiles(layout.ca_cert, layout.server_cert, layout.server_key, layout.client_cert, layout.client_key)


def prepare_stack_secrets(
    data_dir: Path, *, host: str, tls: bool | None, s3_access_key: str = "", s3_secret_key: str = ""
) -> StackSecrets:
    """The token, the S3 credentials (those given, else the data directory's) and, when ``tls`` (None: as the
    last start of this data directory), the certificates."""
    layout = SecretsLayout(data_dir)
    token_file = ensure_service_token(layout)
    if not (s3_access_key and s3_secret_key):
        s3_access_key, s3_secret_key = ensure_s3_credentials(layout)
    use_tls = layout.ca_cert.is_file() if tls is None else tls
    if not use_tls:
        if tls is False:
            remove_tls(layout)
        return StackSecrets(token_file, s3_access_key, s3_secret_key)
    return StackSecrets(token_file, s3_access_key, s3_secret_key, ensure_tls(layout, stack_hosts(host)))
