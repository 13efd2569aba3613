"""Client side of the chassis: channels with deadlines, request-id forwarding, retry and typed errors.

Every call gets a deadline (``default_timeout_s`` unless the caller passes one) and carries the
current request id as ``x-request-id`` metadata (so the id of the call being served follows every
hop). Unary calls that fail with UNAVAILABLE (a server restarting or not up yet) are retried with
exponential backoff when ``retry_if(method)`` says the call is safe to repeat (default: every unary
call). With ``typed_errors=True`` a failed unary call raises the ``DomainError`` the status stands
for (``services.core.status.error_from_rpc_error``) instead of ``grpc.aio.AioRpcError``; streams
are wrapped by their caller (``modelyard.client``), since an interceptor cannot retype errors
raised while iterating.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from .context import REQUEST_ID_HEADER, new_request_id, request_id_var
from .credentials import ClientCredentials
from .logging import get_logger
from .status import error_from_rpc_error

log = get_logger("modelyard.client")

DEFAULT_TIMEOUT_S = 30.0

RetryPredicate = Callable[[str], bool]


Pairs = Sequence[tuple[str, str | bytes]]


def outgoing_metadata(metadata: Pairs | None = None, extra: Pairs = ()) -> grpc.aio.Metadata:
    """``metadata`` plus ``extra`` (e.g. ``credentials.call_metadata``) plus ``x-request-id`` (the current
    request's id, or a new one) when it has none."""
    out = grpc.aio.Metadata()
    for key, value in metadata or ():
        out.add(key, value)
    for key, value in extra:
        if key not in out:
            out.add(key, value)
    if REQUEST_ID_HEADER not in out:
        out.add(REQUEST_ID_HEADER, request_id_var.get() or new_request_id())
    return out


def _with_defaults(
    details: grpc.aio.ClientCallDetails, default_timeout: float | None, extra: Pairs = ()
) -> grpc.aio.ClientCallDetails:
    timeout = details.timeout if details.timeout is not None else default_timeout
    return grpc.aio.ClientCallDetails(
        details.method,
        timeout,
        outgoing_metadata(details.metadata, extra),
        details.credentials,
        details.wait_for_ready,
    )


def method_name(details: grpc.aio.ClientCallDetails) -> str:
    """``Method`` of ``/package.Service/Method`` (``details.method`` may be bytes or str)."""
    method = details.method.decode() if isinstance(details.method, bytes) else str(details.method)
    return method.rsplit("/", 1)[-1]


class _MetadataInterceptor(
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    def __init__(self, default_timeout: float | None, extra: Pairs = ()) -> None:
        self._timeout = default_timeout
        self._extra = extra

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_defaults(details, self._timeout, self._extra), request)

    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(_with_defaults(details, self._timeout, self._extra), request_iterator)

    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(_with_defaults(details, self._timeout, self._extra), request_iterator)


class _UnaryRetryInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(
        self,
        default_timeout: float | None,
        attempts: int,
        backoff_s: float,
        max_backoff_s: float,
        retry_if: RetryPredicate | None = None,
        extra: Pairs = (),
    ) -> None:
        self._timeout = default_timeout
        self._extra = extra
        self._attempts = max(1, attempts)
        self._backoff = backoff_s
        self._max_backoff = max_backoff_s
        self._retry_if = retry_if

    async def intercept_unary_unary(self, continuation, details, request):
        details = _with_defaults(details, self._timeout, self._extra)
        attempts = self._attempts if self._retry_if is None or self._retry_if(method_name(details)) else 1
        delay = self._backoff
        loop = asyncio.get_running_loop()
        deadline = loop.time() + details.timeout if details.timeout is not None else None
        for attempt in range(1, attempts + 1):
            call_details = details
            if deadline is not None:  # the deadline covers all attempts together
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                call_details = details._replace(timeout=remaining)
            call = await continuation(call_details, request)
            try:
                await call
                return call
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == attempts:
                    return call
                log.info("rpc_retry", method=details.method, attempt=attempt, delay_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_backoff)
        return call


class _TypedErrorInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Outermost unary interceptor: a failed call raises its typed ``DomainError``, once, here."""

    async def intercept_unary_unary(self, continuation, details, request):
        call = await continuation(details, request)
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc_error(exc) from None


def channel_options(max_message_bytes: int = 16 * 1024 * 1024) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.enable_retries", 0),  # retries are done (and logged) by the interceptor
    ]


def make_channel(
    target: str,
    *,
    default_timeout_s: float | None = DEFAULT_TIMEOUT_S,
    retry_attempts: int = 5,
    retry_backoff_s: float = 0.1,
    retry_max_backoff_s: float = 2.0,
    retry_if: RetryPredicate | None = None,
    max_message_bytes: int = 16 * 1024 * 1024,
    intercept_streams: bool = True,
    typed_errors: bool = False,
    credentials: ClientCredentials | None = None,
) -> grpc.aio.Channel:
    """A grpc.aio channel to ``target`` (host:port) with the chassis' client behaviour.

    ``credentials``: the token and TLS files (see the module docstring); none: plaintext, no token.

    ``retry_if(method)`` (the bare RPC name, e.g. ``GetModel``) limits the UNAVAILABLE retries to
    calls safe to repeat; without it every unary call is retried. ``typed_errors`` makes failed
    unary calls raise ``DomainError``s. ``intercept_streams=False`` leaves streaming calls bare (no
    default deadline, request id or plaintext token added): for a hot data path whose caller passes
    them itself (``credentials.call_metadata``), and saves a task hop per message.
    """
    creds = credentials or ClientCredentials()
    extra = creds.call_metadata
    interceptors: list[Any] = []
    if typed_errors:
        interceptors.append(_TypedErrorInterceptor())
    interceptors.append(
        _UnaryRetryInterceptor(
            default_timeout_s, retry_attempts, retry_backoff_s, retry_max_backoff_s, retry_if, extra=extra
        )
    )
    if intercept_streams:
        interceptors.append(_MetadataInterceptor(default_timeout_s, extra))
    options = channel_options(max_message_bytes)
    channel_creds = channel_credentials(creds)
    if channel_creds is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(target, channel_creds, options=options, interceptors=interceptors)


def channel_credentials(credentials: ClientCredentials) -> grpc.ChannelCredentials | None:
    """TLS channel credentials (with the token as call credentials) for ``credentials``; None: plaintext."""
    if not credentials.tls:
        return None
    ca, key, chain = credentials.read_tls_files()
    ssl = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=chain)
    if not credentials.token:
        return ssl
    return grpc.composite_channel_credentials(ssl, grpc.access_token_call_credentials(credentials.token))


__all__ = [
    "make_channel",
    "channel_credentials",
    "ClientCredentials",
    "error_from_rpc_error",
    "outgoing_metadata",
    "method_name",
    "RetryPredicate",
    "DEFAULT_TIMEOUT_S",
]
