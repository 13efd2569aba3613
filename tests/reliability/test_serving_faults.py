"""Serving under faults, on real processes (tests/support/serving_stack.py): the registry, the
inference service with the transformers engine (a tiny random model) and the gateway, each a process
of its own, driven through the gateway with the official ``openai`` client and httpx.

- the engine SIGKILLed under 32 open streams: every client gets an error within 5 s, none hangs; the
  inference service's readiness (gRPC health of its service name) and the gateway's
  ``/readyz?model=`` say not ready until the supervisor has the engine back, then requests succeed;
- 32 clients disconnecting mid-stream: the engine's running requests are back to the baseline within 2 s;
- SIGTERM of the gateway, then of the inference service, under 32 open streams: readiness / health
  turn NOT_SERVING first, the streams that finish within the grace period succeed, a new request gets
  503 in the OpenAI error shape, a stream longer than the grace period ends with an error (no hang),
  and the process exits 0.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.serving_stack import INFERENCE_SERVICE, SERVING, ServingStack, kill, wait_until

pytestmark = [pytest.mark.timeout(400)]

STREAMS = 32
GATEWAY_NOTICE_S = 1.5
GATEWAY_GRACE_S = 30.0
INFERENCE_NOTICE_S = 1.0
INFERENCE_GRACE_S = 6.0
ENDLESS = 500_000  # max_tokens of a stream that runs until it is stopped (the model's context is 1M)
GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, s3_settings_module, tiny_model) -> Iterator[ServingStack]:
    work = tmp_path_factory.mktemp("serving")
    model_dir = work / "model"
    shutil.copytree(tiny_model, model_dir)
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["max_position_embeddings"] = 1_000_000  # rotary: nothing is sized by it; streams run until stopped
    config_path.write_text(json.dumps(config))
    s = ServingStack(
        work, s3_settings_module, model_dir=model_dir, max_num_seqs=64,
        inference_env={"YARD_INFERENCE_GRPC__GRACE_PERIOD_S": str(INFERENCE_GRACE_S),
                       "YARD_INFERENCE_GRPC__DRAIN_NOTICE_S": str(INFERENCE_NOTICE_S)},
        gateway_env={"YARD_GATEWAY_HTTP__DRAIN_NOTICE_S": str(GATEWAY_NOTICE_S),
                     "YARD_GATEWAY_HTTP__GRACE_PERIOD_S": str(GATEWAY_GRACE_S)},
    )
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def s3_settings_module(s3_server):
    import uuid

    from services.core.settings import S3Settings

    return S3Settings(endpoint=s3_server.endpoint, access_key=s3_server.access_key,
                      secret_key=s3_server.secret_key, bucket=f"t-{uuid.uuid4().hex[:12]}",
                      connect_retries=2, retry_backoff_s=0.05)


@pytest.fixture
def up(stack: ServingStack) -> ServingStack:
    """The stack with every process running (a test before may have stopped one) and an idle engine."""
    for name in ("registry", "inference", "gateway"):
        if not stack.processes[name].alive:
            stack.restart(name)
    wait_until(lambda: stack.engine_running() == 0, 60, "an idle engine")
    return stack


# ----------------------------------------------------------------------------- clients


@dataclass
class Outcome:
    chunks: int = 0
    finish_reason: str | None = None
    error: BaseException | None = None
    ended: float = 0.0  # time.monotonic() when the stream ended or failed

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_reason is not None


async def run_stream(client: openai.AsyncOpenAI, first_chunk: asyncio.Event, max_tokens: int,
                     out: Outcome, prompt: str = "Count slowly") -> None:
    try:
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, stream=True,
            extra_body={"ignore_eos": True}, **GREEDY)
        async for chunk in stream:
            out.chunks += 1
            first_chunk.set()
            for choice in chunk.choices:
                out.finish_reason = choice.finish_reason or out.finish_reason
    except Exception as exc:  # noqa: BLE001 - recorded: what the test checks
        out.error = exc
    finally:
        out.ended = time.monotonic()
        first_chunk.set()


def openai_client(stack: ServingStack, timeout: float = 120) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.gateway_url + "/v1", api_key=stack.key, max_retries=0, timeout=timeout,
                              http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=200), timeout=timeout))


async def start_streams(client: openai.AsyncOpenAI, counts: list[int]) -> tuple[list[Outcome], list[asyncio.Task]]:
    """One stream per entry of ``counts`` (its max_tokens), each started and past its first chunk."""
    outcomes = [Outcome() for _ in counts]
    firsts = [asyncio.Event() for _ in counts]
    tasks = [asyncio.create_task(run_stream(client, f, n, o)) for f, n, o in zip(firsts, counts, outcomes, strict=True)]
    await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), 120)
    failed = [o.error for o in outcomes if o.error is not None]
    assert not failed, f"streams failed before the fault: {failed[:3]}"
    return outcomes, tasks


def assert_openai_error(reply: httpx.Response, status: int, code: str | None = None) -> dict:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if code is not None:
        assert error["code"] == code, error
    return error


def chat_once(stack: ServingStack, max_tokens: int = 2, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{stack.gateway_url}/v1/chat/completions", timeout=timeout,
                      headers={"authorization": f"Bearer {stack.key}"},
                      json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens})


def tokens_for(seconds: float, stack: ServingStack) -> int:
    """max_tokens that take about ``seconds`` for each of STREAMS concurrent streams (measured now)."""
    async def measure() -> float:
        client = openai_client(stack)
        try:
            outcomes, tasks = await start_streams(client, [40] * STREAMS)
            started = time.monotonic()
            await asyncio.gather(*tasks)
            assert all(o.ok for o in outcomes), [o.error for o in outcomes if o.error][:3]
            return 40 / max(0.05, time.monotonic() - started)
        finally:
            await client.close()

    rate = asyncio.run(measure())  # tokens per second of one stream among STREAMS
    return max(20, int(rate * seconds))


# ----------------------------------------------------------------------------- the tests


def test_engine_sigkill_fails_every_open_stream_within_5s_and_readiness_follows_the_engine(up: ServingStack):
    stack = up
    old_pid = stack.engine_pid()
    assert stack.health("inference", INFERENCE_SERVICE) == SERVING
    assert stack.gateway_routes()

    async def scenario() -> tuple[list[Outcome], float]:
        client = openai_client(stack)
        try:
            outcomes, tasks = await start_streams(client, [ENDLESS] * STREAMS)
            killed = time.monotonic()
            kill(old_pid, signal.SIGKILL)
            done, pending = await asyncio.wait(tasks, timeout=5.0)
            for task in pending:
                task.cancel()
            assert not pending, f"{len(pending)} of {STREAMS} streams still open 5 s after the engine was killed"
            return outcomes, killed
        finally:
            await client.close()

    outcomes, killed = asyncio.run(scenario())
    assert all(isinstance(o.error, openai.APIError) for o in outcomes), [repr(o.error) for o in outcomes[:3]]
    slowest = max(o.ended for o in outcomes) - killed
    print(f"engine SIGKILL: {STREAMS} streams failed within {slowest:.2f}s; first error: {outcomes[0].error}")
    assert slowest < 5.0

    # not ready until the engine is back: the inference service's health and the gateway's readiness
    wait_until(lambda: stack.health("inference", INFERENCE_SERVICE) != SERVING, 5, "inference health NOT_SERVING")
    assert stack.health("inference") == SERVING  # the process itself lives
    wait_until(lambda: not stack.gateway_routes(), 5, "the gateway's /readyz?model= to fail")
    refused = chat_once(stack)
    if stack.health("inference", INFERENCE_SERVICE) != SERVING:  # still restarting (it takes seconds)
        assert_openai_error(refused, 503)
    samples = []  # (gateway ready, inference serving) until both are back
    deadline = time.monotonic() + 180
    while not (stack.gateway_routes() and stack.health("inference", INFERENCE_SERVICE) == SERVING):
        assert time.monotonic() < deadline, f"the engine did not come back\n{stack.log_tails()}"
        time.sleep(0.2)
        samples.append(stack.get_deployment().state)
    back = time.monotonic() - killed
    assert stack.engine_pid() != old_pid  # the supervisor started a new engine
    reply = chat_once(stack)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["finish_reason"]
    print(f"engine back and routed {back:.1f}s after the kill ({len(samples)} samples while not ready)")


def test_client_disconnects_bring_engine_requests_back_to_baseline_within_2s(up: ServingStack):
    stack = up
    url = stack.engine_url()
    baseline = stack.engine_running(url)

    async def scenario() -> float:
        async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=60,
                                     limits=httpx.Limits(max_connections=200)) as client:
            opened = []
            for _ in range(STREAMS):
                ctx = client.stream("POST", "/v1/chat/completions", headers={"authorization": f"Bearer {stack.key}"},
                                    json={"model": "tiny", "messages": [{"role": "user", "content": "go on"}],
                                          "stream": True, "max_tokens": ENDLESS, "ignore_eos": True, **GREEDY})
                opened.append(ctx)
            responses = await asyncio.gather(*(ctx.__aenter__() for ctx in opened))
            assert all(r.status_code == 200 for r in responses)

            # each line iterator is held until the end: an abandoned one would close its connection early
            readers = [r.aiter_lines() for r in responses]

            async def first_event(lines) -> None:
                while not (line := await anext(lines)).startswith("data: {"):
                    pass
                assert '"error"' not in line, line

            await asyncio.wait_for(asyncio.gather(*(first_event(lines) for lines in readers)), 60)
            running = await asyncio.to_thread(stack.engine_running, url)
            assert running == baseline + STREAMS, running
            gone = time.monotonic()
            await asyncio.gather(*(ctx.__aexit__(None, None, None) for ctx in opened))  # the clients hang up
            del readers
            return gone

    gone = asyncio.run(scenario())
    wait_until(lambda: stack.engine_running(url) <= baseline, 2.0, "the engine to drop the abandoned requests",
               interval=0.02)
    took = time.monotonic() - gone
    health = httpx.get(url + "/health", timeout=5).json()
    assert health["running"] + health["waiting"] <= baseline, health
    print(f"{STREAMS} disconnects: the engine was back to {baseline} running requests within {took:.2f}s")


def test_gateway_sigterm_drains_open_streams_and_answers_503(up: ServingStack):
    stack = up
    gateway = stack.processes["gateway"]
    max_tokens = tokens_for(3.0, stack)

    async def scenario() -> tuple[list[Outcome], list[dict], float]:
        client = openai_client(stack)
        probes: list[dict] = []
        try:
            outcomes, tasks = await start_streams(client, [max_tokens] * STREAMS)
            assert not any(t.done() for t in tasks), "a stream ended before SIGTERM: raise max_tokens"
            signalled = time.monotonic()
            gateway.signal(signal.SIGTERM)
            async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=10) as probe:
                # the drain notice: readiness fails first, new requests get 503 while the streams go on
                deadline = signalled + GATEWAY_NOTICE_S * 0.8
                while time.monotonic() < deadline:
                    ready = await probe.get("/readyz")
                    new = await probe.post("/v1/chat/completions", headers={"authorization": f"Bearer {stack.key}"},
                                           json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 2})
                    probes.append({"t": time.monotonic() - signalled, "ready": ready.status_code,
                                   "ready_status": ready.json()["status"], "new": new, "live":
                                   (await probe.get("/healthz")).status_code})
                    await asyncio.sleep(0.1)
            await asyncio.wait_for(asyncio.gather(*tasks), GATEWAY_GRACE_S + 30)
            return outcomes, probes, signalled
        finally:
            await client.close()

    outcomes, probes, signalled = asyncio.run(scenario())
    assert probes, "no probe ran during the drain notice"
    assert all(p["ready"] == 503 and p["ready_status"] == "draining" and p["live"] == 200 for p in probes), probes
    for p in probes:
        assert_openai_error(p["new"], 503, "draining")
        assert p["new"].headers["connection"] == "close" and p["new"].headers["retry-after"]
    failed = [o.error for o in outcomes if not o.ok]
    assert not failed, f"{len(failed)} of {STREAMS} streams failed during the drain: {failed[:3]}"
    code = gateway.wait(timeout=GATEWAY_GRACE_S + 30)
    assert code == 0, gateway.log_tail()
    took = max(o.ended for o in outcomes) - signalled
    print(f"gateway SIGTERM: {len(probes)} probes answered 503 during the notice; {STREAMS} streams of "
          f"{max_tokens} tokens finished {took:.1f}s after the signal; exit code {code}")


def test_inference_sigterm_drains_open_streams_and_new_requests_get_503(up: ServingStack):
    stack = up
    inference = stack.processes["inference"]
    engine_pid = stack.engine_pid()
    max_tokens = tokens_for(2.0, stack)

    async def scenario() -> tuple[list[Outcome], Outcome, dict, float]:
        client = openai_client(stack)
        try:
            outcomes, tasks = await start_streams(client, [max_tokens] * STREAMS + [ENDLESS])
            signalled = time.monotonic()
            inference.signal(signal.SIGTERM)
            seen: dict = {}
            # health first: NOT_SERVING at once, before anything is refused
            while stack.health("inference") == SERVING:
                assert time.monotonic() - signalled < 1.0, "health still SERVING 1 s after SIGTERM"
                await asyncio.sleep(0.02)
            seen["not_serving_after_s"] = time.monotonic() - signalled
            # the gateway reads the health (routing.refresh_interval_s 0.5 s here): new requests get a
            # prompt 503 from then on, during the notice and after it, while the streams go on
            while True:
                asked = time.monotonic()
                reply = await asyncio.to_thread(chat_once, stack)
                assert time.monotonic() - asked < 3.0, "a new request waited on the draining replica"
                if reply.status_code == 503:
                    break
                assert reply.status_code == 200, reply.text
                assert time.monotonic() - signalled < INFERENCE_NOTICE_S + 1.0, "no 503 after the drain notice"
                await asyncio.sleep(0.1)
            seen["first_503_after_s"] = time.monotonic() - signalled
            await asyncio.sleep(max(0.0, signalled + INFERENCE_NOTICE_S + 0.5 - time.monotonic()))
            seen["new"] = await asyncio.to_thread(chat_once, stack)  # after the notice: refused too
            await asyncio.wait_for(asyncio.gather(*tasks), INFERENCE_GRACE_S + 30)
            return outcomes[:-1], outcomes[-1], seen, signalled
        finally:
            await client.close()

    short, endless, seen, signalled = asyncio.run(scenario())
    failed = [o.error for o in short if not o.ok]
    assert not failed, f"{len(failed)} of {STREAMS} streams failed during the drain: {failed[:3]}"
    assert_openai_error(seen["new"], 503)
    # the stream longer than the grace period is cut with an error event, not left hanging
    assert isinstance(endless.error, openai.APIError), endless
    assert endless.ended - signalled < INFERENCE_NOTICE_S + INFERENCE_GRACE_S + 5
    code = inference.wait(timeout=60)
    assert code == 0, inference.log_tail()
    wait_until(lambda: not _alive(engine_pid), 10, "the engine to stop with the service")
    print(f"inference SIGTERM: health NOT_SERVING after {seen['not_serving_after_s'] * 1000:.0f} ms, new requests "
          f"503 from {seen['first_503_after_s']:.2f}s; {STREAMS} streams "
          f"of {max_tokens} tokens succeeded; a new request got {seen['new'].status_code} "
          f"{seen['new'].json()['error']['code']}; the endless stream was cut after "
          f"{endless.ended - signalled:.1f}s; exit code {code}")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False
