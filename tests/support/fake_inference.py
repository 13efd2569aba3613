"""A real gRPC InferenceService with scripted answers, for testing the gateway (the gateway is
what is under test; this fake only plays the inference service over real gRPC).

The last message (chat) or the prompt (completions) picks the script:
- anything else: the reply ``Hello from the fake`` (one token a chunk; ``max_tokens`` cuts it,
  finish ``length``), n choices, logprobs when asked, then a usage chunk;
- ``FAIL_MIDSTREAM``: two chunks, then INTERNAL (reason ENGINE_CRASHED);
- ``HANG``: one chunk, then nothing until cancelled (the cancellation is recorded);
- ``SAY_THE_WORD``: the reply ``This is forbidden stuff``;
- ``REJECT``: INVALID_ARGUMENT on ``sampling.temperature`` before any chunk.
Prompt tokens are whitespace-separated words. Completions with ``echo`` send the prompt first,
with one logprob per prompt word (the first one unset: nothing precedes it).

Chunks are yielded, as the real servicer (``services/inference/servicer.py``) does, so the gateway
meets the same server-side stream handling (a cancelled call cancels or finalizes the generator).

Also here: ``BackgroundLoop`` (an event loop in a thread, for servers shared by sync tests) and
``serve_gateway`` (the gateway app under uvicorn on a free port in that loop).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog

from modelyard.inference.v1 import inference_pb2 as pb
from modelyard.inference.v1 import inference_pb2_grpc as pb_grpc
from services.core.context import current_request_id
from services.core.errors import Internal, InvalidArgument, NotFound, error_class_for
from services.core.grpc_server import GrpcServer
from services.core.logging import configure_logging
from services.core.settings import GrpcServerSettings

REPLY = ["Hello", " from", " the", " fake"]
FORBIDDEN_REPLY = ["This", " is", " forbidden", " stuff"]


def deployment(name: str, state: int = pb.DEPLOYMENT_STATE_READY, adapters: tuple[str, ...] = (),
               served: str = "") -> pb.Deployment:
    dep = pb.Deployment(name=f"deployments/{name}", model_version=f"models/{name}/versions/v1",
                        engine=pb.ENGINE_TRANSFORMERS, state=state, served_model_name=served,
                        adapters=[pb.Adapter(alias=a, model_version=f"models/{a}/versions/v1") for a in adapters])
    dep.create_time.FromSeconds(1_700_000_000)
    return dep


@dataclass
class Call:
    method: str
    request: Any
    request_id: str | None


@dataclass
class FakeInference(pb_grpc.InferenceServiceServicer):
    deployments: list[pb.Deployment] = field(default_factory=lambda: [
        deployment("tiny", adapters=("sql",)), deployment("warming", state=pb.DEPLOYMENT_STATE_CREATING)])
    fail_generation_with: grpc.StatusCode | None = None  # every Chat/Complete/Embed fails at once with it
    chunk_delay_s: float = 0.0
    list_delay_s: float = 0.0  # ListDeployments answers this late (a refresh in flight)
    calls: list[Call] = field(default_factory=list)
    cancelled: list[str | None] = field(default_factory=list)  # request ids of streams the client cancelled

    async def ListDeployments(self, request, context):
        if self.list_delay_s:
            await asyncio.sleep(self.list_delay_s)
        return pb.ListDeploymentsResponse(deployments=self.deployments)

    async def GetDeployment(self, request, context):
        for dep in self.deployments:
            if dep.name == request.name:
                return dep
        raise NotFound(f"deployment {request.name!r} not found", reason="DEPLOYMENT_NOT_FOUND")

    def _record(self, method: str, request) -> None:
        self.calls.append(Call(method, request, current_request_id()))
        if self.fail_generation_with is not None:
            raise error_class_for(self.fail_generation_with)(f"fake replica fails: {self.fail_generation_with.name}")

    async def Chat(self, request: pb.ChatRequest, context):
        self._record("Chat", request)
        script = request.messages[-1].content if request.messages else ""
        prompt_tokens = sum(len(m.content.split()) for m in request.messages)
        async for chunk in self._generate(script, request.sampling, prompt_tokens, chat=True):
            yield chunk

    async def Complete(self, request: pb.CompleteRequest, context):
        self._record("Complete", request)
        prompt_tokens = len(request.prompt.split())
        echo = None
        if request.echo:
            words = request.prompt.split(" ")
            tokens = [w if i == 0 else " " + w for i, w in enumerate(words)]
            echo = pb.CompleteChoiceDelta(text=request.prompt, logprobs=[
                pb.TokenLogprob(token=t, logprob=None if i == 0 else -1.0 - i, bytes=t.encode(),
                                top_logprobs=[] if i == 0 else [pb.TopLogprob(token=t, logprob=-1.0 - i)])
                for i, t in enumerate(tokens)])
        async for chunk in self._generate(request.prompt, request.sampling, prompt_tokens, chat=False, echo=echo):
            yield chunk

    async def _generate(self, script: str, sampling: pb.SamplingParams, prompt_tokens: int, *, chat: bool,
                        echo: pb.CompleteChoiceDelta | None = None):
        try:
            if "REJECT" in script:
                raise InvalidArgument.for_field("sampling.temperature", "the engine refuses it")
            reply = FORBIDDEN_REPLY if "SAY_THE_WORD" in script else REPLY
            limit = sampling.max_tokens if sampling.HasField("max_tokens") else len(reply)
            n = sampling.n if sampling.HasField("n") else 1
            completion = 0
            if echo is not None:  # the prompt first, in its own chunk, for every choice
                yield pb.CompleteChunk(id="cmpl-fake", choices=[
                    pb.CompleteChoiceDelta(index=i, text=echo.text, logprobs=echo.logprobs if sampling.logprobs else [],
                                           finish_reason=pb.FINISH_REASON_LENGTH if limit == 0 else 0)
                    for i in range(n)])
                if limit == 0:
                    yield pb.CompleteChunk(id="cmpl-fake", usage=pb.Usage(prompt_tokens=prompt_tokens))
                    return
            for step, token in enumerate(reply[:limit]):
                if self.chunk_delay_s:
                    await asyncio.sleep(self.chunk_delay_s)
                if "FAIL_MIDSTREAM" in script and step == 2:
                    raise Internal("the engine crashed", reason="ENGINE_CRASHED")
                if "HANG" in script and step == 1:
                    await asyncio.sleep(3600)
                last = step == min(limit, len(reply)) - 1
                finish = (pb.FINISH_REASON_STOP if limit >= len(reply) else pb.FINISH_REASON_LENGTH) if last else 0
                lps = [pb.TokenLogprob(token=token, logprob=-0.5, bytes=token.encode(), top_logprobs=[
                    pb.TopLogprob(token=token, logprob=-0.5, bytes=token.encode()),
                    pb.TopLogprob(token=" other", logprob=-2.0, bytes=b" other")][: sampling.top_logprobs])
                ] if sampling.logprobs else []
                completion += n
                if chat:
                    yield pb.ChatChunk(id="chat-fake", choices=[
                        pb.ChatChoiceDelta(index=i, role=pb.CHAT_ROLE_ASSISTANT if step == 0 else 0, content=token,
                                           finish_reason=finish, logprobs=lps) for i in range(n)])
                else:
                    yield pb.CompleteChunk(id="cmpl-fake", choices=[
                        pb.CompleteChoiceDelta(index=i, text=token, finish_reason=finish, logprobs=lps)
                        for i in range(n)])
            usage = pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion)
            yield pb.ChatChunk(id="chat-fake", usage=usage) if chat else pb.CompleteChunk(id="cmpl-fake", usage=usage)
        except (asyncio.CancelledError, GeneratorExit):  # cancelled while awaiting, or closed at a yield
            self.cancelled.append(current_request_id())
            raise

    async def Tokenize(self, request, context):
        return pb.TokenizeResponse(tokens=list(range(len(request.prompt.split()))), max_model_len=2048)

    async def Embed(self, request: pb.EmbedRequest, context):
        self._record("Embed", request)
        dims = request.dimensions if request.HasField("dimensions") else 3
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(index=i, values=[float(len(t)), float(i), 0.5][:dims])
                        for i, t in enumerate(request.inputs)],
            usage=pb.Usage(prompt_tokens=sum(len(t.split()) for t in request.inputs)))


async def start_fake(fake: FakeInference) -> GrpcServer:
    """The fake as a real gRPC server on a free loopback port (with the chassis' interceptors)."""
    server = GrpcServer(GrpcServerSettings(port=0, grace_period_s=0.5), service="inference", metrics=False)
    server.add_servicer(pb_grpc.add_InferenceServiceServicer_to_server, fake,
                        pb.DESCRIPTOR.services_by_name["InferenceService"].full_name)
    await server.start()
    return server


class BackgroundLoop:
    """An asyncio loop in a daemon thread; ``run`` executes a coroutine there and waits for it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-servers", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class GatewayServer:
    """The gateway app under uvicorn on a free loopback port, in a BackgroundLoop."""

    def __init__(self, bg: BackgroundLoop, app) -> None:
        import uvicorn

        if not structlog.is_configured():
            # as `python -m gateway` does: log lines go to stderr, never into a CLI's captured stdout
            configure_logging(json=False)
        self._bg = bg
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
        self._task = asyncio.run_coroutine_threadsafe(self.server.serve(sockets=[self._sock]), bg.loop)

    def wait_started(self, timeout: float = 20.0) -> None:
        import time

        deadline = time.monotonic() + timeout
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises the startup error
                raise RuntimeError("gateway exited during startup")
            if time.monotonic() > deadline:
                raise TimeoutError("gateway did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self._task.result(20)
        self._sock.close()
