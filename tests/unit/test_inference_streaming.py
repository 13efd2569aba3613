"""The streaming path of the inference service: the SSE client of the engines' servers (against real
loopback HTTP servers), the merging of engine chunks into messages, and the pacing of streams."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from modelyard.inference.v1 import inference_pb2 as pb
from services.inference import protocol
from services.inference.engines.base import EngineSpec, StreamRate
from services.inference.engines.sse_client import ConnectionLost, SseClient, SseEvents
from services.inference.engines.transformers_engine import TransformersEngine
from services.inference.engines.vllm_engine import VllmEngine
from services.inference.streaming import Pacer, Pacing, paced
from tests.support.virtual_time import virtual_time

# ====================================================================== SseEvents

STREAM = (b'data: {"a": 1}\n\n'
          b': keep-alive comment\n\n'
          b'event: message\nid: 7\ndata: {"a": 2, "s": "x\\ny"}\n\n'
          b'\n\n'
          b'data:{"a": 3}\n\n'
          b'data: [DONE]\n\n')
EXPECTED = [{"a": 1}, {"a": 2, "s": "x\ny"}, {"a": 3}]


def _feed_all(parts: list[bytes]) -> tuple[list, bool]:
    events = SseEvents()
    out = []
    for part in parts:
        out.extend(events.feed(part))
    return out, events.done


def test_sse_events_whole_stream_in_one_feed():
    events = SseEvents()
    assert events.feed(STREAM) == EXPECTED
    assert events.done


@pytest.mark.parametrize("crlf", [False, True])
def test_sse_events_split_at_every_pair_of_byte_boundaries(crlf):
    stream = STREAM.replace(b"\n", b"\r\n") if crlf else STREAM
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            out, done = _feed_all([stream[:i], stream[i:j], stream[j:]])
            assert out == EXPECTED, (i, j)
            assert done, (i, j)


@pytest.mark.parametrize("crlf", [False, True])
def test_sse_events_byte_by_byte(crlf):
    stream = STREAM.replace(b"\n", b"\r\n") if crlf else STREAM
    events = SseEvents()
    out = []
    for k in range(len(stream)):
        got = events.feed(stream[k:k + 1])
        out.extend(got)
        if got:  # an event completes exactly at the byte that ends its blank line
            assert stream[:k + 1].endswith(b"\r\n\r\n" if crlf else b"\n\n")
    assert out == EXPECTED and events.done


def test_sse_events_split_inside_the_separators():
    events = SseEvents()
    assert events.feed(b'data: {"a": 1}\n') == []
    assert events.feed(b'\ndata: {"a": 2}\r') == [{"a": 1}]
    assert events.feed(b'\n\r') == []
    assert events.feed(b'\n') == [{"a": 2}]
    assert not events.done


def test_sse_events_done_stops_parsing():
    events = SseEvents()
    assert events.feed(b'data: {"a": 1}\n\ndata: [DO') == [{"a": 1}]
    assert not events.done
    assert events.feed(b'NE]\n\ndata: {"a": 2}\n\n') == []
    assert events.done
    assert events.feed(b'data: {"a": 3}\n\n') == []
    assert events.done


def test_sse_events_after_done_in_the_same_feed_are_dropped():
    events = SseEvents()
    assert events.feed(b'data: {"a": 1}\r\n\r\ndata: [DONE]\r\n\r\ndata: {"a": 2}\r\n\r\n') == [{"a": 1}]
    assert events.done


def test_sse_events_comments_and_blank_lines_only():
    events = SseEvents()
    assert events.feed(b": ping\n\n\n\n: ping\r\n\r\n") == []
    assert not events.done


# ====================================================================== SseClient against real servers


class SseApp:
    """A Starlette app streaming SSE answers built from the posted body; records what it saw."""

    def __init__(self) -> None:
        self.client_ports: list[int] = []  # the client's port of each request: one per connection
        self.forever_started = asyncio.Event()
        self.forever_closed = asyncio.Event()
        self.bodies: list[dict] = []  # what /v1/chat/completions was sent
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/count", self.count, methods=["POST"]),
            Route("/bad", self.bad, methods=["POST"]),
            Route("/forever", self.forever, methods=["POST"]),
        ])

    async def count(self, request: Request):
        self.client_ports.append(request.client.port)
        body = await request.json()

        async def events():
            for k in range(body["n"]):
                if body.get("delay"):
                    await asyncio.sleep(body["delay"])
                yield f"data: {json.dumps({'i': k, 'pad': 'x' * body.get('pad', 0)})}\n\n"
            if body.get("done", True):
                yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def chat(self, request: Request):
        """An OpenAI chat stream: ``max_tokens`` one-token chunks ``delay`` s apart, then the usage."""
        body = await request.json()
        self.bodies.append(body)

        async def events():
            for k in range(body["max_tokens"]):
                if k and body.get("delay"):
                    await asyncio.sleep(body["delay"])
                yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': 'x'}}]})}\n\n"
            usage = {"prompt_tokens": 1, "completion_tokens": body["max_tokens"], "total_tokens": body["max_tokens"] + 1}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def bad(self, request: Request):
        self.client_ports.append(request.client.port)
        await request.body()
        return JSONResponse({"error": {"message": "bad"}}, status_code=400)

    async def forever(self, request: Request):
        self.client_ports.append(request.client.port)
        await request.body()

        async def events():
            self.forever_started.set()
            try:
                k = 0
                while True:
                    yield f"data: {json.dumps({'i': k})}\n\n"
                    k += 1
                    await asyncio.sleep(0.02)
            finally:
                self.forever_closed.set()

        return StreamingResponse(events(), media_type="text/event-stream")


@contextlib.asynccontextmanager
async def serve(app, **config):
    """``app`` under uvicorn on a free loopback port, in this event loop; yields the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=2, **config))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(5):
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("uvicorn exited before starting")
                await asyncio.sleep(0.01)
        yield port
    finally:
        server.should_exit = True
        with contextlib.suppress(BaseException):
            async with asyncio.timeout(5):
                await task
        sock.close()


