"""The gateway's streaming fast path: pre-serialized chunks are byte for byte what the pydantic
models give, the lean SSE response ends and disconnects like Starlette's, and the idle watchdog
fails a silent engine like a per-read timeout did."""

from __future__ import annotations

import asyncio
import json
from typing import TypeVar

import pytest

from gateway import protocol as p
from gateway.auth.keys import ANONYMOUS
from gateway.content_filter import ContentFilter
from gateway.routes.sse import EventStream
from gateway.serving import DONE, CallContext, OpenAIServing, Upstream
from gateway.serving.chat import ServingChat, chat_logprobs
from gateway.serving.completions import ServingCompletion
from modelyard.inference.v1 import inference_pb2 as pb
from services.core.errors import DeadlineExceeded

TEXTS = ["", " abcd", "héllo wörld ✓", "emoji 😀 and 中文", 'say "hi" \\ back\\slash', "new\nline\ttab\rcr",
         "".join(chr(c) for c in range(0x20)) + "\x7f", "\u2028\u2029\ufeff", '"choices":[]', "\x00"]
FINISHES: list[p.FinishReason | None] = [None, "stop", "length", "tool_calls", "content_filter"]
MODELS = ["bench", 'odd "model" \\ "choices":[] ☃']


def sse(model) -> bytes:
    return b"data: " + model.model_dump_json(exclude={"usage"}).encode() + b"\n\n"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("usage_field", [True, False])
def test_chat_chunks_are_byte_identical_to_the_models(model, usage_field):
    exclude = None if usage_field else {"usage"}
    envelope = p.ChunkEnvelope(p.ChatCompletionChunk(id="chatcmpl-1", created=7, model=model, choices=[]), exclude)
    for text in TEXTS:
        for finish in FINISHES:
            for index, role in ((0, True), (0, False), (5, False)):
                for content in (text, None):
                    choice = p.ChatChunkChoice(index=index, finish_reason=finish, delta=p.ChatDelta(
                        role="assistant" if role else None, content=content))
                    chunk = p.ChatCompletionChunk(id="chatcmpl-1", created=7, model=model, choices=[choice, choice])
                    expected = b"data: " + chunk.model_dump_json(exclude=exclude).encode() + b"\n\n"
                    fast = p.chat_choice_json(index, role, content, finish)
                    assert envelope.event([fast, fast]) == expected


@pytest.mark.parametrize("model", MODELS)
def test_completion_chunks_are_byte_identical_to_the_models(model):
    envelope = p.ChunkEnvelope(p.Completion(id="cmpl-1", created=7, model=model, choices=[]), {"usage"})
    for text in TEXTS:
        for finish in FINISHES:
            for index in (0, 9):
                choice = p.CompletionChoice(index=index, text=text, logprobs=None, finish_reason=finish)
                expected = sse(p.Completion(id="cmpl-1", created=7, model=model, choices=[choice]))
                assert envelope.event([p.completion_choice_json(index, text, finish)]) == expected


S = TypeVar("S", bound=OpenAIServing)


def serving(cls: type[S], terms: list[str]) -> S:
    """Just what the events need: the content filter."""
    out = cls.__new__(cls)
    out.filter = ContentFilter(terms)
    return out


class FakeUpstream:
    def __init__(self, messages) -> None:
        self._messages = iter(messages)

    def __aiter__(self) -> FakeUpstream:
        return self

    async def __anext__(self):
        for msg in self._messages:
            return msg
        raise StopAsyncIteration

    def close(self) -> None:
        pass


def chat_messages() -> list[pb.ChatChunk]:
    lp = pb.TokenLogprob(token="a", logprob=-0.5, bytes=b"a", top_logprobs=[pb.TopLogprob(token="b", logprob=-1.5)])
    return [
        pb.ChatChunk(choices=[pb.ChatChoiceDelta(index=0, role=pb.CHAT_ROLE_ASSISTANT, content="")]),
        pb.ChatChunk(choices=[pb.ChatChoiceDelta(index=0, content='he said "hi"\n', logprobs=[lp])]),
        pb.ChatChunk(choices=[pb.ChatChoiceDelta(index=0, content="ünïcode 😀"),
                              pb.ChatChoiceDelta(index=1, content="", tool_calls=[
                                  pb.ToolCallDelta(index=0, id="call_1", name="f", arguments='{"x"')])]),
        pb.ChatChunk(choices=[pb.ChatChoiceDelta(index=1, tool_calls=[pb.ToolCallDelta(index=0, arguments=": 1}")])]),
        pb.ChatChunk(choices=[pb.ChatChoiceDelta(index=0, content="a SECRET here", finish_reason=pb.FINISH_REASON_STOP),
                              pb.ChatChoiceDelta(index=1, finish_reason=pb.FINISH_REASON_TOOL_CALLS)],
                     usage=pb.Usage(prompt_tokens=3, completion_tokens=5)),
    ]


