"""Server interceptors of the chassis, outermost first:

- ``RequestIdInterceptor``: binds ``request_id`` (from ``x-request-id`` metadata, or a new one)
  and ``rpc`` into the contextvars that structlog and outgoing clients read; echoes the id in the
  initial metadata.
- ``AccessLogInterceptor``: one ``rpc_finished`` log line per call with code and duration, and
  the Prometheus metrics (handled total, latency histogram, in-flight gauge).
- ``ErrorInterceptor``: a raised ``DomainError`` becomes its status code with ``ErrorInfo`` and
  ``BadRequest`` details; any other exception is logged with its traceback and answered as a
  bare INTERNAL that leaks nothing but the request id.
- ``AuthInterceptor`` (when the service has a token): every call but those of the health and
  reflection services must carry ``authorization: Bearer <token>``; a missing or wrong token is
  UNAUTHENTICATED (``ErrorInfo`` reason ``TOKEN_MISSING`` / ``TOKEN_INVALID``), compared in
  constant time, counted in ``grpc_server_auth_failures_total``.

The server installs them as one ``ChainInterceptor``, so a stream is wrapped once, not three times.
"""

from __future__ import annotations

import contextlib
import hmac
import inspect
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
from prometheus_client import Counter, Gauge, Histogram

from .context import REQUEST_ID_HEADER, new_request_id, request_id_var
from .credentials import AUTHORIZATION_HEADER
from .errors import DomainError, Unauthenticated
from .logging import get_logger
from .status import STATUS_DETAILS_KEY, to_status_proto
from .suppressed import record_suppressed

log = get_logger("modelyard.rpc")