async def _collect(client: SseClient, path: str, body: dict) -> list[tuple[int, object]]:
    return [item async for item in client.stream(path, body)]


def _events(answers: list[tuple[int, object]]) -> list[dict]:
    assert answers and all(status == 200 for status, _ in answers)
    return [event for _, batch in answers for event in batch]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_sse_client_streams_all_events_in_order():
    app = SseApp()
    async with serve(app.app) as port:
        client = SseClient("127.0.0.1", port)
        try:
            answers = await _collect(client, "/count", {"n": 5, "delay": 0.01})
            assert [e["i"] for e in _events(answers)] == [0, 1, 2, 3, 4]
            assert all(isinstance(batch, list) and batch for _, batch in answers)
            # a long answer over many socket reads
            answers = await _collect(client, "/count", {"n": 300, "pad": 500})
            events = _events(answers)
            assert [e["i"] for e in events] == list(range(300))
            assert all(e["pad"] == "x" * 500 for e in events)
        finally:
            await client.aclose()


async def test_sse_client_reuses_the_kept_alive_connection():
    app = SseApp()
    async with serve(app.app) as port:
        client = SseClient("127.0.0.1", port)
        try:
            first = _events(await _collect(client, "/count", {"n": 3}))
            second = _events(await _collect(client, "/count", {"n": 4}))
            assert [e["i"] for e in first] == [0, 1, 2]
            assert [e["i"] for e in second] == [0, 1, 2, 3]
            assert len(client._open) == 1
            assert len(app.client_ports) == 2 and app.client_ports[0] == app.client_ports[1]
        finally:
            await client.aclose()


async def test_sse_client_concurrent_streams_use_separate_connections():
    app = SseApp()
    async with serve(app.app) as port:
        client = SseClient("127.0.0.1", port)
        try:
            a, b = await asyncio.gather(_collect(client, "/count", {"n": 6, "delay": 0.01}),
                                        _collect(client, "/count", {"n": 4, "delay": 0.01}))
            assert [e["i"] for e in _events(a)] == list(range(6))
            assert [e["i"] for e in _events(b)] == list(range(4))
            assert len(set(app.client_ports)) == 2 and len(client._open) == 2
            # both went back to the pool: two more requests open no new connection
            await asyncio.gather(_collect(client, "/count", {"n": 1}), _collect(client, "/count", {"n": 1}))
            assert len(set(app.client_ports)) == 2 and len(client._open) == 2
        finally:
            await client.aclose()


async def test_sse_client_non_200_answer_yields_status_and_body():
    app = SseApp()
    async with serve(app.app) as port:
        client = SseClient("127.0.0.1", port)
        try:
            answers = await _collect(client, "/bad", {"n": 1})
            assert len(answers) == 1
            status, body = answers[0]
            assert status == 400 and isinstance(body, bytes)
            assert json.loads(body) == {"error": {"message": "bad"}}
            # the connection stays usable
            assert [e["i"] for e in _events(await _collect(client, "/count", {"n": 2}))] == [0, 1]
        finally:
            await client.aclose()


async def test_sse_client_200_answer_without_done_raises_connection_lost():
    app = SseApp()
    async with serve(app.app) as port:
        client = SseClient("127.0.0.1", port)
        try:
            got = []
            with pytest.raises(ConnectionLost) as info:
                async for status, batch in client.stream("/count", {"n": 3, "done": False, "delay": 0.01}):
                    assert status == 200
                    got.extend(batch)
            assert [e["i"] for e in got] == [0, 1, 2]  # what came before the end was delivered
            assert info.value.answered
        finally:
            await client.aclose()


async def test_sse_client_nothing_listening_raises_oserror():
    client = SseClient("127.0.0.1", _free_port(), connect_timeout_s=2)
    try:
        with pytest.raises(OSError):
            async for _ in client.stream("/count", {"n": 1}):
                pass
        assert not client._open
    finally:
        await client.aclose()