def reference_chat_events(req: p.ChatCompletionRequest, cid: str, created: int, model: str,
                          messages: list[pb.ChatChunk], terms: list[str]) -> list[bytes]:
    """The events as the models serialize them (the gateway's path before the fast path)."""
    exclude = None if req.include_usage else {"usage"}
    content_filter, filters, out = ContentFilter(terms), {}, []
    for msg in messages:
        choices = []
        for d in msg.choices:
            f = filters.setdefault(d.index, content_filter.output())
            content = f.feed(d.content)
            finish = "content_filter" if f.blocked else {1: "stop", 2: "length", 3: "tool_calls"}.get(d.finish_reason)
            tool_calls = [p.ToolCallDeltaOut(index=t.index, id=t.id or None, type="function" if t.id else None,
                                             function=p.FunctionDelta(name=t.name or None, arguments=t.arguments))
                          for t in d.tool_calls] or None
            delta = p.ChatDelta(role="assistant" if d.role else None, content=content if (content or d.role) else None,
                                tool_calls=tool_calls)
            choices.append(p.ChatChunkChoice(index=d.index, delta=delta, finish_reason=finish,
                                             logprobs=chat_logprobs(d.logprobs) if req.logprobs else None))
        chunk = p.ChatCompletionChunk(id=cid, created=created, model=model, choices=choices)
        out.append(b"data: " + chunk.model_dump_json(exclude=exclude).encode() + b"\n\n")
    if req.include_usage:
        chunk = p.ChatCompletionChunk(id=cid, created=created, model=model, choices=[], usage=p.Usage.of(3, 5))
        out.append(b"data: " + chunk.model_dump_json().encode() + b"\n\n")
    return [*out, DONE]


@pytest.mark.parametrize("logprobs", [False, True])
@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("terms", [[], ["secret"]])
async def test_chat_events_match_the_models(logprobs, include_usage, terms):
    req = p.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], n=2, stream=True,
                                  logprobs=logprobs, stream_options={"include_usage": include_usage})
    ctx = CallContext(request_id="r", key=ANONYMOUS, model="m", endpoint="chat.completions", started=0.0)
    events = [e async for e in serving(ServingChat, terms).chat_events(ctx, req, FakeUpstream(chat_messages()))]
    first = json.loads(events[0][6:])
    assert events == reference_chat_events(req, first["id"], first["created"], "m", chat_messages(), terms)
    assert (ctx.prompt_tokens, ctx.completion_tokens, ctx.content_deltas) == (3, 5, 3)


async def test_completion_events_match_the_models():
    req = p.CompletionRequest(model="m", prompt=["a", "b"], stream=True)
    last = pb.CompleteChoiceDelta(index=0, text="😀", finish_reason=pb.FINISH_REASON_LENGTH)
    messages = [pb.CompleteChunk(choices=[pb.CompleteChoiceDelta(index=0, text='x "y"\n')]),
                pb.CompleteChunk(choices=[last])]
    ctx = CallContext(request_id="r", key=ANONYMOUS, model="m", endpoint="completions", started=0.0)
    upstreams = [FakeUpstream(messages), FakeUpstream(messages)]
    events = [e async for e in serving(ServingCompletion, []).completion_events(ctx, req, upstreams)]
    first = json.loads(events[0][6:])
    expected = [sse(p.Completion(id=first["id"], created=first["created"], model="m", choices=[
        p.CompletionChoice(index=prompt, text=text, logprobs=None, finish_reason=finish)]))
        for prompt in (0, 1) for text, finish in (('x "y"\n', None), ("😀", "length"))]
    assert events == [*expected, DONE]


# ---------------------------------------------------------------- EventStream


class Client:
    """An ASGI server's side of one response: what was sent, and a receive that can disconnect."""

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.gone = asyncio.Event()
        self.body_sent = asyncio.Event()  # a first body message reached send

    async def send(self, message: dict) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body":
            self.body_sent.set()

    async def receive(self) -> dict:
        await self.gone.wait()
        return {"type": "http.disconnect"}


async def test_event_stream_sends_events_and_ends_with_done():
    async def events():
        yield b"data: 1\n\n"
        yield DONE

    client = Client()
    await EventStream(events(), {"x-a": "b"})({"type": "http"}, client.receive, client.send)
    start, *body = client.sent
    assert start["status"] == 200 and (b"content-type", b"text/event-stream; charset=utf-8") in start["headers"]
    assert (b"x-a", b"b") in start["headers"]
    assert [(m["body"], m["more_body"]) for m in body] == [(b"data: 1\n\n", True), (DONE, False)]


async def test_event_stream_without_done_ends_with_an_empty_body():
    async def events():
        yield b"data: 1\n\n"

    client = Client()
    await EventStream(events(), {})({"type": "http"}, client.receive, client.send)
    assert [(m["body"], m["more_body"]) for m in client.sent[1:]] == [(b"data: 1\n\n", True), (b"", False)]


