"""Service authentication through real gRPC servers on loopback: the chassis' bearer-token check (health
open for probes), TLS and mTLS with the certificates `yard up --tls` makes, the refusal to listen beyond
loopback without a token, the SDK's credentials from the data dir, service-to-service calls carrying the
token, the secrets files' modes, and the S3 development credentials refused off loopback."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys

import grpc
import pytest
from google.protobuf.wrappers_pb2 import StringValue
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from pydantic import SecretStr, ValidationError

from cli.s3server import free_port
from cli.stack_secrets import ensure_tls, prepare_stack_secrets
from modelyard.client import ClientCredentials, NotFound, RegistryClient, TrainingClient, Unauthenticated
from services.core.credentials import SecretsLayout
from services.core.errors import FailedPrecondition
from services.core.grpc_client import make_channel
from services.core.grpc_server import GrpcServer
from services.core.settings import GrpcServerSettings, S3Settings, ServiceAuthSettings, TlsSettings
from services.registry.app import build_app as build_registry
from services.registry.settings import RegistrySettings
from services.training.app import build_app as build_training
from services.training.settings import TrainingSettings
from tests.support.echo_service import SERVICE, EchoServicer, add_to_server, stub
from tests.support.training_stack import lora_job

TOKEN = "t0ken-for-the-services-0123456789"
HEALTH = health_pb2.HealthCheckRequest(service="")


async def echo_server(**kw) -> GrpcServer:
    server = GrpcServer(GrpcServerSettings(port=0, grace_period_s=0), service="echo", metrics=False, **kw)
    server.add_servicer(add_to_server, EchoServicer(), SERVICE)
    await server.start()
    return server


def reason_of(exc: grpc.aio.AioRpcError) -> str:
    info = error_details_pb2.ErrorInfo()
    assert rpc_status.from_call(exc).details[0].Unpack(info)
    return info.reason


async def echo(channel: grpc.aio.Channel, metadata=None) -> str:
    return (await stub(channel, "Echo")(StringValue(value="hi"), metadata=metadata)).value


async def test_token_is_required_checked_and_health_stays_open():
    server = await echo_server(auth=ServiceAuthSettings(token=SecretStr(TOKEN)))
    try:
        async with make_channel(server.address, retry_attempts=1) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await echo(ch)
            with pytest.raises(grpc.aio.AioRpcError) as wrong:
                await echo(ch, metadata=(("authorization", "Bearer " + TOKEN[:-1] + "X"),))
            with pytest.raises(grpc.aio.AioRpcError) as not_bearer:
                await echo(ch, metadata=(("authorization", TOKEN),))
            # health answers without a token (probes), the RPCs with the right one
            reply = await health_pb2_grpc.HealthStub(ch).Check(HEALTH, timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert missing.value.code() == wrong.value.code() == not_bearer.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert reason_of(missing.value) == "TOKEN_MISSING"
        assert reason_of(wrong.value) == reason_of(not_bearer.value) == "TOKEN_INVALID"
        assert TOKEN not in wrong.value.details()

        # make_channel's credentials on a plaintext channel: unary through the retry interceptor, a stream
        # through the metadata interceptor
        async with make_channel(server.address, credentials=ClientCredentials(token=TOKEN)) as ch:
            assert '"hi"' in await echo(ch)
            ticks = stub(ch, "Count", stream=True)(StringValue(value="2"))
            assert [m.value async for m in _until_error(ticks)] == ["0", "1"]  # past the token check
    finally:
        await server.stop(0)


async def test_token_file_accepts_every_line_for_rotation_and_the_client_sends_the_first(tmp_path):
    new, old = "new-token-0123456789abcdef", "old-token-0123456789abcdef"
    path = tmp_path / "token"
    path.write_text(f"{new}\n{old}\n")
    auth = ServiceAuthSettings(token_file=path)
    server = await echo_server(auth=auth)
    try:
        for token in (new, old):
            async with make_channel(server.address, credentials=ClientCredentials(token=token)) as ch:
                assert '"hi"' in await echo(ch)
        assert ClientCredentials.from_settings(auth, TlsSettings()).token == new
    finally:
        await server.stop(0)
    with pytest.raises(FailedPrecondition, match="YARD_ECHO_AUTH__TOKEN: a service token must be at least 16"):
        await echo_server(auth=ServiceAuthSettings(token=SecretStr("short")))


async def test_tls_and_mtls_with_the_generated_certificates(tmp_path):
    layout = SecretsLayout(tmp_path)
    files = ensure_tls(layout, ["127.0.0.1", "localhost"])
    ca_only = ClientCredentials(token=TOKEN, ca_file=files.ca_cert)
    with_cert = ClientCredentials(
        token=TOKEN, ca_file=files.ca_cert, cert_file=files.client_cert, key_file=files.client_key
    )
    auth = ServiceAuthSettings(token=SecretStr(TOKEN))

    tls = await echo_server(auth=auth, tls=TlsSettings(cert_file=files.server_cert, key_file=files.server_key))
    try:
        async with make_channel(tls.address, credentials=ca_only) as ch:  # the token rides as call credentials
            assert '"hi"' in await echo(ch)
        async with make_channel(
            tls.address, credentials=ClientCredentials(ca_file=files.ca_cert), retry_attempts=1
        ) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as no_token:
                await echo(ch)
        assert no_token.value.code() == grpc.StatusCode.UNAUTHENTICATED
        async with make_channel(
            tls.address, credentials=ClientCredentials(token=TOKEN), retry_attempts=1, default_timeout_s=3
        ) as ch:  # plaintext to a TLS port
            with pytest.raises(grpc.aio.AioRpcError) as plaintext:
                await echo(ch)
        assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await tls.stop(0)

    mtls = await echo_server(
        auth=auth,
        tls=TlsSettings(
            cert_file=files.server_cert, key_file=files.server_key, ca_file=files.ca_cert, client_auth=True
        ),
    )
    try:
        async with make_channel(mtls.address, credentials=with_cert) as ch:
            assert '"hi"' in await echo(ch)
            ticks = stub(ch, "Count", stream=True)(StringValue(value="1"))
            assert [m.value async for m in _until_error(ticks)] == ["0"]
        async with make_channel(mtls.address, credentials=ca_only, retry_attempts=1, default_timeout_s=3) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as no_cert:  # refused in the handshake
                await echo(ch)
            with pytest.raises(grpc.aio.AioRpcError):
                await health_pb2_grpc.HealthStub(ch).Check(HEALTH, timeout=3)
        assert no_cert.value.code() == grpc.StatusCode.UNAVAILABLE
        async with make_channel(
            mtls.address,
            credentials=ClientCredentials(  # probes need the certificate only
                ca_file=files.ca_cert, cert_file=files.client_cert, key_file=files.client_key
            ),
        ) as ch:
            reply = await health_pb2_grpc.HealthStub(ch).Check(HEALTH, timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await mtls.stop(0)


async def _until_error(call):
    try:
        async for message in call:
            yield message
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND  # the echo stream's own end, not an auth error


async def test_non_loopback_listen_without_token_is_refused_before_binding():
    port = free_port()
    server = GrpcServer(GrpcServerSettings(host="0.0.0.0", port=port), service="echo", metrics=False)
    server.add_servicer(add_to_server, EchoServicer(), SERVICE)
    with pytest.raises(FailedPrecondition) as info:
        await server.start()
    assert info.value.reason == "AUTH_REQUIRED"
    assert "YARD_ECHO_AUTH__TOKEN_FILE" in info.value.message and "0.0.0.0" in info.value.message
    with socket.socket() as s:  # nothing listens on the port
        assert s.connect_ex(("127.0.0.1", port)) != 0

    # the same as a service process: one line on stderr naming the setting, exit status 1
    env = {
        **os.environ,
        "YARD_ECHO_GRPC__HOST": "0.0.0.0",
        "YARD_ECHO_GRPC__PORT": str(port),
        "YARD_ECHO_LOG_JSON": "false",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.echo_service"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "error: echo: refusing to listen on 0.0.0.0 without authentication" in proc.stderr
    assert "YARD_ECHO_AUTH__TOKEN_FILE" in proc.stderr


def test_stack_secrets_are_private_kept_across_starts_and_tls_follows_the_flag(tmp_path):
    first = prepare_stack_secrets(tmp_path, host="127.0.0.1", tls=True)
    layout = SecretsLayout(tmp_path)
    assert first.tls is not None and first.s3_secret_key != "modelyard-secret"
    assert stat.S_IMODE(layout.dir.stat().st_mode) == stat.S_IMODE(layout.tls_dir.stat().st_mode) == 0o700
    files = [layout.token_file, layout.s3_env_file, *(p for p in layout.tls_dir.iterdir())]
    assert len(files) == 8
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    layout.token_file.chmod(0o644)
    token, ca = layout.token_file.read_text(), layout.ca_cert.read_bytes()

    again = prepare_stack_secrets(tmp_path, host="127.0.0.1", tls=None)  # tls=None: as the last start
    assert again == first and layout.token_file.read_text() == token and layout.ca_cert.read_bytes() == ca
    assert stat.S_IMODE(layout.token_file.stat().st_mode) == 0o600  # tightened
    moved = prepare_stack_secrets(tmp_path, host="10.1.2.3", tls=None)  # a new host: the same CA, a new cert
    assert layout.ca_cert.read_bytes() == ca and b"10.1.2.3" not in ca
    from cryptography import x509

    sans = (
        x509.load_pem_x509_certificate(moved.tls.server_cert.read_bytes())
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1", "10.1.2.3"}
    assert "localhost" in sans.get_values_for_type(x509.DNSName)

    off = prepare_stack_secrets(tmp_path, host="127.0.0.1", tls=False)
    assert off.tls is None and not layout.tls_dir.exists() and layout.token_file.read_text() == token


async def test_sdk_reads_the_data_dir_and_services_call_each_other_with_token_and_mtls(
    tmp_path, s3_settings, monkeypatch
):
    """Registry and training as `yard up --tls` starts them (token file, mTLS); the SDK with no arguments
    finds the data dir's files; training's preflight reaches the registry with its own credentials."""
    secrets = prepare_stack_secrets(tmp_path / "yard", host="127.0.0.1", tls=True)
    files = secrets.tls
    assert files is not None
    auth = ServiceAuthSettings(token_file=secrets.token_file)
    tls = TlsSettings(cert_file=files.server_cert, key_file=files.server_key, ca_file=files.ca_cert, client_auth=True)
    registry = build_registry(
        RegistrySettings(
            data_dir=tmp_path / "registry", s3=s3_settings, auth=auth, tls=tls, grpc=GrpcServerSettings(port=0)
        ),
        metrics=False,
        default_port=0,
    )
    await registry.start()
    try:
        training = build_training(
            TrainingSettings(
                data_dir=tmp_path / "training",
                s3=s3_settings,
                grpc=GrpcServerSettings(port=0),
                auth=auth,
                tls=tls,
                registry_addr=registry.server.address,
                worker_enabled=False,
            ),
            metrics=False,
            default_port=0,
        )
        await training.start()
        try:
            for name in (
                "YARD_TLS_CA_FILE",
                "YARD_TLS_CERT_FILE",
                "YARD_TLS_KEY_FILE",
                "YARD_TOKEN",
                "YARD_TOKEN_FILE",
            ):
                monkeypatch.delenv(name, raising=False)
            monkeypatch.setenv("YARD_DATA_DIR", str(tmp_path / "yard"))
            async with RegistryClient(registry.server.address, timeout=10) as client:
                assert client.credentials.tls and client.credentials.token
                assert list((await client.list_models()).models) == []
                with pytest.raises(NotFound):  # a stream carries the credentials as well
                    async for _ in client.watch_import("imports/" + "0" * 32):
                        pass
            async with TrainingClient(training.server.address, timeout=30) as client:
                with pytest.raises(NotFound) as missing:  # training asked the registry: its token and cert passed
                    await client.create_training_job(lora_job("models/nope/versions/v1", ["datasets/d/versions/v1"]))
                assert "models/nope/versions/v1" in missing.value.message

            monkeypatch.setenv("YARD_TOKEN", "not-the-token-0123456789")  # the environment wins over the files
            async with RegistryClient(registry.server.address, timeout=10, retry_attempts=1) as client:
                with pytest.raises(Unauthenticated) as wrong:
                    await client.list_models()
                assert wrong.value.reason == "TOKEN_INVALID"
            token = secrets.token_file.read_text().strip()
            async with RegistryClient(registry.server.address, timeout=10, token=token) as client:  # argument wins
                assert list((await client.list_models()).models) == []
        finally:
            await training.server.stop(0)
    finally:
        await registry.server.stop(0)


def test_s3_development_credentials_are_refused_off_loopback(monkeypatch):
    for endpoint in ("127.0.0.1:9000", "localhost:9000", "[::1]:9000"):
        assert S3Settings(endpoint=endpoint).access_key == "modelyard"
    with pytest.raises(ValidationError, match="not loopback .* S3__ACCESS_KEY and S3__SECRET_KEY"):
        S3Settings(endpoint="minio.internal:9000")
    with pytest.raises(ValidationError, match="not loopback"):
        S3Settings(endpoint="10.0.0.5:9000", access_key="other", secret_key=SecretStr("modelyard-secret"))
    assert S3Settings(endpoint="minio.internal:9000", access_key="k", secret_key=SecretStr("s" * 20)).bucket
    # as a service reads it from its environment
    monkeypatch.setenv("YARD_REGISTRY_S3__ENDPOINT", "minio.internal:9000")
    with pytest.raises(ValidationError, match="not loopback"):
        RegistrySettings()
    monkeypatch.setenv("YARD_REGISTRY_S3__ACCESS_KEY", "prod")
    monkeypatch.setenv("YARD_REGISTRY_S3__SECRET_KEY", "a-real-secret-0123456789")
    assert RegistrySettings().s3.endpoint == "minio.internal:9000"


def test_yard_up_tls_then_status_and_the_cli_with_the_data_dir_then_down(tmp_path):
    """The real `yard up --detach --tls` (S3 + the registry process): every file 0600, `yard status` probes
    over mTLS, the CLI finds the token and certificates through YARD_DATA_DIR, a bare call is refused."""
    data_dir = tmp_path / "yard"
    s3_port, registry_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YARD_TLS_", "YARD_TOKEN"))}
    env.update({"COLUMNS": "200", "YARD_STACK_PORT_S3": str(s3_port), "YARD_STACK_PORT_REGISTRY": str(registry_port)})

    def yard(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, timeout=180, env={**env, **extra}
        )

    up = yard("up", "--detach", "--tls", "--only", "registry", "--data-dir", str(data_dir))
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "mTLS certificates" in up.stdout and f"export YARD_DATA_DIR={data_dir}" in up.stdout
        layout = SecretsLayout(data_dir)
        for path in [layout.token_file, layout.s3_env_file, *layout.tls_dir.iterdir()]:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        status = yard("status", "--data-dir", str(data_dir))
        assert status.returncode == 0 and "SERVING" in status.stdout, status.stdout + status.stderr
        addr = f"127.0.0.1:{registry_port}"
        listed = yard("models", "list", YARD_DATA_DIR=str(data_dir), YARD_REGISTRY_ADDR=addr)
        assert listed.returncode == 0, listed.stdout + listed.stderr
        no_token = yard("models", "list", YARD_DATA_DIR=str(data_dir), YARD_REGISTRY_ADDR=addr, YARD_TOKEN="")
        assert no_token.returncode == 1 and "TOKEN_MISSING" in no_token.stderr, no_token.stdout + no_token.stderr
        registry_log = (data_dir / "logs" / "registry.log").read_text()
        assert "tls=mtls" in registry_log or '"tls": "mtls"' in registry_log
    finally:
        down = yard("down", "--data-dir", str(data_dir))
    assert down.returncode == 0 and "stopped" in down.stdout