async def test_sse_client_closing_the_stream_early_closes_the_connection():
    app = SseApp()
    async with serve(app.app) as port:
        client = SseClient("127.0.0.1", port)
        try:
            gen = client.stream("/forever", {})
            async for status, batch in gen:
                assert status == 200 and batch[0] == {"i": 0}
                break
            await gen.aclose()
            assert app.forever_started.is_set()
            # the server notices the disconnect and stops generating
            await asyncio.wait_for(app.forever_closed.wait(), 3)
            assert not client._idle
            await asyncio.sleep(0.05)
            assert not client._open
            # a new request opens a new connection and works
            assert [e["i"] for e in _events(await _collect(client, "/count", {"n": 2}))] == [0, 1]
            assert len(set(app.client_ports)) == 2
        finally:
            await client.aclose()


async def test_sse_client_retries_after_the_server_closed_an_idle_connection():
    app = SseApp()
    async with serve(app.app, timeout_keep_alive=1) as port:
        client = SseClient("127.0.0.1", port)
        try:
            assert [e["i"] for e in _events(await _collect(client, "/count", {"n": 2}))] == [0, 1]
            await asyncio.sleep(1.5)  # uvicorn closes the idle connection meanwhile
            assert [e["i"] for e in _events(await _collect(client, "/count", {"n": 3}))] == [0, 1, 2]
            assert len(app.client_ports) == 2 and app.client_ports[0] != app.client_ports[1]
            assert len(client._open) == 1
        finally:
            await client.aclose()


class RawServer:
    """A bare HTTP/1.1 server (asyncio streams) answering with sized SSE bodies; ``script(conn, req)``
    says what to do with the ``req``-th request (from 0) of the ``conn``-th connection:
    "answer", "close" (close without answering) or "partial" (one event, then close)."""

    def __init__(self, script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[tuple[int, int, dict]] = []
        self._writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        for w in self._writers:
            w.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = self.connections
        self.connections += 1
        self._writers.append(writer)
        try:
            req = 0
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = json.loads(await reader.readexactly(length))
                self.requests.append((conn, req, body))
                action = self.script(conn, req)
                if action == "close":
                    writer.close()
                    return
                n = body["n"]
                events = b"".join(b"data: %s\n\n" % json.dumps({"i": k}).encode() for k in range(n))
                if action == "partial":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(events), events))
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    writer.close()
                    return
                payload = events + b"data: [DONE]\n\n"
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
                await writer.drain()
                req += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


async def test_sse_client_resends_a_request_the_kept_connection_dropped_unanswered():
    # the second request on the first connection meets a server that closes it without a byte:
    # nothing was answered, so the client sends it again on a fresh connection
    async with RawServer(lambda conn, req: "close" if (conn, req) == (0, 1) else "answer") as server:
        client = SseClient("127.0.0.1", server.port)
        try:
            assert [e["i"] for e in _events(await _collect(client, "/x", {"n": 2}))] == [0, 1]
            assert [e["i"] for e in _events(await _collect(client, "/x", {"n": 3}))] == [0, 1, 2]
            assert server.connections == 2
            assert [(c, r, b["n"]) for c, r, b in server.requests] == [(0, 0, 2), (0, 1, 3), (1, 0, 3)]
        finally:
            await client.aclose()


async def test_sse_client_does_not_resend_a_request_that_was_partly_answered():
    async with RawServer(lambda conn, req: "partial" if (conn, req) == (0, 1) else "answer") as server:
        client = SseClient("127.0.0.1", server.port)
        try:
            assert [e["i"] for e in _events(await _collect(client, "/x", {"n": 1}))] == [0]
            got = []
            with pytest.raises(ConnectionLost) as info:
                async for status, batch in client.stream("/x", {"n": 2}):
                    assert status == 200
                    got.extend(batch)
            assert [e["i"] for e in got] == [0, 1]
            assert info.value.answered
            assert server.connections == 1 and len(server.requests) == 2
        finally:
            await client.aclose()


# ====================================================================== chunk merging


def _chat(content=None, *, index=0, role=None, finish=None, lp=None, tool_calls=None, cid="chat-1"):
    delta = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    choice = {"index": index, "delta": delta, "finish_reason": finish}
    if lp is not None:
        choice["logprobs"] = {"content": [{"token": content, "logprob": lp, "bytes": list(content.encode()),
                                           "top_logprobs": [{"token": content, "logprob": lp}]}]}
    return {"id": cid, "object": "chat.completion.chunk", "choices": [choice]}


