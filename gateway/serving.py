"""Serving logic: OpenAI requests -> inference gRPC calls on a routed replica -> OpenAI responses.

Everything that can fail before the first chunk (auth, model, quota, content filter, routing,
connect, first-token timeout) fails with its own HTTP status; a request that fails before its
first chunk with UNAVAILABLE is retried on another replica (the failed one is ejected, or only the
failed deployment when the replica itself answered). After
the first chunk, a stream forwards each chunk as it arrives and an error becomes one final
``data: {"error": ...}`` event followed by ``data: [DONE]``. Usage is settled from the engine's
counts (estimated only when the stream was cut before the engine reported them).
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from modelyard.inference.v1 import inference_pb2 as pb
from services.core.context import REQUEST_ID_HEADER
from services.core.errors import Cancelled, DeadlineExceeded, DomainError, Internal, InvalidArgument, Unavailable
from services.core.grpc_client import error_from_rpc_error
from services.core.logging import get_logger

from . import protocol as p
from .auth.keys import ApiKey
from .content_filter import ContentFilter, OutputFilter
from .errors import error_body, finite, token_logprob
from .metrics import STREAM_ERRORS, TOKENS, TTFT, labelled
from .quota import QuotaLimiter, Reservation, UsageRecorder, estimate_tokens
from .routing import Replica, Router, Target
from .settings import GatewaySettings

log = get_logger("modelyard.gateway.serving")

DONE = b"data: [DONE]\n\n"
ROLES = {"system": pb.CHAT_ROLE_SYSTEM, "user": pb.CHAT_ROLE_USER, "assistant": pb.CHAT_ROLE_ASSISTANT,
         "tool": pb.CHAT_ROLE_TOOL, "developer": pb.CHAT_ROLE_DEVELOPER}
FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
          pb.FINISH_REASON_CONTENT_FILTER: "content_filter"}
FORMATS = {"text": pb.RESPONSE_FORMAT_TYPE_TEXT, "json_object": pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT,
           "json_schema": pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA}


_ttft, _tokens = labelled(TTFT), labelled(TOKENS)


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
    # fallback count when the engine's usage never arrived (a cut stream): a delta may carry several
    # tokens (the inference service merges the ready ones), so at least ~4 characters a token
    content_deltas: int = 0
    content_chars: int = 0

    def count_delta(self, text: str) -> None:
        if text:
            self.content_deltas += 1
            self.content_chars += len(text)
    usage_reported: bool = False

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((REQUEST_ID_HEADER, self.request_id),)

    def add_usage(self, usage: pb.Usage) -> None:
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens
        self.usage_reported = True


class Upstream:
    """A started Chat/Complete stream on one replica; its first chunk has been read already.

    A read that waits ``idle_s`` fails with IDLE_CHUNK_TIMEOUT. One watchdog timer per stream
    enforces it rather than an ``asyncio.timeout`` per read (a timer armed and cancelled for every
    message): when it fires it re-arms itself for the read pending now, and cancels that read only
    when it is the one the timer was armed for.
    """

    def __init__(self, router: Router, replica: Replica, target: Target, call, first, idle_s: float) -> None:
        self._router = router
        self.replica = replica
        self._target = target
        self._call = call
        self._pending = [first]
        self._idle = idle_s
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self._reads = 0  # reads started
        self._reader: asyncio.Task | None = None  # the task of the read in progress
        self._read_at = 0.0  # when (loop time) that read started
        self._watchdog: asyncio.TimerHandle | None = None
        self._expired = False

    def __aiter__(self) -> "Upstream":
        return self

    async def __anext__(self):
        if self._pending:
            return self._pending.pop()
        task = asyncio.current_task()
        cancelling = task.cancelling()
        self._reads += 1
        self._reader, self._read_at = task, self._loop.time()
        if self._watchdog is None:
            self._watchdog = self._loop.call_at(self._read_at + self._idle, self._check_idle, self._reads)
        try:
            msg = await self._call.read()
        except asyncio.CancelledError:
            if self._expired and task.uncancel() <= cancelling:
                raise DeadlineExceeded(f"the engine sent nothing for {self._idle}s (idle_chunk_s)",
                                       reason="IDLE_CHUNK_TIMEOUT") from None
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
            self._watchdog = self._loop.call_at(self._read_at + self._idle, self._check_idle, self._reads)

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


def sampling_params(req: p.ChatCompletionRequest | p.CompletionRequest, *, logprobs: bool,
                    top_logprobs: int | None) -> pb.SamplingParams:
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


def response_format(fmt: p.ResponseFormatIn | None) -> pb.ResponseFormat | None:
    if fmt is None:
        return None
    out = pb.ResponseFormat(type=FORMATS[fmt.type])
    if fmt.type == "json_schema":
        schema = fmt.json_schema or {}
        if "schema" not in schema:
            raise InvalidArgument.for_field("response_format.json_schema.schema", "is required for json_schema")
        out.json_schema_name = str(schema.get("name", ""))
        out.json_schema = json.dumps(schema["schema"])
        out.strict = bool(schema.get("strict", False))
    return out


def chat_logprobs(items) -> p.ChatLogprobs:
    return p.ChatLogprobs(content=[
        p.TokenLogprobOut(token=lp.token, logprob=token_logprob(lp), bytes=list(lp.bytes) if lp.bytes else None,
                          top_logprobs=[p.TopLogprobOut(token=t.token, logprob=finite(t.logprob),
                                                        bytes=list(t.bytes) if t.bytes else None)
                                        for t in lp.top_logprobs])
        for lp in items])


@dataclass
class _TextLogprobs:
    """Completion logprobs of one choice, with running text offsets."""

    offset: int = 0
    out: p.CompletionLogprobs = field(default_factory=p.CompletionLogprobs)

    def add(self, items) -> p.CompletionLogprobs:
        part = p.CompletionLogprobs()
        for lp in items:
            part.tokens.append(lp.token)
            part.token_logprobs.append(token_logprob(lp))
            top = {t.token: finite(t.logprob) for t in lp.top_logprobs}
            part.top_logprobs.append({k: v for k, v in top.items() if v is not None} or None)
            part.text_offset.append(self.offset)
            self.offset += len(lp.token)
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(self.out, name).extend(getattr(part, name))
        return part


class Serving:
    """The gateway's request path; one per app."""

    def __init__(self, settings: GatewaySettings, router: Router, quota: QuotaLimiter, usage: UsageRecorder,
                 content_filter: ContentFilter) -> None:
        self.settings = settings
        self.router = router
        self.quota = quota
        self.usage = usage
        self.filter = content_filter
        self.timeouts = settings.timeouts

    # ------------------------------------------------------------ common steps

    async def admit(self, ctx: CallContext, prompt_chars: int, max_tokens: int | None, n: int) -> None:
        """Model known, then quota reserved (prompt estimate + max_tokens per choice)."""
        await self.router.resolve(ctx.model)
        ctx.prompt_estimate = estimate_tokens(prompt_chars)
        budget = max_tokens if max_tokens is not None else self.settings.quota.default_max_tokens_estimate
        ctx.reservation = self.quota.reserve(ctx.key, ctx.prompt_estimate + budget * n)

    def settle(self, ctx: CallContext) -> None:
        """Bill the engine's usage (or the estimate of a cut stream) once, by request id."""
        if not ctx.usage_reported and ctx.content_deltas:
            ctx.prompt_tokens = ctx.prompt_estimate
            ctx.completion_tokens = max(ctx.content_deltas, estimate_tokens(ctx.content_chars))
            log.info("usage_estimated", request_id=ctx.request_id, completion_tokens=ctx.completion_tokens)
        total = ctx.prompt_tokens + ctx.completion_tokens
        if ctx.reservation is not None:
            ctx.reservation.settle(total)
        if total:
            _tokens(ctx.model, "in").inc(ctx.prompt_tokens)
            _tokens(ctx.model, "out").inc(ctx.completion_tokens)
            self.usage.record(ctx.request_id, ctx.key.id, ctx.model, ctx.endpoint, ctx.prompt_tokens,
                              ctx.completion_tokens)

    async def open_stream(self, ctx: CallContext, method: str,
                          build: Callable[[Target], Any]) -> Upstream:
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
                call = getattr(replica.stub, method)(build(target), timeout=self.timeouts.request_s,
                                                     metadata=ctx.metadata)
                async with asyncio.timeout(self.timeouts.first_token_s):
                    first = await call.read()
            except TimeoutError:
                call.cancel()
                replica.release()
                raise DeadlineExceeded(f"no first token from the engine within {self.timeouts.first_token_s}s "
                                       "(first_token_s)", reason="FIRST_TOKEN_TIMEOUT") from None
            except (grpc.aio.AioRpcError, Unavailable) as exc:
                replica.release()
                err = error_from_rpc_error(exc) if isinstance(exc, grpc.aio.AioRpcError) else exc
                if isinstance(exc, grpc.aio.AioRpcError) and exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise err from None
                self.router.unavailable(replica, target, err.reason, err.message or "unavailable")
                log.info("request_retried", request_id=ctx.request_id, replica=replica.addr, error=err.message)
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

    async def unary(self, ctx: CallContext, method: str, build: Callable[[Target], Any]):
        """A unary call with the same replica choice, ejection and retry as streams."""
        tried: set[str] = set()
        while True:
            replica, target = self.router.pick(ctx.model, exclude=tried)
            tried.add(replica.addr)
            replica.acquire()
            try:
                await self.router.connect(replica)
                return await getattr(replica.stub, method)(build(target), timeout=self.timeouts.unary_s,
                                                           metadata=ctx.metadata)
            except grpc.aio.AioRpcError as exc:
                err = error_from_rpc_error(exc)
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise err from None
                self.router.unavailable(replica, target, err.reason, err.message or "unavailable")
            except Unavailable as exc:
                self.router.eject(replica, exc.message)
            finally:
                replica.release()

    async def sse(self, ctx: CallContext, events: AsyncIterator[bytes],
                  upstreams: list[Upstream]) -> AsyncGenerator[bytes, None]:
        """Forward events; an error becomes an error event and [DONE]. Always closes the upstreams
        (a client disconnect cancels this generator and so the gRPC calls) and settles usage."""
        try:
            async for event in events:
                yield event
        except DomainError as err:
            STREAM_ERRORS.labels(ctx.model, err.reason).inc()
            log.warning("stream_failed", request_id=ctx.request_id, reason=err.reason, error=err.message)
            yield b"data: " + json.dumps(error_body(err)[1]).encode() + b"\n\n"
            yield DONE
        finally:
            for upstream in upstreams:
                upstream.close()
            self.settle(ctx)

    # ------------------------------------------------------------ chat

    def chat_request(self, req: p.ChatCompletionRequest, target: Target) -> pb.ChatRequest:
        messages = [pb.ChatMessage(role=ROLES[m.role], content=m.text(), name=m.name or "",
                                   tool_call_id=m.tool_call_id or "",
                                   tool_calls=[pb.ToolCall(id=t.id, name=t.function.name,
                                                           arguments=t.function.arguments)
                                               for t in m.tool_calls or ()])
                    for m in req.messages]
        out = pb.ChatRequest(deployment=target.deployment, adapter=target.adapter, messages=messages,
                             sampling=sampling_params(req, logprobs=req.logprobs,
                                                      top_logprobs=req.top_logprobs if req.logprobs else None),
                             tools_json=json.dumps(req.tools) if req.tools else "",
                             tool_choice_json=json.dumps(req.tool_choice) if req.tool_choice is not None else "")
        fmt = response_format(req.response_format)
        if fmt is not None:
            out.response_format.CopyFrom(fmt)
        return out

    def validate_chat(self, req: p.ChatCompletionRequest) -> None:
        if req.top_logprobs and not req.logprobs:
            raise InvalidArgument.for_field("top_logprobs", "requires logprobs=true")
        self.filter.check_prompt((m.text() for m in req.messages), "messages")

    async def start_chat(self, ctx: CallContext, req: p.ChatCompletionRequest) -> Upstream:
        self.validate_chat(req)
        await self.admit(ctx, sum(len(m.text()) for m in req.messages), req.max_new_tokens, req.n)
        try:
            return await self.open_stream(ctx, "Chat", lambda t: self.chat_request(req, t))
        except BaseException:
            self.settle(ctx)
            raise

    async def chat_events(self, ctx: CallContext, req: p.ChatCompletionRequest,
                          upstream: Upstream) -> AsyncIterator[bytes]:
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        exclude = None if req.include_usage else {"usage"}
        envelope = p.ChunkEnvelope(p.ChatCompletionChunk(id=cid, created=created, model=ctx.model, choices=[]),
                                   exclude)
        filters: dict[int, OutputFilter] = {}
        done: set[int] = set()
        async for msg in upstream:
            choices: list[bytes] = []
            for d in msg.choices:
                if d.index in done:
                    continue
                out_filter = filters.get(d.index) or filters.setdefault(d.index, self.filter.output())
                content = out_filter.feed(d.content)
                ctx.count_delta(d.content)
                finish = "content_filter" if out_filter.blocked else FINISH.get(d.finish_reason)
                if finish:
                    done.add(d.index)
                content = content if (content or d.role) else None
                if d.tool_calls or req.logprobs:
                    choices.append(self._chat_choice(d, content, finish, req.logprobs))
                else:
                    choices.append(p.chat_choice_json(d.index, bool(d.role), content, finish))
            if choices:
                yield envelope.event(choices)
            if msg.HasField("usage"):
                ctx.add_usage(msg.usage)
            if filters and len(done) == req.n and any(f.blocked for f in filters.values()):
                break  # every choice is finished and the filter cut one: stop the engine
        if req.include_usage:
            chunk = p.ChatCompletionChunk(id=cid, created=created, model=ctx.model, choices=[],
                                          usage=p.Usage.of(ctx.prompt_tokens, ctx.completion_tokens))
            yield b"data: " + chunk.model_dump_json().encode() + b"\n\n"
        yield DONE

    @staticmethod
    def _chat_choice(d: pb.ChatChoiceDelta, content: str | None, finish: str | None, logprobs: bool) -> bytes:
        """A choice with tool calls or logprobs, through its model (the plain ones are pre-serialized)."""
        tool_calls = [p.ToolCallDeltaOut(index=t.index, id=t.id or None, type="function" if t.id else None,
                                         function=p.FunctionDelta(name=t.name or None, arguments=t.arguments))
                      for t in d.tool_calls] or None
        delta = p.ChatDelta(role="assistant" if d.role else None, content=content, tool_calls=tool_calls)
        return p.ChatChunkChoice(index=d.index, delta=delta, finish_reason=finish,
                                 logprobs=chat_logprobs(d.logprobs) if logprobs else None).model_dump_json().encode()

    async def chat_collect(self, ctx: CallContext, req: p.ChatCompletionRequest,
                           upstream: Upstream) -> p.ChatCompletion:
        texts: dict[int, list[str]] = {}
        tools: dict[int, dict[int, dict[str, str]]] = {}
        logprobs: dict[int, list] = {}
        finish: dict[int, str | None] = {}
        try:
            async for event in self.chat_events(ctx, req.model_copy(update={"stream": False}), upstream):
                if event == DONE:
                    break
                chunk = p.ChatCompletionChunk.model_validate_json(event[6:])
                for c in chunk.choices:
                    texts.setdefault(c.index, []).append(c.delta.content or "")
                    for t in c.delta.tool_calls or ():
                        call = tools.setdefault(c.index, {}).setdefault(t.index, {"id": "", "name": "",
                                                                                   "arguments": ""})
                        call["id"] = t.id or call["id"]
                        call["name"] = t.function.name or call["name"]
                        call["arguments"] += t.function.arguments
                    if c.logprobs is not None:
                        logprobs.setdefault(c.index, []).extend(c.logprobs.content or ())
                    finish[c.index] = c.finish_reason or finish.get(c.index)
        finally:
            upstream.close()
            self.settle(ctx)
        choices = []
        for i in range(req.n):
            calls = [p.ToolCallOut(id=c["id"], function=p.FunctionOut(name=c["name"], arguments=c["arguments"]))
                     for _, c in sorted(tools.get(i, {}).items())] or None
            content = "".join(texts.get(i, []))
            choices.append(p.ChatChoice(
                index=i, message=p.ChatMessageOut(content=content if content or not calls else None, tool_calls=calls),
                logprobs=p.ChatLogprobs(content=logprobs.get(i, [])) if req.logprobs else None,
                finish_reason=finish.get(i)))
        return p.ChatCompletion(id=f"chatcmpl-{uuid.uuid4().hex}", model=ctx.model, choices=choices,
                                usage=p.Usage.of(ctx.prompt_tokens, ctx.completion_tokens))

    # ------------------------------------------------------------ completions

    def complete_request(self, req: p.CompletionRequest, prompt: str | list[int],
                         target: Target) -> pb.CompleteRequest:
        out = pb.CompleteRequest(deployment=target.deployment, adapter=target.adapter, echo=req.echo,
                                 sampling=sampling_params(req, logprobs=req.logprobs is not None,
                                                          top_logprobs=req.logprobs))
        if isinstance(prompt, str):
            out.prompt = prompt
        else:
            out.prompt_token_ids.extend(prompt)
        return out

    async def start_completion(self, ctx: CallContext, req: p.CompletionRequest) -> list[Upstream]:
        if req.best_of is not None and req.best_of != req.n:
            raise InvalidArgument.for_field("best_of", "only best_of == n is supported")
        if req.suffix:
            raise InvalidArgument.for_field("suffix", "is not supported")
        prompts = req.prompts()
        self.filter.check_prompt((x for x in prompts if isinstance(x, str)), "prompt")
        chars = sum(len(x) if isinstance(x, str) else 4 * len(x) for x in prompts)  # ~4 characters a token
        await self.admit(ctx, chars, req.max_tokens, req.n * len(prompts))
        upstreams: list[Upstream] = []
        try:
            opened = [asyncio.ensure_future(self.open_stream(ctx, "Complete",
                                                             lambda t, x=x: self.complete_request(req, x, t)))
                      for x in prompts]
            try:
                await asyncio.gather(*opened)
            finally:
                for task in opened:
                    if task.done() and not task.cancelled() and task.exception() is None:
                        upstreams.append(task.result())
                    else:
                        task.cancel()
            return upstreams
        except BaseException:
            for upstream in upstreams:
                upstream.close()
            self.settle(ctx)
            raise

    async def completion_events(self, ctx: CallContext, req: p.CompletionRequest,
                                upstreams: list[Upstream]) -> AsyncIterator[bytes]:
        """Chunks of every prompt in turn (choice index = prompt index * n + choice)."""
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        envelope = p.ChunkEnvelope(p.Completion(id=cid, created=created, model=ctx.model, choices=[]),
                                   None if req.include_usage else {"usage"})
        for prompt_index, upstream in enumerate(upstreams):
            filters: dict[int, OutputFilter] = {}
            offsets: dict[int, _TextLogprobs] = {}
            done: set[int] = set()
            async for msg in upstream:
                choices: list[bytes] = []
                for d in msg.choices:
                    if d.index in done:
                        continue
                    out_filter = filters.get(d.index) or filters.setdefault(d.index, self.filter.output())
                    text = out_filter.feed(d.text)
                    ctx.count_delta(d.text)
                    finish = "content_filter" if out_filter.blocked else FINISH.get(d.finish_reason)
                    if finish:
                        done.add(d.index)
                    index = prompt_index * req.n + d.index
                    if req.logprobs is None:
                        choices.append(p.completion_choice_json(index, text, finish))
                    else:
                        lp = offsets.setdefault(d.index, _TextLogprobs()).add(d.logprobs)
                        choices.append(p.CompletionChoice(index=index, text=text, logprobs=lp, finish_reason=finish)
                                       .model_dump_json().encode())
                if choices:
                    yield envelope.event(choices)
                if msg.HasField("usage"):
                    ctx.add_usage(msg.usage)
                if filters and len(done) == req.n and any(f.blocked for f in filters.values()):
                    break
            upstream.close()
        if req.include_usage:
            chunk = p.Completion(id=cid, created=created, model=ctx.model, choices=[],
                                 usage=p.Usage.of(ctx.prompt_tokens, ctx.completion_tokens))
            yield b"data: " + chunk.model_dump_json().encode() + b"\n\n"
        yield DONE

    async def completion_collect(self, ctx: CallContext, req: p.CompletionRequest,
                                 upstreams: list[Upstream]) -> p.Completion:
        total = len(upstreams) * req.n
        texts: dict[int, list[str]] = {}
        logprobs: dict[int, p.CompletionLogprobs] = {}
        finish: dict[int, str | None] = {}
        try:
            async for event in self.completion_events(ctx, req.model_copy(update={"stream": False}), upstreams):
                if event == DONE:
                    break
                for c in p.Completion.model_validate_json(event[6:]).choices:
                    texts.setdefault(c.index, []).append(c.text)
                    if c.logprobs is not None:
                        acc = logprobs.setdefault(c.index, p.CompletionLogprobs())
                        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                            getattr(acc, name).extend(getattr(c.logprobs, name))
                    finish[c.index] = c.finish_reason or finish.get(c.index)
        finally:
            for upstream in upstreams:
                upstream.close()
            self.settle(ctx)
        choices = [p.CompletionChoice(index=i, text="".join(texts.get(i, [])),
                                      logprobs=logprobs.get(i, p.CompletionLogprobs())
                                      if req.logprobs is not None else None,
                                      finish_reason=finish.get(i))
                   for i in range(total)]
        return p.Completion(id=f"cmpl-{uuid.uuid4().hex}", model=ctx.model, choices=choices,
                            usage=p.Usage.of(ctx.prompt_tokens, ctx.completion_tokens))

    # ------------------------------------------------------------ embeddings

    async def embed(self, ctx: CallContext, req: p.EmbeddingRequest) -> p.EmbeddingList:
        inputs = req.inputs()
        self.filter.check_prompt(inputs, "input")
        await self.admit(ctx, sum(len(x) for x in inputs), 0, 1)
        try:
            def build(target: Target) -> pb.EmbedRequest:
                if target.adapter:
                    raise InvalidArgument.for_field("model", "an adapter cannot embed; use the base model name")
                out = pb.EmbedRequest(deployment=target.deployment, inputs=inputs)
                if req.dimensions is not None:
                    out.dimensions = req.dimensions
                return out

            reply = await self.unary(ctx, "Embed", build)
            ctx.add_usage(reply.usage)
        finally:
            self.settle(ctx)
        data = []
        for e in sorted(reply.embeddings, key=lambda e: e.index):
            values: list[float] | str = list(e.values)
            if req.encoding_format == "base64":
                values = base64.b64encode(struct.pack(f"<{len(e.values)}f", *e.values)).decode()
            data.append(p.EmbeddingData(index=e.index, embedding=values))
        return p.EmbeddingList(data=data, model=ctx.model, usage=p.Usage.of(ctx.prompt_tokens, 0))


async def until_disconnect(receive: Callable[[], Awaitable[dict]], work: Awaitable):
    """Run ``work``; if the client disconnects first, cancel it (and so its gRPC calls)."""
    task = asyncio.ensure_future(work)

    async def wait_disconnect() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise Cancelled("the client disconnected", reason="CLIENT_DISCONNECTED")
    return task.result()
