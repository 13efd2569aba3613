"""grpc.aio server bootstrap shared by every service.

A ``GrpcServer`` carries the chassis: request-id / access-log / error interceptors, message
size limits, standard health and reflection services, a Prometheus metrics endpoint, and a
graceful SIGTERM: health goes NOT_SERVING, new calls are refused, in-flight calls get
``grace_period_s`` to finish, then the process exits.

Security (``auth`` and ``tls``, a service's ``ServiceSettings.auth`` / ``.tls``): with a token every call
but health and reflection must carry it (``AuthInterceptor``); with a certificate the port is TLS
(``grpc.ssl_server_credentials``), mTLS with ``client_auth``. A server without a token refuses to
listen on any address but loopback (``AUTH_REQUIRED``, before it binds anything).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from .errors import FailedPrecondition, Unavailable
from .interceptors import (
    AccessLogInterceptor,
    AuthInterceptor,
    ChainInterceptor,
    ErrorInterceptor,
    RequestIdInterceptor,
)
from .logging import get_logger
from .settings import GrpcServerSettings, ServiceAuthSettings, TlsSettings, is_loopback_host
from .suppressed import record_suppressed

log = get_logger("modelyard.server")


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


class GrpcServer:
    def __init__(
        self,
        settings: GrpcServerSettings,
        *,
        service: str,
        default_port: int = 0,
        metrics: bool = True,
        auth: ServiceAuthSettings | None = None,
        tls: TlsSettings | None = None,
    ) -> None:
        self.settings = settings
        self.service = service
        self.auth = auth or ServiceAuthSettings()
        self.tls = tls or TlsSettings()
        self._port = settings.port or default_port
        self._metrics_enabled = metrics
        self._drain_notice_s = settings.drain_notice_s
        self._servicers: list[tuple[Callable, object, str]] = []
        self._shutdown_hooks: list[Callable[[], Awaitable[None]]] = []
        self._server: grpc.aio.Server | None = None
        self._health = HealthServicer()
        self._metrics_server: Any = None  # wsgiref server of prometheus_client, once started
        self._stopped = asyncio.Event()
        self.port: int = 0
        self.metrics_port: int | None = None

    async def set_health(self, service: str, serving: bool) -> None:
        """Report ``service`` (any name a health probe asks for) SERVING or NOT_SERVING; ignored once draining."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self._health.set(service, status)

    def add_servicer(self, add_fn: Callable, servicer: object, full_name: str) -> None:
        self._servicers.append((add_fn, servicer, full_name))

    def on_shutdown(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run ``hook`` after the server stopped taking calls (stop workers, close clients...)."""
        self._shutdown_hooks.append(hook)

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    @property
    def env_prefix(self) -> str:
        return f"YARD_{self.service.upper()}_"

    def _tokens(self) -> list[str]:
        """The accepted tokens; refuses (before anything binds) a non-loopback address without one."""
        tokens = self.auth.tokens(f"{self.env_prefix}AUTH__")
        host = self.settings.host
        if not tokens and not is_loopback_host(host):
            p = self.env_prefix
            raise FailedPrecondition(
                f"{self.service}: refusing to listen on {host or 'every address'} without authentication: "
                f"set {p}AUTH__TOKEN_FILE (or {p}AUTH__TOKEN) to the services' shared token, or listen on "
                f"127.0.0.1 ({p}GRPC__HOST)",
                reason="AUTH_REQUIRED",
            )
        return tokens

    def _server_credentials(self) -> grpc.ServerCredentials | None:
        tls = self.tls
        if not tls.server_enabled:
            return None
        assert tls.cert_file is not None and tls.key_file is not None  # the settings validate the pair

        def read(path, setting: str) -> bytes:
            try:
                return path.read_bytes()
            except OSError as exc:
                raise FailedPrecondition(
                    f"{self.service}: cannot read {path} ({self.env_prefix}TLS__{setting}): {exc.strerror or exc}",
                    reason="TLS_FILE_UNREADABLE",
                ) from None

        cert, key = read(tls.cert_file, "CERT_FILE"), read(tls.key_file, "KEY_FILE")
        ca = read(tls.ca_file, "CA_FILE") if tls.client_auth and tls.ca_file is not None else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=tls.client_auth)

    async def start(self) -> None:
        s = self.settings
        tokens = self._tokens()
        credentials = self._server_credentials()
        chain = [
            RequestIdInterceptor(),
            AccessLogInterceptor(self.service),
            ErrorInterceptor(f"modelyard.{self.service}"),
        ]
        if tokens:
            chain.append(AuthInterceptor(tokens, self.service))
        server = grpc.aio.server(
            interceptors=[ChainInterceptor(*chain)],
            options=server_options(s.max_message_bytes),
            maximum_concurrent_rpcs=None,
        )
        names = []
        for add_fn, servicer, full_name in self._servicers:
            add_fn(servicer, server)
            names.append(full_name)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            names + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
        )
        try:
            if credentials is None:
                port = server.add_insecure_port(f"{s.host}:{self._port}")
            else:
                port = server.add_secure_port(f"{s.host}:{self._port}", credentials)
        except RuntimeError as exc:
            raise Unavailable(
                f"{self.service}: cannot listen on {s.host}:{self._port} (port already in use?): {exc}",
                reason="PORT_IN_USE",
            ) from None
        if port == 0:
            raise Unavailable(
                f"{self.service}: cannot listen on {s.host}:{self._port} (port already in use?)", reason="PORT_IN_USE"
            )
        self.port = port
        await server.start()
        self._server = server
        for name in ["", *names]:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self._metrics_enabled:
            self._start_metrics()
        log.info(
            "server_started",
            service=self.service,
            address=self.address,
            metrics_port=self.metrics_port,
            services=names,
            auth="token" if tokens else "none",
            tls="mtls" if credentials is not None and self.tls.client_auth else ("tls" if credentials else "none"),
        )

    def _start_metrics(self) -> None:
        from prometheus_client import start_http_server

        self._metrics_server, _thread = start_http_server(self.settings.metrics_port, addr=self.settings.host)
        self.metrics_port = self._metrics_server.server_port

    async def stop(self, grace: float | None = None) -> None:
        if self._server is None or self._stopped.is_set():
            return
        grace = self.settings.grace_period_s if grace is None else grace
        log.info("server_draining", service=self.service, grace_s=grace)
        await self._health.enter_graceful_shutdown()  # health answers NOT_SERVING from now on
        if self._drain_notice_s:
            await asyncio.sleep(self._drain_notice_s)
        await self._server.stop(grace)
        for hook in self._shutdown_hooks:
            try:
                await hook()
            except Exception as exc:  # noqa: BLE001 - one failing hook must not block the others
                record_suppressed(log, "server_shutdown_hook", exc, level="error", service=self.service, exc_info=exc)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        self._stopped.set()
        log.info("server_stopped", service=self.service)

    async def wait_for_termination(self) -> None:
        """Serve until SIGTERM/SIGINT, then drain and stop."""
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_requested.set)
        waiter = asyncio.ensure_future(stop_requested.wait())
        stopped = asyncio.ensure_future(self._stopped.wait())
        await asyncio.wait({waiter, stopped}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        stopped.cancel()
        await self.stop()
