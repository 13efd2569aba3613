"""Server interceptors of the chassis, outermost first:

- ``RequestIdInterceptor``: binds ``request_id`` (from ``x-request-id`` metadata, or a new one)
  and ``rpc`` into the contextvars that structlog and outgoing clients read; echoes the id in the
  initial metadata.
- ``AccessLogInterceptor``: one ``rpc_finished`` log line per call with code and duration, and
  the Prometheus metrics (handled total, latency histogram, in-flight gauge).
- ``ErrorInterceptor``: a raised ``DomainError`` becomes its status code with ``ErrorInfo`` and
  ``BadRequest`` details; any other exception is logged with its traceback and answered as a
  bare INTERNAL that leaks nothing but the request id.

The server installs them as one ``ChainInterceptor``, so a stream is wrapped once, not three times.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Callable

import grpc
import structlog
from prometheus_client import Counter, Gauge, Histogram

from .context import REQUEST_ID_HEADER, new_request_id, request_id_var
from .errors import DomainError
from .logging import get_logger
from .status import STATUS_DETAILS_KEY, to_status_proto

log = get_logger("modelyard.rpc")

RPC_HANDLED = Counter("grpc_server_handled_total", "RPCs completed", ["service", "method", "code"])
RPC_LATENCY = Histogram(
    "grpc_server_handling_seconds",
    "RPC handling time (streams: until the last message)",
    ["service", "method"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
RPC_IN_FLIGHT = Gauge("grpc_server_in_flight", "RPCs being handled", ["service"])


def _split(method: str) -> tuple[str, str]:
    _, _, rest = method.partition("/")
    service, _, name = rest.partition("/")
    return service, name


class _WrappingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every behaviour (unary or streaming) of a handler in ``self.around``."""

    def around(self, details: grpc.HandlerCallDetails, context: grpc.aio.ServicerContext):
        raise NotImplementedError

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


class ChainInterceptor(_WrappingInterceptor):
    """The ``around`` of several interceptors (outermost first) as one interceptor: a stream then
    passes through one wrapping generator instead of one per interceptor (every message of a token
    stream pays for each layer)."""

    def __init__(self, *parts: _WrappingInterceptor) -> None:
        self._parts = parts

    @contextlib.asynccontextmanager
    async def around(self, details, context):
        async with contextlib.AsyncExitStack() as stack:
            for part in self._parts:
                await stack.enter_async_context(part.around(details, context))
            yield


class RequestIdInterceptor(_WrappingInterceptor):
    @contextlib.asynccontextmanager
    async def around(self, details, context):
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
        except Exception:  # initial metadata already sent: nothing to echo
            pass
        try:
            yield
        finally:
            # A stream cancelled by its client is finalised later, in another context: the tokens
            # no longer apply there, and that context is discarded anyway.
            with contextlib.suppress(ValueError):
                structlog.contextvars.reset_contextvars(**bound)
            with contextlib.suppress(ValueError):
                request_id_var.reset(token)


class AccessLogInterceptor(_WrappingInterceptor):
    def __init__(self, service_label: str) -> None:
        self._service = service_label

    @contextlib.asynccontextmanager
    async def around(self, details, context):
        service, method = _split(details.method)
        if service.startswith("grpc."):  # health / reflection: metrics only, no log line
            service_log = False
        else:
            service_log = True
        # Read the peer now: a cancelled stream's generator may be finalised after its call is freed.
        peer = _peer(context)
        gauge = RPC_IN_FLIGHT.labels(self._service)
        gauge.inc()
        start = time.perf_counter()
        code = "OK"
        try:
            yield
        except DomainError as err:
            code = err.code.name
            raise
        except grpc.aio.AbortError:
            c = context.code()
            code = c.name if isinstance(c, grpc.StatusCode) else str(c or "UNKNOWN")
            raise
        except BaseException as exc:  # noqa: BLE001 - record, then let the error interceptor decide
            code = "CANCELLED" if _is_cancel(exc) else "INTERNAL"
            raise
        finally:
            elapsed = time.perf_counter() - start
            gauge.dec()
            RPC_HANDLED.labels(service, method, code).inc()
            RPC_LATENCY.labels(service, method).observe(elapsed)
            if service_log:
                log.info("rpc_finished", code=code, ms=round(elapsed * 1000, 2), peer=peer)


class ErrorInterceptor(_WrappingInterceptor):
    def __init__(self, domain: str) -> None:
        self._domain = domain

    @contextlib.asynccontextmanager
    async def around(self, details, context):
        try:
            yield
        except DomainError as err:
            if err.domain == "modelyard":
                err.domain = self._domain
            status = to_status_proto(err)
            await context.abort(
                err.code, err.message, trailing_metadata=((STATUS_DETAILS_KEY, status.SerializeToString()),)
            )
        except grpc.aio.AbortError:
            raise
        except BaseException as exc:
            if _is_cancel(exc):
                raise
            log.exception("rpc_internal_error")
            rid = request_id_var.get()
            internal = DomainError(f"internal error (request id {rid})", reason="INTERNAL", domain=self._domain)
            status = to_status_proto(internal)
            await context.abort(
                grpc.StatusCode.INTERNAL,
                internal.message,
                trailing_metadata=((STATUS_DETAILS_KEY, status.SerializeToString()),),
            )


def _is_cancel(exc: BaseException) -> bool:
    import asyncio

    return isinstance(exc, (asyncio.CancelledError, GeneratorExit))


def _peer(context) -> str | None:
    with contextlib.suppress(Exception):
        return context.peer()
    return None