RPC_HANDLED = Counter("grpc_server_handled_total", "RPCs completed", ["service", "method", "code"])
RPC_LATENCY = Histogram(
    "grpc_server_handling_seconds",
    "RPC handling time (streams: until the last message)",
    ["service", "method"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
RPC_IN_FLIGHT = Gauge("grpc_server_in_flight", "RPCs being handled", ["service"])
AUTH_FAILURES = Counter(
    "grpc_server_auth_failures_total", "Calls refused for a missing or wrong bearer token", ["service", "reason"]
)
# Services every caller may use without a token: probes (grpc.health.v1) and reflection.
OPEN_SERVICES = frozenset(
    {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
)


def _split(method: str) -> tuple[str, str]:
    _, _, rest = method.partition("/")
    service, _, name = rest.partition("/")
    return service, name


class _WrappingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every behaviour (unary or streaming) of a handler in ``self.around``: ``enter`` before the
    handler, ``exit`` after it (with the exception it raised, if any). An ``exit`` that raises replaces
    that exception for the layers outside it; one that returns lets it pass unchanged."""

    parts: tuple[_WrappingInterceptor, ...]

    def __init__(self) -> None:
        self.parts = (self,)

    async def enter(self, details: grpc.HandlerCallDetails, context: grpc.aio.ServicerContext) -> Any:
        """Before the handler; what it returns is given to ``exit``."""
        return None

    async def exit(
        self, state: Any, details: grpc.HandlerCallDetails, context: grpc.aio.ServicerContext, exc: BaseException | None
    ) -> None:
        """After the handler (also when ``enter`` of a layer inside this one failed)."""

    def around(self, details: grpc.HandlerCallDetails, context: grpc.aio.ServicerContext) -> _Around:
        return _Around(self.parts, details, context)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        around = self.around
        details = handler_call_details

        def wrap_unary(fn: Callable):
            async def behavior(request_or_iterator, context):
                async with around(details, context):
                    return await fn(request_or_iterator, context)

            return behavior

        def wrap_stream(fn: Callable):
            async def behavior(request_or_iterator, context) -> AsyncIterator:
                async with around(details, context):
                    result = fn(request_or_iterator, context)
                    if inspect.isasyncgen(result):
                        async for item in result:
                            yield item
                    else:  # the servicer used context.write()
                        await result

            return behavior

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap_unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap_stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                wrap_unary(handler.stream_unary), handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                wrap_stream(handler.stream_stream), handler.request_deserializer, handler.response_serializer
            )
        return handler


class _Around:
    """The layers of one call as one async context manager (outermost first): every ``enter`` in
    order, then every ``exit`` in reverse, each seeing the exception of the layers inside it — what
    nested ``async with`` blocks would do, without a generator and an exit stack per layer and call."""

    __slots__ = ("_parts", "_details", "_context", "_states")

    def __init__(self, parts: tuple[_WrappingInterceptor, ...], details, context) -> None:
        self._parts = parts
        self._details = details
        self._context = context
        self._states: list[Any] = []

    async def __aenter__(self) -> None:
        states = self._states
        for part in self._parts:
            try:
                states.append(await part.enter(self._details, self._context))
            except BaseException as exc:  # noqa: BLE001 - the layers entered see it, then it goes on
                final = await self._unwind(exc)
                if final is exc or final is None:
                    raise
                raise final  # noqa: B904 - its __context__ is the exception it replaces

    async def __aexit__(self, typ, exc: BaseException | None, tb) -> bool:
        final = await self._unwind(exc)
        if final is not None and final is not exc:
            raise final
        return False

    async def _unwind(self, exc: BaseException | None) -> BaseException | None:
        """Exit the entered layers, innermost first; the exception that comes out of the outermost."""
        states = self._states
        for i in range(len(states) - 1, -1, -1):
            try:
                await self._parts[i].exit(states[i], self._details, self._context, exc)
            except BaseException as new:  # noqa: BLE001 - replaces the exception for the outer layers
                if new is not exc and new.__context__ is None:
                    new.__context__ = exc
                exc = new
        states.clear()
        return exc


class ChainInterceptor(_WrappingInterceptor):
    """The ``around`` of several interceptors (outermost first) as one interceptor: a stream then
    passes through one wrapping generator instead of one per interceptor (every message of a token
    stream pays for each layer)."""

    def __init__(self, *parts: _WrappingInterceptor) -> None:
        self.parts = tuple(p for part in parts for p in part.parts)


class RequestIdInterceptor(_WrappingInterceptor):
    async def enter(self, details, context):
        request_id = None
        for key, value in details.invocation_metadata or ():
            if key == REQUEST_ID_HEADER and value:
                request_id = str(value)[:128]
                break
        request_id = request_id or new_request_id()
        token = request_id_var.set(request_id)
        bound = structlog.contextvars.bind_contextvars(request_id=request_id, rpc=details.method)
        try:
            await context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))
        except Exception as exc:  # noqa: BLE001 - the echo is best effort, the call goes on without it
            # A call whose client already went away cannot send anything: expected, logged at debug.
            gone = _call_finished(context)
            record_suppressed(log, "rpc_request_id_echo", exc, level="debug" if gone else "warning", call_finished=gone)
        return token, bound

    async def exit(self, state, details, context, exc):
        token, bound = state
        # A stream cancelled by its client is finalised later, in another context: the tokens
        # no longer apply there, and that context is discarded anyway.
        with contextlib.suppress(ValueError):
            structlog.contextvars.reset_contextvars(**bound)
        with contextlib.suppress(ValueError):
            request_id_var.reset(token)


@dataclass(eq=False)
class _MethodMetrics:
    """The metric children of one method (looked up once: ``labels`` takes a lock and builds a key)."""

    service: str
    method: str
    log: bool  # health / reflection: metrics only, no log line
    latency: Any
    handled: dict[str, Any] = field(default_factory=dict)  # code -> counter child

    def handled_counter(self, code: str) -> Any:
        child = self.handled.get(code)
        if child is None:
            child = self.handled[code] = RPC_HANDLED.labels(self.service, self.method, code)
        return child


class AccessLogInterceptor(_WrappingInterceptor):
    def __init__(self, service_label: str) -> None:
        super().__init__()
        self._service = service_label
        self._gauge = RPC_IN_FLIGHT.labels(service_label)
        self._methods: dict[str, _MethodMetrics] = {}

    def _metrics(self, full_method: str) -> _MethodMetrics:
        metrics = self._methods.get(full_method)
        if metrics is None:
            service, method = _split(full_method)
            metrics = _MethodMetrics(
                service, method, not service.startswith("grpc."), RPC_LATENCY.labels(service, method)
            )
            if len(self._methods) < 1024:  # method names come from the registered services, but be safe
                self._methods[full_method] = metrics
        return metrics

    async def enter(self, details, context):
        # Read the peer now: a cancelled stream's generator may be finalised after its call is freed.
        peer = _peer(context)
        self._gauge.inc()
        return self._metrics(details.method), peer, time.perf_counter()

    async def exit(self, state, details, context, exc):
        metrics, peer, start = state
        if exc is None:
            code = "OK"
        elif isinstance(exc, DomainError):
            code = exc.code.name
        elif isinstance(exc, grpc.aio.AbortError):
            c = context.code()
            code = c.name if isinstance(c, grpc.StatusCode) else str(c or "UNKNOWN")
        else:  # record, then let the error interceptor decide
            code = "CANCELLED" if _is_cancel(exc) else "INTERNAL"
        elapsed = time.perf_counter() - start
        self._gauge.dec()
        metrics.handled_counter(code).inc()
        metrics.latency.observe(elapsed)
        if metrics.log:
            log.info("rpc_finished", code=code, ms=round(elapsed * 1000, 2), peer=peer)


class ErrorInterceptor(_WrappingInterceptor):
    def __init__(self, domain: str) -> None:
        super().__init__()
        self._domain = domain

    async def exit(self, state, details, context, exc):
        if exc is None:
            return
        if isinstance(exc, DomainError):
            if exc.domain == "modelyard":
                exc.domain = self._domain
            status = to_status_proto(exc)
            await context.abort(
                exc.code, exc.message, trailing_metadata=((STATUS_DETAILS_KEY, status.SerializeToString()),)
            )
            return  # not reached: abort raises AbortError
        if isinstance(exc, grpc.aio.AbortError) or _is_cancel(exc):
            return
        log.error("rpc_internal_error", exc_info=exc)
        rid = request_id_var.get()
        internal = DomainError(f"internal error (request id {rid})", reason="INTERNAL", domain=self._domain)
        status = to_status_proto(internal)
        await context.abort(
            grpc.StatusCode.INTERNAL,
            internal.message,
            trailing_metadata=((STATUS_DETAILS_KEY, status.SerializeToString()),),
        )


class AuthInterceptor(_WrappingInterceptor):
    """Requires ``authorization: Bearer <token>`` with one of ``tokens`` on every call of a service that
    is not in ``OPEN_SERVICES``. Innermost of the chain: the error interceptor answers its
    ``Unauthenticated`` (with ErrorInfo) and the access log records the code."""

    def __init__(self, tokens: Sequence[str], service_label: str) -> None:
        super().__init__()
        if not tokens:
            raise ValueError("AuthInterceptor needs at least one token")
        self._tokens = [token.encode() for token in tokens]
        self._service = service_label
        self._open: dict[str, bool] = {}  # method -> of an open service

    def check(self, metadata) -> None:
        presented = None
        for key, value in metadata or ():
            if key == AUTHORIZATION_HEADER:
                presented = value.encode() if isinstance(value, str) else bytes(value)
                break
        if presented is None:
            AUTH_FAILURES.labels(self._service, "TOKEN_MISSING").inc()
            raise Unauthenticated(
                "this service requires a bearer token (metadata 'authorization: Bearer <token>')",
                reason="TOKEN_MISSING",
            )
        scheme, _, token = presented.partition(b" ")
        ok = False
        if scheme.lower() == b"bearer":
            token = token.strip()
            for accepted in self._tokens:  # every token compared, in constant time each
                ok |= hmac.compare_digest(token, accepted)
        if not ok:
            AUTH_FAILURES.labels(self._service, "TOKEN_INVALID").inc()
            raise Unauthenticated("the bearer token is not valid for this service", reason="TOKEN_INVALID")

    async def enter(self, details, context):
        method = details.method
        is_open = self._open.get(method)
        if is_open is None:
            is_open = _split(method)[0] in OPEN_SERVICES
            if len(self._open) < 1024:
                self._open[method] = is_open
        if not is_open:
            self.check(details.invocation_metadata)


def _call_finished(context) -> bool:
    try:
        return bool(context.done() or context.cancelled())
    except Exception:  # noqa: BLE001 - a freed call answers nothing: it is finished
        return True


def _is_cancel(exc: BaseException) -> bool:
    import asyncio

    return isinstance(exc, (asyncio.CancelledError, GeneratorExit))


def _peer(context) -> str | None:
    try:
        return context.peer()
    except Exception as exc:  # noqa: BLE001 - the log line goes out without the peer
        record_suppressed(log, "rpc_peer", exc, level="debug")
        return None