@pytest.mark.parametrize("blocked_in", ["read", "send"])
async def test_disconnect_closes_the_events_and_returns_normally(blocked_in):
    closed, hang, waiting = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def events():
        try:
            yield b"data: 1\n\n"
            waiting.set()
            await hang.wait()  # the upstream read that never answers
            yield b"data: 2\n\n"
        finally:
            closed.set()

    client = Client()
    if blocked_in == "send":
        async def send(message: dict) -> None:
            client.sent.append(message)
            if len(client.sent) == 2:
                waiting.set()
                await hang.wait()  # a slow client: the write waits for the socket to drain
        client.send = send  # type: ignore[method-assign]
    task = asyncio.ensure_future(EventStream(events(), {})({"type": "http"}, client.receive, client.send))
    await asyncio.wait_for(waiting.wait(), 10)  # blocked where the test wants it
    client.gone.set()
    await asyncio.wait_for(task, 10)
    assert closed.is_set() and task.result() is None and not task.cancelled()
    assert [m.get("body") for m in client.sent[1:]] == [b"data: 1\n\n"]


async def test_a_cancelled_response_still_raises():
    async def events():
        yield b"data: 1\n\n"
        await asyncio.Event().wait()

    client = Client()
    task = asyncio.ensure_future(EventStream(events(), {})({"type": "http"}, client.receive, client.send))
    await asyncio.wait_for(client.body_sent.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# ---------------------------------------------------------------- idle watchdog
# A manual clock drives the watchdog: time moves only when the test says, so no margin of
# wall-clock time decides a result on a busy machine.


class ManualClock:
    """``time`` and ``call_at`` of an event loop, on a clock that ``advance`` moves."""

    def __init__(self) -> None:
        self.now = 0.0
        self._timers: list[tuple[float, asyncio.TimerHandle]] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback, *args) -> asyncio.TimerHandle:
        handle = asyncio.TimerHandle(when, callback, args, asyncio.get_running_loop())
        self._timers.append((when, handle))
        return handle

    def advance(self, seconds: float) -> None:
        """Move the clock, running each timer that falls due on the way (timers may add timers)."""
        self.now += seconds
        while due := sorted((t for t in self._timers if t[0] <= self.now), key=lambda t: t[0]):
            self._timers.remove(due[0])
            if not due[0][1].cancelled():
                due[0][1]._run()


class FakeCall:
    """A gRPC stream call whose messages the test hands over one by one."""

    def __init__(self) -> None:
        self.replies: asyncio.Queue[pb.ChatChunk] = asyncio.Queue()
        self.reading = asyncio.Event()
        self.cancelled = False

    async def read(self):
        self.reading.set()
        try:
            return await self.replies.get()
        finally:
            self.reading.clear()

    def done(self) -> bool:
        return self.cancelled

    def cancel(self) -> None:
        self.cancelled = True


class FakeReplica:
    def release(self) -> None:
        pass


IDLE_S = 1.0


def upstream() -> tuple[Upstream, FakeCall, ManualClock]:
    call, clock = FakeCall(), ManualClock()
    return Upstream(None, FakeReplica(), None, call, pb.ChatChunk(), IDLE_S, clock=clock), call, clock


async def read_taking(up: Upstream, call: FakeCall, clock: ManualClock, seconds: float):
    """One read during which ``seconds`` pass before the engine's message arrives."""
    task = asyncio.ensure_future(up.__anext__())
    await asyncio.wait_for(call.reading.wait(), 10)
    clock.advance(seconds)
    call.replies.put_nowait(pb.ChatChunk())
    return await task


async def test_reads_faster_than_idle_never_time_out_however_long_the_stream():
    up, call, clock = upstream()
    await up.__anext__()  # the first chunk, read before
    for _ in range(10):  # 3 x idle_s in all, each read 0.3 x idle_s
        await read_taking(up, call, clock, 0.3 * IDLE_S)
    assert clock.now == pytest.approx(3 * IDLE_S)
    up.close()
    assert call.cancelled


async def test_a_read_waiting_idle_s_fails_with_idle_chunk_timeout():
    up, call, clock = upstream()
    await up.__anext__()
    await read_taking(up, call, clock, 0.3 * IDLE_S)
    await read_taking(up, call, clock, 0.3 * IDLE_S)  # the watchdog armed at 0 fires in the next read

    async def engine_goes_quiet() -> None:
        await call.reading.wait()
        clock.advance(0.5 * IDLE_S)  # at 1.1: the first timer re-arms for this read (due at 1.6)
        for _ in range(3):  # let a cancellation, had there been one, reach the read
            await asyncio.sleep(0)
        assert call.reading.is_set(), "cancelled before idle_s passed"
        clock.advance(0.5 * IDLE_S)  # at 1.6: this read waited idle_s

    quiet = asyncio.ensure_future(engine_goes_quiet())
    with pytest.raises(DeadlineExceeded) as err:
        await up.__anext__()  # in this task: the watchdog's cancel must leave no trace on it
    await quiet
    assert err.value.reason == "IDLE_CHUNK_TIMEOUT" and asyncio.current_task().cancelling() == 0
    up.close()


async def test_cancelling_the_reader_is_not_a_timeout():
    up, call, clock = upstream()
    await up.__anext__()
    task = asyncio.ensure_future(up.__anext__())
    await asyncio.wait_for(call.reading.wait(), 10)
    clock.advance(0.5 * IDLE_S)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    clock.advance(10 * IDLE_S)  # the watchdog finds no read to cancel
    up.close()
