"""What every endpoint's serving shares: the call context, replica choice with retry before the
first chunk, quota reserve/settle, mid-stream error events, and the stream loop (output content
filter and finish handling) written once.

Everything that can fail before the first chunk (auth, model, quota, content filter, routing,
connect, first-token timeout) fails with its own HTTP status; a request that fails before its
first chunk with UNAVAILABLE is retried on another replica (the failed one is ejected, or only the
failed deployment when the replica itself answered). After the first chunk, a stream forwards each
chunk as it arrives and an error becomes one final ``data: {"error": ...}`` event followed by
``data: [DONE]``. Usage is settled from the engine's counts (estimated only when the stream was cut
before the engine reported them).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
from pydantic import BaseModel

from modelyard.inference.v1 import inference_pb2 as pb
from services.core.context import REQUEST_ID_HEADER
from services.core.errors import Cancelled, DeadlineExceeded, DomainError, Internal, Unavailable
from services.core.grpc_client import error_from_rpc_error
from services.core.logging import get_logger

from .. import protocol as p
from ..auth.keys import ApiKey
from ..auth.projects import ALLOW_ALL, ModelAccess
from ..content_filter import ContentFilter, OutputFilter
from ..errors import error_body
from ..limits import ContextLengths, engine_context_error, prompt_fits
from ..metrics import STREAM_ERRORS, TOKENS, TTFT, labelled
from ..quota import QuotaLimiter, Reservation, UsageRecorder, estimate_tokens
from ..routing import Replica, Router, Target
from ..settings import GatewaySettings

log = get_logger("modelyard.gateway.serving")

DONE = b"data: [DONE]\n\n"
FINISH: dict[int, p.FinishReason] = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
    pb.FINISH_REASON_CONTENT_FILTER: "content_filter",
}

_ttft, _tokens = labelled(TTFT), labelled(TOKENS)

Chunk = TypeVar("Chunk", bound=BaseModel)
# A choice delta (ChatChoiceDelta or CompleteChoiceDelta), its text after the content filter and its
# finish reason -> the choice's JSON bytes.
Render = Callable[[Any, str, "p.FinishReason | None"], bytes]


class Clock(Protocol):
    """The watchdog's time and timers: the running loop, or a test's manual clock."""

    def time(self) -> float: ...
    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> asyncio.TimerHandle: ...


@dataclass
class CallContext:
    """One OpenAI request on its way through the gateway."""

    request_id: str
    key: ApiKey
    model: str
    endpoint: str
    started: float
    prompt_estimate: int = 0
    reservation: Reservation | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_reported: bool = False
    # fallback count when the engine's usage never arrived (a cut stream): a delta may carry several
    # tokens (the inference service merges the ready ones), so at least ~4 characters a token
    content_deltas: int = 0
    content_chars: int = 0
    access: ModelAccess = ALLOW_ALL  # the models the key's project may use

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((REQUEST_ID_HEADER, self.request_id),)

    @property
    def headers(self) -> dict[str, str]:
        """The rate-limit headers of the response (none before the quota was reserved)."""
        return self.reservation.headers if self.reservation is not None else {}

    def count_delta(self, text: str) -> None:
        if text:
            self.content_deltas += 1
            self.content_chars += len(text)

    def add_usage(self, usage: pb.Usage) -> None:
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens
        self.usage_reported = True


class Upstream:
    """A started Chat/Complete stream on one replica; its first chunk has been read already.

    A read that waits ``idle_s`` fails with IDLE_CHUNK_TIMEOUT. One watchdog timer per stream
    enforces it rather than an ``asyncio.timeout`` per read (a timer armed and cancelled for every
    message): when it fires it re-arms itself for the read pending now, and cancels that read only
    when it is the one the timer was armed for. ``clock`` is the running loop unless a test gives
    its own.
    """

    def __init__(
        self,
        router: Router,
        replica: Replica,
        target: Target,
        call: Any,
        first: Any,
        idle_s: float,
        clock: Clock | None = None,
    ) -> None:
        self._router = router
        self.replica = replica
        self._target = target
        self._call = call
        self._pending = [first]
        self._idle = idle_s
        self._closed = False
        self._clock: Clock = clock or asyncio.get_running_loop()
        self._reads = 0  # reads started
        self._reader: asyncio.Task | None = None  # the task of the read in progress
        self._read_at = 0.0  # when (loop time) that read started
        self._watchdog: asyncio.TimerHandle | None = None
        self._expired = False

    def __aiter__(self) -> Upstream:
        return self

    async def __anext__(self) -> Any:
        if self._pending:
            return self._pending.pop()
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        self._reads += 1
        self._reader, self._read_at = task, self._clock.time()
        if self._watchdog is None:
            self._watchdog = self._clock.call_at(self._read_at + self._idle, self._check_idle, self._reads)
        try:
            msg = await self._call.read()
        except asyncio.CancelledError:
            if self._expired and task.uncancel() <= cancelling:
                raise DeadlineExceeded(
                    f"the engine sent nothing for {self._idle}s (idle_chunk_s)", reason="IDLE_CHUNK_TIMEOUT"
                ) from None
            raise
        except grpc.aio.AioRpcError as exc:
            err = error_from_rpc_error(exc)
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self._router.unavailable(self.replica, self._target, err.reason, f"stream failed: {err.message}")
            raise err from None
        finally:
            self._reader = None
        if msg is grpc.aio.EOF:
            raise StopAsyncIteration
        return msg

    def _check_idle(self, armed_for: int) -> None:
        """The watchdog: cancel the read it was armed for if that one is still waiting, else watch
        the read in progress now (the next read arms it when none is)."""
        self._watchdog = None
        if self._reader is None:
            return
        if self._reads == armed_for:
            self._expired = True
            self._reader.cancel()
        else:
            self._watchdog = self._clock.call_at(self._read_at + self._idle, self._check_idle, self._reads)

    def close(self) -> None:
        """Cancel the call if it is still running (the inference service aborts the engine request)."""
        if self._closed:
            return
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if not self._call.done():
            self._call.cancel()
        self.replica.release()


def sampling_params(
    req: p.ChatCompletionRequest | p.CompletionRequest, *, logprobs: bool, top_logprobs: int | None
) -> pb.SamplingParams:
    """The engine's sampling parameters of a chat or completion request (unset fields stay unset)."""
    sp = pb.SamplingParams(stop=req.stop_list(), logprobs=logprobs, n=req.n, ignore_eos=req.ignore_eos)
    if req.max_new_tokens is not None:
        sp.max_tokens = req.max_new_tokens
    for name in ("temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value is not None:
            setattr(sp, name, value)
    if top_logprobs is not None:
        sp.top_logprobs = top_logprobs
    return sp


class OpenAIServing:
    """The request path every endpoint's serving shares; one instance per endpoint family and app."""

    def __init__(
        self,
        settings: GatewaySettings,
        router: Router,
        quota: QuotaLimiter,
        usage: UsageRecorder,
        content_filter: ContentFilter,
    ) -> None:
        self.settings = settings
        self.router = router
        self.quota = quota
        self.usage = usage
        self.filter = content_filter
        self.timeouts = settings.timeouts
        self.context_lengths = ContextLengths()

    # ------------------------------------------------------------ admission and billing

    async def admit(self, ctx: CallContext, prompt_chars: int, max_tokens: int | None, n: int) -> None:
        """Model allowed to the key's project and known (both 404 model_not_found otherwise, the
        same answer), then quota reserved (prompt estimate + max_tokens per choice)."""
        ctx.access.check(ctx.model)
        await self.router.resolve(ctx.model)
        ctx.prompt_estimate = estimate_tokens(prompt_chars)
        budget = max_tokens if max_tokens is not None else self.settings.quota.default_max_tokens_estimate
        ctx.reservation = await self.quota.acquire(ctx.key, ctx.prompt_estimate + budget * n)

    def settle(self, ctx: CallContext) -> None:
        """Bill the engine's usage (or the estimate of a cut stream) once, by request id."""
        if not ctx.usage_reported and ctx.content_deltas:
            ctx.prompt_tokens = ctx.prompt_estimate
            ctx.completion_tokens = max(ctx.content_deltas, estimate_tokens(ctx.content_chars))
            log.info("usage_estimated", completion_tokens=ctx.completion_tokens)
        total = ctx.prompt_tokens + ctx.completion_tokens
        if ctx.reservation is not None:
            ctx.reservation.settle(total)
        if total:
            _tokens(ctx.model, "in").inc(ctx.prompt_tokens)
            _tokens(ctx.model, "out").inc(ctx.completion_tokens)
            self.usage.record(
                ctx.request_id,
                ctx.key.id,
                ctx.model,
                ctx.endpoint,
                ctx.prompt_tokens,
                ctx.completion_tokens,
                ctx.access.project,
            )

    async def check_context(
        self,
        ctx: CallContext,
        max_tokens: int | None,
        param: str,
        bounds: list[int],
        build: Callable[[int, Target], pb.TokenizeRequest],
        exact: Callable[[int], int | None] = lambda i: None,
    ) -> None:
        """400 naming ``param`` when a prompt + ``max_tokens`` would pass the deployment's context length
        (``limits.prompt_fits``); ``build(i, target)`` is the Tokenize request of prompt i, ``exact(i)``
        its token count when the gateway knows it already (token-id prompts)."""

        async def tokenize(i: int) -> tuple[int, int]:
            reply = await self.unary(ctx, "Tokenize", lambda t: build(i, t))
            known = exact(i)
            return (len(reply.tokens) if known is None else known), reply.max_model_len

        await prompt_fits(self.context_lengths, ctx.model, max_tokens, param, bounds, tokenize)

    @staticmethod
    def context_error(err: DomainError, max_tokens_param: str | None, prompt_param: str) -> DomainError:
        return engine_context_error(err, max_tokens_param, prompt_param)

    # ------------------------------------------------------------ calls on a replica

    async def open_stream(self, ctx: CallContext, method: str, build: Callable[[Target], Any]) -> Upstream:
        """Start ``method`` (Chat/Complete) on the best replica and read its first chunk; a replica
        that is unavailable before the first chunk is ejected and the next one is tried."""
        tried: set[str] = set()
        while True:
            replica, target = self.router.pick(ctx.model, exclude=tried)
            tried.add(replica.addr)
            replica.acquire()
            call = None
            try:
                await self.router.connect(replica)
                call = getattr(replica.stub, method)(
                    build(target), timeout=self.timeouts.request_s, metadata=ctx.metadata + replica.call_metadata
                )
                async with asyncio.timeout(self.timeouts.first_token_s):
                    first = await call.read()
            except TimeoutError:
                if call is not None:
                    call.cancel()
                replica.release()
                raise DeadlineExceeded(
                    f"no first token from the engine within {self.timeouts.first_token_s}s (first_token_s)",
                    reason="FIRST_TOKEN_TIMEOUT",
                ) from None
            except (grpc.aio.AioRpcError, Unavailable) as exc:
                replica.release()
                err = error_from_rpc_error(exc) if isinstance(exc, grpc.aio.AioRpcError) else exc
                if isinstance(exc, grpc.aio.AioRpcError) and exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise err from None
                self.router.unavailable(replica, target, err.reason, err.message or "unavailable")
                log.info("request_retried", replica=replica.addr, error=err.message)
                continue
            except BaseException:
                if call is not None:
                    call.cancel()
                replica.release()
                raise
            if first is grpc.aio.EOF:
                replica.release()
                raise Internal("the engine ended the stream without any output", reason="EMPTY_STREAM")
            _ttft(ctx.model).observe(time.perf_counter() - ctx.started)
            return Upstream(self.router, replica, target, call, first, self.timeouts.idle_chunk_s)

    async def unary(self, ctx: CallContext, method: str, build: Callable[[Target], Any]) -> Any:
        """A unary call with the same replica choice, ejection and retry as streams."""
        tried: set[str] = set()
        while True:
            replica, target = self.router.pick(ctx.model, exclude=tried)
            tried.add(replica.addr)
            replica.acquire()
            try:
                await self.router.connect(replica)
                return await getattr(replica.stub, method)(
                    build(target), timeout=self.timeouts.unary_s, metadata=ctx.metadata
                )
            except grpc.aio.AioRpcError as exc:
                err = error_from_rpc_error(exc)
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise err from None
                self.router.unavailable(replica, target, err.reason, err.message or "unavailable")
            except Unavailable as exc:
                self.router.eject(replica, exc.message)
            finally:
                replica.release()

    # ------------------------------------------------------------ streams

    async def choice_events(
        self,
        ctx: CallContext,
        streams: Iterable[tuple[Upstream, Render]],
        n: int,
        envelope: p.ChunkEnvelope,
        text_of: Callable[[Any], str],
        usage_chunk: Callable[[], BaseModel] | None,
    ) -> AsyncGenerator[bytes, None]:
        """The SSE events of one or more upstreams in turn, then the usage chunk (when asked), then
        ``[DONE]``: the stream loop of every generation endpoint.

        Each message's choice deltas pass their choice's output content filter (a choice the filter
        cut finishes with ``content_filter`` and sends nothing more), are counted for the estimate
        of a cut stream, and are rendered by the endpoint (``render(delta, text, finish)``, choice
        JSON bytes) into one event per message, joined into the pre-serialized ``envelope``. The
        engine's usage is added as it comes. Once every choice of an upstream is finished and the
        filter cut one, that upstream is stopped (it is closed, so the engine aborts).
        """
        for upstream, render in streams:
            filters: dict[int, OutputFilter] = {}
            done: set[int] = set()
            new_filter = self.filter.output
            async for msg in upstream:
                choices: list[bytes] = []
                for d in msg.choices:
                    index = d.index
                    if index in done:
                        continue
                    out_filter = filters.get(index) or filters.setdefault(index, new_filter())
                    raw = text_of(d)
                    text = out_filter.feed(raw)
                    ctx.count_delta(raw)
                    finish = "content_filter" if out_filter.blocked else FINISH.get(d.finish_reason)
                    if finish:
                        done.add(index)
                    choices.append(render(d, text, finish))
                if choices:
                    yield envelope.event(choices)
                if msg.HasField("usage"):
                    ctx.add_usage(msg.usage)
                if len(done) == n and any(f.blocked for f in filters.values()):
                    break  # every choice is finished and the filter cut one: stop the engine
            upstream.close()
        if usage_chunk is not None:
            yield b"data: " + usage_chunk().model_dump_json().encode() + b"\n\n"
        yield DONE

    async def sse(
        self, ctx: CallContext, events: AsyncIterator[bytes], upstreams: Sequence[Upstream]
    ) -> AsyncGenerator[bytes, None]:
        """Forward events; an error becomes an error event and [DONE]. Always closes the upstreams
        (a client disconnect cancels this generator and so the gRPC calls) and settles usage."""
        try:
            async for event in events:
                yield event
        except DomainError as err:
            STREAM_ERRORS.labels(ctx.model, err.reason).inc()
            log.warning("stream_failed", reason=err.reason, error=err.message)
            yield b"data: " + json.dumps(error_body(err)[1]).encode() + b"\n\n"
            yield DONE
        finally:
            self.close(ctx, upstreams)

    def close(self, ctx: CallContext, upstreams: Sequence[Upstream]) -> None:
        """Stop whatever still runs upstream, then bill the request."""
        for upstream in upstreams:
            upstream.close()
        self.settle(ctx)

    async def collect(
        self, ctx: CallContext, events: AsyncIterator[bytes], upstreams: Sequence[Upstream], chunk_type: type[Chunk]
    ) -> list[Chunk]:
        """Every chunk of a non-streaming request's events, parsed back (closes and settles)."""
        chunks: list[Chunk] = []
        try:
            async for event in events:
                if event == DONE:
                    break
                chunks.append(chunk_type.model_validate_json(event[6:]))
        finally:
            self.close(ctx, upstreams)
        return chunks


async def until_disconnect(receive: Callable[[], Awaitable[MutableMapping[str, Any]]], work: Awaitable[Any]) -> Any:
    """Run ``work``; if the client disconnects first, cancel it (and so its gRPC calls).

    ``work`` runs in the request's own task (no task of its own and no ``asyncio.wait`` per request);
    one watcher task cancels the request's task when the client goes away (as ``EventStream`` does)."""
    task = asyncio.current_task()
    assert task is not None
    running, disconnected = True, False

    async def wait_disconnect() -> None:
        nonlocal disconnected
        while (await receive())["type"] != "http.disconnect":
            pass
        if running:
            disconnected = True
            task.cancel()

    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        result = await work
    except asyncio.CancelledError:
        if disconnected and not task.uncancel():
            raise Cancelled("the client disconnected", reason="CLIENT_DISCONNECTED") from None
        raise
    finally:
        running = False
        watcher.cancel()
    if disconnected:
        task.uncancel()  # the work caught the cancellation and finished anyway
    return result