def _usage(cid="chat-1", prompt=5, completion=3):
    return {"id": cid, "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                                "total_tokens": prompt + completion}}


def _text(text, *, index=0, finish=None, lp=None, cid="cmpl-1", offset=0):
    choice = {"index": index, "text": text, "finish_reason": finish}
    if lp is not None:
        choice["logprobs"] = {"tokens": [text], "token_logprobs": [lp], "top_logprobs": [{text: lp, "zz": lp - 1}],
                              "text_offset": [offset]}
    return {"id": cid, "object": "text_completion", "choices": [choice]}


def test_chat_chunks_merges_consecutive_content_deltas_with_logprobs():
    out = protocol.chat_chunks([
        _chat("Hi", role="assistant", lp=-0.1),
        _chat(" there", lp=-0.2),
        _chat("!", lp=-0.3),
    ])
    assert len(out) == 1
    msg = out[0]
    assert msg.id == "chat-1" and not msg.HasField("usage")
    assert len(msg.choices) == 1
    choice = msg.choices[0]
    assert (choice.index, choice.role, choice.content) == (0, pb.CHAT_ROLE_ASSISTANT, "Hi there!")
    assert choice.finish_reason == pb.FINISH_REASON_UNSPECIFIED
    assert [t.token for t in choice.logprobs] == ["Hi", " there", "!"]
    assert [t.logprob for t in choice.logprobs] == pytest.approx([-0.1, -0.2, -0.3])
    assert [t.bytes for t in choice.logprobs] == [b"Hi", b" there", b"!"]
    assert [t.top_logprobs[0].token for t in choice.logprobs] == ["Hi", " there", "!"]


def test_chat_chunks_of_one_chunk_is_chat_chunk():
    chunk = _chat("Hi", role="assistant", lp=-0.1, finish="stop")
    assert protocol.chat_chunks([chunk]) == [protocol.chat_chunk(chunk)]
    assert protocol.chat_chunks([]) == []


def test_chat_chunks_sets_the_usage_that_ends_a_batch_on_the_last_message():
    out = protocol.chat_chunks([
        _chat("", role="assistant"),
        _chat("a"),
        _chat("b", finish="stop"),
        _usage(),
    ])
    # one message: the merged deltas, the finish reason and the usage that came with them
    assert len(out) == 1
    assert out[0].choices[0].content == "ab" and out[0].choices[0].finish_reason == pb.FINISH_REASON_STOP
    assert out[0].usage.prompt_tokens == 5 and out[0].usage.completion_tokens == 3
    # a usage chunk alone in its batch stays a message of its own, without choices
    alone = protocol.chat_chunks([_usage()])
    assert len(alone) == 1 and not alone[0].choices and alone[0].usage.completion_tokens == 3
    # a message that carries a usage already keeps it (the usage chunk stays apart)
    both = protocol.chat_chunks([dict(_chat("a", finish="stop"), usage={"prompt_tokens": 1, "completion_tokens": 1}),
                                 _usage()])
    assert [m.usage.completion_tokens for m in both] == [1, 3] and not both[1].choices


def test_chat_chunks_never_merges_into_or_from_a_usage_chunk():
    # an engine reporting usage on every chunk (continuous usage stats): nothing merges
    with_usage = [dict(_chat(t), usage={"prompt_tokens": 1, "completion_tokens": k + 1})
                  for k, t in enumerate("abc")]
    out = protocol.chat_chunks(with_usage)
    assert [m.choices[0].content for m in out] == ["a", "b", "c"]
    assert [m.usage.completion_tokens for m in out] == [1, 2, 3]
    # and content after a usage chunk does not join it
    out = protocol.chat_chunks([_chat("a"), _usage(), _chat("b")])
    assert [len(m.choices) for m in out] == [1, 0, 1]
    assert out[2].choices[0].content == "b" and not out[2].HasField("usage")


def test_chat_chunks_a_finished_choice_ends_the_run():
    out = protocol.chat_chunks([
        _chat("a", role="assistant"),
        _chat("b", finish="length"),
        _chat("c"),
        _chat("d"),
    ])
    assert len(out) == 2
    assert (out[0].choices[0].content, out[0].choices[0].finish_reason) == ("ab", pb.FINISH_REASON_LENGTH)
    assert (out[1].choices[0].content, out[1].choices[0].finish_reason) == ("cd", pb.FINISH_REASON_UNSPECIFIED)


def test_chat_chunks_does_not_merge_tool_call_deltas():
    out = protocol.chat_chunks([
        _chat(None, role="assistant"),
        _chat(None, tool_calls=[{"index": 0, "id": "call_1", "type": "function",
                                 "function": {"name": "get_weather", "arguments": ""}}]),
        _chat(None, tool_calls=[{"index": 0, "function": {"arguments": '{"city": '}}]),
        _chat(None, tool_calls=[{"index": 0, "function": {"arguments": '"Paris"}'}}]),
        _chat(None, finish="tool_calls"),
        _usage(),
    ])
    tool_msgs = [m for m in out if m.choices and m.choices[0].tool_calls]
    assert len(tool_msgs) == 3
    assert all(len(m.choices[0].tool_calls) == 1 for m in tool_msgs)
    first = tool_msgs[0].choices[0].tool_calls[0]
    assert (first.id, first.name) == ("call_1", "get_weather")
    assert "".join(m.choices[0].tool_calls[0].arguments for m in tool_msgs) == '{"city": "Paris"}'
    assert [m.choices[0].tool_calls[0].arguments for m in tool_msgs] == ["", '{"city": ', '"Paris"}']
    assert out[-1].HasField("usage") and out[-1].choices[0].finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert [m.HasField("usage") for m in out].count(True) == 1
    finishes = [c.finish_reason for m in out for c in m.choices if c.finish_reason]
    assert finishes == [pb.FINISH_REASON_TOOL_CALLS]
    # content right before a tool call is not merged into the tool-call message either
    out = protocol.chat_chunks([_chat("Let me check.", role="assistant"),
                                _chat(None, tool_calls=[{"index": 0, "id": "c", "function": {"name": "f"}}])])
    assert len(out) == 2 and not out[0].choices[0].tool_calls and out[1].choices[0].content == ""


def test_chat_chunks_merges_interleaved_choices_per_index():
    out = protocol.chat_chunks([
        _chat("A", index=0, role="assistant", lp=-1.0),
        _chat("B", index=1, role="assistant", lp=-2.0),
        _chat("C", index=0, lp=-3.0),
        _chat("D", index=1, lp=-4.0),
        _chat("E", index=0, lp=-5.0, finish="stop"),
        _chat("F", index=1, lp=-6.0, finish="length"),
        _usage(),
    ])
    # one choice per message, as OpenAI streams send them; each choice's deltas merged in order (the
    # usage rides on the last message)
    assert len(out) == 2
    assert [len(m.choices) for m in out[:2]] == [1, 1]
    by_index = {m.choices[0].index: m.choices[0] for m in out[:2]}
    assert set(by_index) == {0, 1}
    assert (by_index[0].content, by_index[0].finish_reason, by_index[0].role) == \
        ("ACE", pb.FINISH_REASON_STOP, pb.CHAT_ROLE_ASSISTANT)
    assert (by_index[1].content, by_index[1].finish_reason, by_index[1].role) == \
        ("BDF", pb.FINISH_REASON_LENGTH, pb.CHAT_ROLE_ASSISTANT)
    assert [t.logprob for t in by_index[0].logprobs] == [-1.0, -3.0, -5.0]
    assert [t.logprob for t in by_index[1].logprobs] == [-2.0, -4.0, -6.0]
    assert out[1].usage.completion_tokens == 3 and not out[0].HasField("usage")


def test_complete_chunks_merges_text_and_logprobs():
    out = protocol.complete_chunks([_text("x", lp=-0.5), _text("y", lp=-0.25, offset=1), _text("z", lp=-1.0, offset=2)])
    assert len(out) == 1
    choice = out[0].choices[0]
    assert out[0].id == "cmpl-1"
    assert (choice.index, choice.text, choice.finish_reason) == (0, "xyz", pb.FINISH_REASON_UNSPECIFIED)
    assert [t.token for t in choice.logprobs] == ["x", "y", "z"]
    assert [t.logprob for t in choice.logprobs] == [-0.5, -0.25, -1.0]
    assert [[a.token for a in t.top_logprobs] for t in choice.logprobs] == [["x", "zz"], ["y", "zz"], ["z", "zz"]]


def test_complete_chunks_keeps_an_unset_echoed_first_logprob():
    echo = {"id": "cmpl-1", "choices": [{"index": 0, "text": "ab", "finish_reason": None, "logprobs": {
        "tokens": ["a", "b"], "token_logprobs": [None, -1.0], "top_logprobs": [None, {"b": -1.0}],
        "text_offset": [0, 1]}}]}
    out = protocol.complete_chunks([echo, _text("c", lp=-2.0)])
    assert len(out) == 1
    lps = out[0].choices[0].logprobs
    assert out[0].choices[0].text == "abc"
    assert not lps[0].HasField("logprob") and [t.logprob for t in lps[1:]] == [-1.0, -2.0]


def test_complete_chunks_usage_and_finish_end_runs():
    out = protocol.complete_chunks([
        _text("a"), _text("b", finish="stop"), _text("c"), _text("d", finish="length"),
        {"id": "cmpl-1", "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 4}},
        _text("e"),
    ])
    assert [(m.choices[0].text if m.choices else None) for m in out] == ["ab", "cd", None, "e"]
    assert [m.choices[0].finish_reason for m in out if m.choices] == [
        pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_UNSPECIFIED]
    assert [m.HasField("usage") for m in out] == [False, False, True, False]
    assert out[2].usage.completion_tokens == 4


def test_complete_chunks_merges_interleaved_choices_per_index():
    out = protocol.complete_chunks([
        _text("A", index=0, lp=-1.0), _text("B", index=1, lp=-2.0),
        _text("C", index=0, lp=-3.0), _text("D", index=1, lp=-4.0, finish="stop"),
        _text("E", index=0, lp=-5.0, finish="length"),
    ])
    assert [len(m.choices) for m in out] == [1, 1]
    by_index = {m.choices[0].index: m.choices[0] for m in out}
    assert (by_index[0].text, by_index[0].finish_reason) == ("ACE", pb.FINISH_REASON_LENGTH)
    assert (by_index[1].text, by_index[1].finish_reason) == ("BD", pb.FINISH_REASON_STOP)
    assert [t.logprob for t in by_index[0].logprobs] == [-1.0, -3.0, -5.0]
    assert [t.logprob for t in by_index[1].logprobs] == [-2.0, -4.0]


# ====================================================================== pacing
# The timing tests run on a virtual clock (tests/support/virtual_time.py): times are exact, whatever
# the load of the machine.


async def _source(n_items, gap_s, *, log=None, per_batch=1, fail=None):
    """Yields ``n_items`` items as batches of ``per_batch``, ``gap_s`` apart; ``log`` gets the times
    of each batch and "closed" from ``finally``; ``fail`` is raised after the last item."""
    loop = asyncio.get_running_loop()
    try:
        k = 0
        while k < n_items:
            if k:
                await asyncio.sleep(gap_s)
            batch = [{"k": j} for j in range(k, min(k + per_batch, n_items))]
            k += len(batch)
            if log is not None:
                log.append(("batch", loop.time()))
            yield batch
        if fail is not None:
            raise fail
        if log is not None:
            log.append(("end", loop.time()))
    finally:
        if log is not None:
            log.append(("closed", loop.time()))


@virtual_time
async def test_paced_first_batch_at_once_then_at_most_one_per_interval():
    loop = asyncio.get_running_loop()
    log: list = []
    interval = 0.2
    start = loop.time()
    batches: list[tuple[float, list]] = []
    async for batch in paced(_source(25, 0.02, log=log), lambda: interval):
        batches.append((loop.time(), batch))
    finished = loop.time()
    times = [t for t, _ in batches]
    items = [item["k"] for _, b in batches for item in b]
    assert items == list(range(25))  # in order, each once
    # the first token is not delayed, and goes out alone; then one burst per interval (0.48 s of
    # tokens: at 0.2 and 0.4); the end of the stream goes out when it comes (0.48), not at the next slot
    assert [t - start for t in times] == pytest.approx([0.0, 0.2, 0.4, 0.48], abs=1e-9)
    assert batches[0][1] == [{"k": 0}]
    for _, b in batches[1:-1]:
        assert len(b) >= 9, [len(b) for _, b in batches]
    end_time = next(t for kind, t in log if kind == "end")
    assert finished == pytest.approx(end_time, abs=1e-9) and times[-1] == pytest.approx(end_time, abs=1e-9)


async def test_paced_interval_zero_forwards_every_batch():
    source_batches = []

    async def source():
        for k in range(6):
            if k:
                await asyncio.sleep(0.01)
            batch = [{"k": k, "j": 0}, {"k": k, "j": 1}]
            source_batches.append(batch)
            yield batch

    out = [batch async for batch in paced(source(), lambda: 0.0)]
    assert out == source_batches and len(out) == 6


@virtual_time
async def test_paced_forwards_items_before_an_error_then_raises_it():
    loop = asyncio.get_running_loop()
    error = ValueError("engine failed")
    got = []
    start = loop.time()
    with pytest.raises(ValueError) as info:
        async for batch in paced(_source(3, 0.02, fail=error), lambda: 0.5):
            got.extend(batch)
    assert info.value is error
    assert got == [{"k": 0}, {"k": 1}, {"k": 2}]
    assert loop.time() - start == pytest.approx(0.04)  # the error did not wait for the next slot (0.5)


@virtual_time
async def test_paced_close_early_closes_the_source():
    log: list = []
    gen = paced(_source(10_000, 0.01, log=log), lambda: 0.05)
    first = await gen.__anext__()
    assert first == [{"k": 0}]
    second = await gen.__anext__()
    assert second and second[0] == {"k": 1}
    assert not any(kind == "closed" for kind, _ in log)
    await gen.aclose()
    assert any(kind == "closed" for kind, _ in log)
    assert not any(kind == "end" for kind, _ in log)
    n_batches = sum(kind == "batch" for kind, _ in log)
    await asyncio.sleep(0.05)
    assert sum(kind == "batch" for kind, _ in log) == n_batches  # nothing reads the source any more


@virtual_time
async def test_pacer_paces_only_with_enough_open_streams():
    loop = asyncio.get_running_loop()
    pacer = Pacer(interval_s=0.2, min_streams=2)
    assert pacer.open_streams == 0 and pacer.interval() == 0.0

    # one stream: not paced, every batch forwarded as it comes
    single = pacer.stream(_source(5, 0.02))
    out = [await single.__anext__()]
    assert pacer.open_streams == 1 and pacer.interval() == 0.0
    out += [batch async for batch in single]
    assert out == [[{"k": k}] for k in range(5)]
    assert pacer.open_streams == 0

    # two streams: paced
    log_a: list = []
    log_b: list = []
    started = loop.time()
    a = pacer.stream(_source(10, 0.02, log=log_a))
    b = pacer.stream(_source(10, 0.02, log=log_b))
    first_a = await a.__anext__()
    assert pacer.open_streams == 1 and pacer.interval() == 0.0
    first_b = await b.__anext__()
    assert pacer.open_streams == 2 and pacer.interval() == 0.2
    assert first_a == [{"k": 0}] and first_b == [{"k": 0}]

    async def rest(gen):
        got = []
        async for batch in gen:
            got.append((loop.time(), batch))
        return got

    rest_a, rest_b = await asyncio.gather(rest(a), rest(b))
    assert pacer.open_streams == 0 and pacer.interval() == 0.0
    for first, rest_batches, log in ((first_a, rest_a, log_a), (first_b, rest_b, log_b)):
        items = first + [item for _, batch in rest_batches for item in batch]
        assert [i["k"] for i in items] == list(range(10))
        # 9 items over 0.18 s, under one interval: one message when the stream ends, not 9
        assert [(t, len(batch)) for t, batch in rest_batches] == [(pytest.approx(started + 0.18), 9)]
        assert any(kind == "closed" for kind, _ in log)


async def test_pacer_stream_closed_early_counts_down_and_closes_the_source():
    pacer = Pacer(interval_s=0.2, min_streams=1)
    log: list = []
    gen = pacer.stream(_source(10_000, 0.01, log=log))
    assert await gen.__anext__() == [{"k": 0}]
    assert pacer.open_streams == 1 and pacer.interval() == 0.2
    await gen.aclose()
    assert pacer.open_streams == 0
    assert any(kind == "closed" for kind, _ in log)


async def test_pacer_with_zero_interval_forwards_batches_unchanged():
    pacer = Pacer(interval_s=0.0, min_streams=1)
    out = []
    async for batch in pacer.stream(_source(6, 0.005, per_batch=2)):
        assert pacer.open_streams == 1 and pacer.interval() == 0.0
        out.append(batch)
    assert out == [[{"k": 0}, {"k": 1}], [{"k": 2}, {"k": 3}], [{"k": 4}, {"k": 5}]]
    assert pacer.open_streams == 0


@virtual_time
async def test_pacer_forwards_a_stream_the_engine_paced_as_it_comes_and_counts_it():
    pacer = Pacer(interval_s=0.2, min_streams=1)
    log: list = []
    out = []
    async for batch in pacer.stream(_source(6, 0.01, log=log), pace=False):
        assert pacer.open_streams == 1 and pacer.interval() == 0.2  # counted: others are paced by it
        out.append(batch)
    assert out == [[{"k": k}] for k in range(6)]  # 6 messages in 0.06 s: not merged
    assert pacer.open_streams == 0 and any(kind == "closed" for kind, _ in log)


def test_stream_rate_is_a_moving_average_of_finished_streams_per_stream_rate():
    rate = StreamRate(weight=0.5)
    assert rate.tokens_per_s == 0 and rate.tokens_per_message(0.2) == 1  # nothing measured: one token
    rate.observe(1, 0.5)  # one token: no rate
    rate.observe(5, 0.0)
    assert rate.tokens_per_s == 0
    rate.observe(101, 1.0)  # 100 tokens after the first in 1 s
    assert rate.tokens_per_s == pytest.approx(100)
    rate.observe(51, 1.0)
    assert rate.tokens_per_s == pytest.approx(75)
    assert rate.tokens_per_message(0.2) == 15 and rate.tokens_per_message(0.01) == 1
    assert rate.tokens_per_message(0.0) == 1  # not paced


async def test_engine_streams_measure_the_per_stream_rate_and_vllm_sends_its_stream_interval(tmp_path):
    app = SseApp()
    async with serve(app.app) as port:
        engine = VllmEngine(EngineSpec("d", tmp_path, "m", port, tmp_path), vllm_python=tmp_path / "python")
        try:
            async def run(**body) -> list[dict]:
                return [c async for batch in engine.chat({"model": "m", "messages": [], **body}, interval_s=0.25)
                        for c in batch]

            burst = await run(max_tokens=30)  # all at once: no rate from it
            assert len(burst) == 31 and engine.stream_rate.tokens_per_s == 0
            assert "stream_interval" not in app.bodies[-1]

            await run(max_tokens=11, delay=0.02)  # 10 tokens after the first in 0.2 s: ~50 tokens/s
            # Real sockets on a real clock: a loaded machine only stretches the stream, so the bounds are
            # wide (up to 1.25 s for the 10 tokens) and still prove it was measured, not a burst (0).
            assert 8 < engine.stream_rate.tokens_per_s < 200
            await run(max_tokens=11, delay=0.02, n=2)  # n > 1: the choices share the time, not counted
            measured = engine.stream_rate.tokens_per_s
            await run(max_tokens=2)
            assert engine.stream_rate.tokens_per_s == measured
            assert app.bodies[-1]["stream_interval"] == int(measured * 0.25) >= 2  # what vLLM is asked
            assert app.bodies[-1]["stream"] is True and app.bodies[-1]["stream_options"] == {"include_usage": True}
        finally:
            await engine.stop()


def test_vllm_engine_asks_for_about_one_interval_of_tokens_per_chunk_once_it_knows_the_rate(tmp_path):
    engine = VllmEngine(EngineSpec("d", tmp_path, "m", 1, tmp_path), vllm_python=tmp_path / "python")
    assert engine.stream_fields(0.25) == {} and not engine.paces_stream(0.25)  # rate unknown
    engine.stream_rate.observe(41, 1.0)  # 40 tokens/s per stream
    assert engine.stream_fields(0.25) == {"stream_interval": 10} and engine.paces_stream(0.25)
    assert engine.stream_fields(0.0) == {} and not engine.paces_stream(0.0)  # the service is not pacing
    assert engine.stream_fields(0.02) == {} and not engine.paces_stream(0.02)  # under a token per interval
    transformers = TransformersEngine(EngineSpec("d", tmp_path, "m", 1, tmp_path), pacing=Pacing(0.1, 0.25, 80, 8))
    assert transformers.paces_stream(0.1) and transformers.stream_fields(0.1) == {}
    assert not TransformersEngine(EngineSpec("d", tmp_path, "m", 1, tmp_path)).paces_stream(0.1)


def test_pacer_interval_grows_with_open_streams_between_floor_and_ceiling():
    pacer = Pacer(interval_s=0.05, min_streams=8, max_interval_s=0.25, messages_per_s=320)
    expected = {1: 0.0, 7: 0.0, 8: 0.05, 16: 0.05, 32: 0.1, 64: 0.2, 80: 0.25, 500: 0.25}
    for streams, interval in expected.items():
        pacer.open_streams = streams
        assert pacer.interval() == pytest.approx(interval), streams
    # no message budget: the floor, whatever the load; a zero floor: never paced
    assert Pacer(0.05, 1, max_interval_s=0.25).interval() == 0.0
    flat = Pacer(0.05, 1, max_interval_s=0.25)
    flat.open_streams = 200
    assert flat.interval() == 0.05
    off = Pacer(0.0, 1, max_interval_s=0.25, messages_per_s=320)
    off.open_streams = 200
    assert off.interval() == 0.0


def _reference_merge(msgs, can_extend, can_continue, extend):
    """The merge rule stated on protos, one message per engine chunk (what chat_chunks must equal)."""
    out, open_by_index = [], {}
    for msg in msgs:
        if msg.HasField("usage") or len(msg.choices) != 1:
            out.append(msg)
            open_by_index.clear()
            continue
        c = msg.choices[0]
        acc = open_by_index.get(c.index)
        if acc is not None and can_extend(acc.choices[0]) and can_continue(c):
            extend(acc.choices[0], c)
            continue
        out.append(msg)
        open_by_index[c.index] = msg
    if len(out) > 1 and not out[-1].choices and out[-1].HasField("usage") and not out[-2].HasField("usage"):
        out[-2].usage.CopyFrom(out.pop().usage)  # the usage that ends the batch rides on the message before
    return out


def _extend(acc, c, field):
    setattr(acc, field, getattr(acc, field) + getattr(c, field))
    acc.logprobs.extend(c.logprobs)
    acc.finish_reason = c.finish_reason


def test_chunk_merging_equals_the_per_chunk_rule_on_random_streams():
    import random

    rng = random.Random(7)
    for _ in range(300):
        chat, complete = [], []
        for _ in range(rng.randint(0, 12)):
            index = rng.choice([0, 0, 1])
            text = rng.choice(["a", "bc", "é", "", " \"x\"\n"])
            lp = rng.choice([None, -0.5])
            finish = rng.choice([None, None, None, "stop", "length"])
            if rng.random() < 0.08:
                chat.append(_usage())
                complete.append(_usage())
                continue
            c = _chat(text, index=index, role=rng.choice([None, None, "assistant"]), lp=lp, finish=finish)
            if rng.random() < 0.1:
                c["choices"][0]["delta"]["tool_calls"] = [
                    {"index": 0, "id": "call_1", "function": {"name": "f", "arguments": "{}"}}]
            chat.append(c)
            complete.append(_text(text, index=index, lp=lp, finish=finish))
        want_chat = _reference_merge([protocol.chat_chunk(c) for c in chat],
                                     lambda a: not a.finish_reason and not a.tool_calls,
                                     lambda c: not c.tool_calls and not c.role,
                                     lambda a, c: _extend(a, c, "content"))
        want_complete = _reference_merge([protocol.complete_chunk(c) for c in complete],
                                         lambda a: not a.finish_reason, lambda c: True,
                                         lambda a, c: _extend(a, c, "text"))
        assert protocol.chat_chunks(chat) == want_chat, chat
        assert protocol.complete_chunks(complete) == want_complete, complete


def test_engine_merge_deltas_joins_each_choices_run_and_keeps_other_events_in_place():
    from services.inference.engines.scheduler import Event, TokenInfo
    from services.inference.engines.transformers_server import merge_deltas

    def delta(index, text, finish=None):
        return Event("delta", index=index, text=text, tokens=[TokenInfo(len(text), text, -0.5, [])],
                     finish_reason=finish)

    out = merge_deltas([delta(0, "a"), delta(1, "x"), delta(0, "b"), delta(1, "y", "stop"), delta(1, "z"),
                        delta(0, "c", "length"), Event("done", prompt_tokens=3, completion_tokens=6)])
    assert [(e.kind, e.index, e.text, e.finish_reason) for e in out] == [
        ("delta", 0, "abc", "length"), ("delta", 1, "xy", "stop"), ("delta", 1, "z", None), ("done", 0, "", None)]
    assert [t.text for t in out[0].tokens] == ["a", "b", "c"]
    # an event other than a delta ends every run: nothing after it merges into a delta before it
    out = merge_deltas([delta(0, "a"), Event("prompt", tokens=[]), delta(0, "b")])
    assert [(e.kind, e.text) for e in out] == [("delta", "a"), ("prompt", ""), ("delta", "b")]
    assert merge_deltas([]) == []
