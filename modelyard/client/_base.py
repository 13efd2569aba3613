"""What every service client shares: the channel, deadlines, retries and typed errors.

Unary calls go through the chassis channel (``services.core.grpc_client.make_channel`` with
``typed_errors=True``): its interceptors add the deadline and ``x-request-id``, retry UNAVAILABLE
for calls safe to repeat (``is_safe_to_retry``) and raise the ``DomainError`` a failed status
stands for. Streaming calls go through ``_server_stream`` / ``_client_stream`` here, the one place
that does the same for streams (a server stream safe to repeat is retried only before its first
message).

Credentials (bearer token, TLS / mTLS files): given to the constructor, else from ``YARD_TOKEN`` /
``YARD_TOKEN_FILE`` / ``YARD_TLS_CA_FILE`` / ``YARD_TLS_CERT_FILE`` / ``YARD_TLS_KEY_FILE``, else the files
``yard up`` wrote under the data directory (``YARD_DATA_DIR``, default ``~/.modelyard``):
``secrets/service_token`` and ``secrets/tls/`` (``services.core.credentials``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Protocol, Self, TypeVar

import grpc

from modelyard.common.v1 import common_pb2 as jpb
from services.core.credentials import ClientCredentials
from services.core.grpc_client import DEFAULT_TIMEOUT_S, make_channel, outgoing_metadata
from services.core.logging import get_logger
from services.core.status import error_from_rpc_error

log = get_logger("modelyard.client")

TERMINAL_JOB_STATES = frozenset({jpb.JOB_STATE_SUCCEEDED, jpb.JOB_STATE_FAILED, jpb.JOB_STATE_CANCELLED})

_SAFE_PREFIXES = ("Get", "List", "Validate", "Watch")
_SAFE_METHODS = frozenset(
    {"Tokenize", "DownloadFile", "SetDeploymentMarker", "RecordEvaluationScores", "Score", "CompareEvaluations"}
)


def is_safe_to_retry(method: str) -> bool:
    """Whether repeating ``method`` (a bare RPC name) after UNAVAILABLE cannot do anything twice.

    Reads (Get*/List*/Validate*/Tokenize/DownloadFile/Score/CompareEvaluations), watches before their first
    message, SetDeploymentMarker (it sets a flag to a value) and RecordEvaluationScores (it replaces an
    evaluation's scores) are; Create/Import/Upload/Delete/Cancel/Deploy
    and generation (Chat/Complete/Embed) are not.
    """
    return method.startswith(_SAFE_PREFIXES) or method in _SAFE_METHODS


def resolve_credentials(
    credentials: ClientCredentials | None = None,
    *,
    token: str | None = None,
    ca_file: str | Path | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
) -> ClientCredentials:
    """``credentials`` when given; else the environment's / data directory's (``ClientCredentials.
    from_environment``) with each of ``token``, ``ca_file``, ``cert_file``, ``key_file`` that is given
    in its place (giving any TLS file replaces all three)."""
    if credentials is not None:
        return credentials
    base = ClientCredentials.from_environment()
    tls_given = any(value is not None for value in (ca_file, cert_file, key_file))

    def path(value: str | Path | None) -> Path | None:
        return Path(value).expanduser() if value else None

    return ClientCredentials(
        token=base.token if token is None else token,
        ca_file=path(ca_file) if tls_given else base.ca_file,
        cert_file=path(cert_file) if tls_given else base.cert_file,
        key_file=path(key_file) if tls_given else base.key_file,
    )


class ServiceClient:
    """Base of the service clients: one channel, closed by ``close()`` or ``async with``.

    ``timeout`` is the deadline of each unary call (override per call with ``timeout=``);
    ``stream_timeout`` that of streams (default none: a watch lasts as long as its job).
    ``token`` / ``ca_file`` / ``cert_file`` / ``key_file`` (or one ``credentials``) authenticate the
    client; what is not given comes from the environment or the data directory (module docstring).
    """

    _stub_class: ClassVar[Any]  # the generated XxxServiceStub class

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        stream_timeout: float | None = None,
        retry_attempts: int = 5,
        retry_backoff_s: float = 0.1,
        retry_max_backoff_s: float = 2.0,
        max_message_bytes: int = 16 * 1024 * 1024,
        token: str | None = None,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        credentials: ClientCredentials | None = None,
    ) -> None:
        self.target = target
        self.credentials = resolve_credentials(
            credentials, token=token, ca_file=ca_file, cert_file=cert_file, key_file=key_file
        )
        self._call_metadata = self.credentials.call_metadata
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self._attempts = max(1, retry_attempts)
        self._backoff = retry_backoff_s
        self._max_backoff = retry_max_backoff_s
        self._channel = make_channel(
            target,
            default_timeout_s=timeout,
            retry_attempts=retry_attempts,
            retry_backoff_s=retry_backoff_s,
            retry_max_backoff_s=retry_max_backoff_s,
            retry_if=is_safe_to_retry,
            max_message_bytes=max_message_bytes,
            intercept_streams=False,
            typed_errors=True,
            credentials=self.credentials,
        )
        self._stub = type(self)._stub_class(self._channel)

    async def close(self) -> None:
        """Close the channel (calls in flight are cancelled)."""
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"

    async def _unary(self, method: str, request: Any, timeout: float | None) -> Any:
        """Call unary ``method``; the channel's interceptors do deadline, retry and typed errors."""
        return await getattr(self._stub, method)(request, timeout=timeout)

    async def _server_stream(self, method: str, request: Any, timeout: float | None) -> AsyncIterator[Any]:
        """Messages of server-streaming ``method``; failures raise ``DomainError``s."""
        retry = is_safe_to_retry(method)
        delay = self._backoff
        for attempt in range(1, self._attempts + 1):
            call = getattr(self._stub, method)(
                request, timeout=self._stream_deadline(timeout), metadata=outgoing_metadata(extra=self._call_metadata)
            )
            received = False
            try:
                async for message in call:
                    received = True
                    yield message
                return
            except grpc.aio.AioRpcError as exc:
                if not retry or received or attempt == self._attempts or exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise error_from_rpc_error(exc) from None
                log.info("rpc_retry", method=method, attempt=attempt, delay_s=delay)
            finally:
                call.cancel()  # a consumer that stops early ends the call
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_backoff)

    async def _client_stream(self, method: str, requests: AsyncIterable[Any], timeout: float | None) -> Any:
        """The reply of client-streaming ``method`` (never retried: the stream cannot be replayed)."""
        try:
            return await getattr(self._stub, method)(
                requests,
                timeout=timeout if timeout is not None else self.timeout,
                metadata=outgoing_metadata(extra=self._call_metadata),
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc_error(exc) from None

    def _stream_deadline(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self.stream_timeout


async def follow_pages(fetch: Callable[[str], Awaitable[Any]], field: str, limit: int = 0) -> AsyncIterator[Any]:
    """Every item of ``field`` over the pages ``fetch(page_token)`` returns (at most ``limit``, 0: all)."""
    token, count = "", 0
    while True:
        page = await fetch(token)
        for item in getattr(page, field):
            yield item
            count += 1
            if limit and count >= limit:
                return
        token = page.next_page_token
        if not token:
            return


class _Job(Protocol):
    @property
    def state(self) -> Any: ...


J = TypeVar("J", bound=_Job)
REWATCH_BACKOFF_S = 0.5  # a watch that ended with nothing new before its job did (a server draining)


async def follow_job(
    watch: Callable[[int], AsyncIterator[jpb.JobEvent]],
    get: Callable[[], Awaitable[J]],
    on_event: Callable[[jpb.JobEvent], None] | None = None,
) -> J:
    """Watch a job until it is terminal (re-watching after the last event seen); the finished job."""
    last = 0
    while True:
        seen = last
        async for event in watch(last):
            last = event.sequence
            if on_event is not None:
                on_event(event)
        job = await get()
        if job.state in TERMINAL_JOB_STATES:
            return job
        if last == seen:
            await asyncio.sleep(REWATCH_BACKOFF_S)
