"""Soak: concurrent streams through the gateway for minutes, with API keys and quotas, and one engine
SIGKILL in the middle; prints what was served, the errors by kind, latency, and the memory of
every process at the start and the end.

It starts its own stack (tests/support/serving_stack.py): nanio S3, the registry, the inference
service with the transformers engine, and the gateway, each a process of its own, on free ports in
a temporary folder. ``--model tiny`` (default) serves the tiny random model, so the serving path,
not the model, takes the machine; ``--model smollm2`` serves SmolLM2-135M-Instruct. Keys: one per
8 streams, each with rpm/tpm limits (``--rpm``/``--tpm``; a 429 is counted and the stream waits its
Retry-After). Each stream is a loop of streamed chat completions (``--max-tokens``, ``ignore_eos``)
with the official ``openai`` client.

    .venv/bin/python bench/soak.py                      # 64 streams, 10 minutes, tiny model
    .venv/bin/python bench/soak.py --minutes 2 --streams 16

Memory: RSS of the gateway, the inference service and the engine after a warm-up (``--warmup-s``)
and at the end; the engine is a new process after the kill, so its end figure is compared with the
first engine's figure at the start. Growth is within bounds when every process grew by less than
``--rss-bound-mib`` MiB or ``--rss-bound-pct`` percent, whichever is larger; the exit status is 1
otherwise (or when nothing was served after the engine came back).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli.s3server import start_s3_server  # noqa: E402
from services.core.settings import S3Settings  # noqa: E402
from tests.support.serving_stack import ServingStack  # noqa: E402

PROMPTS = ["Tell me about the sea.", "Count to ten.", "Write a short poem.", "What is a compiler?",
           "Describe a rainy day.", "List some fruits.", "Explain recursion.", "Say something nice."]


@dataclass
class Stats:
    ok: int = 0
    errors: Counter = field(default_factory=Counter)
    latency_s: list[float] = field(default_factory=list)  # whole request, successful ones
    ttft_s: list[float] = field(default_factory=list)
    tokens: int = 0
    after_recovery_ok: int = 0
    recovered_at: float | None = None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, openai.APIStatusError):
        try:
            code = exc.response.json()["error"].get("code")
        except (ValueError, KeyError, AttributeError, TypeError):
            code = None
        return f"http_{exc.status_code}" + (f"_{code}" if code else "")
    if isinstance(exc, openai.APIError):  # an error event in the stream
        body = exc.body if isinstance(exc.body, dict) else {}
        return f"stream_error_{body.get('code') or exc.code or 'unknown'}"
    return type(exc).__name__


async def stream_loop(client: openai.AsyncOpenAI, index: int, args: argparse.Namespace, stats: Stats,
                      stop_at: float) -> None:
    n = 0
    while time.monotonic() < stop_at:
        n += 1
        started = time.monotonic()
        first: float | None = None
        try:
            stream = await client.chat.completions.create(
                model="soak", messages=[{"role": "user", "content": PROMPTS[(index + n) % len(PROMPTS)]}],
                max_tokens=args.max_tokens, stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True}, temperature=0.7, seed=index * 1000 + n)
            async for chunk in stream:
                if first is None and chunk.choices:
                    first = time.monotonic()
                if chunk.usage is not None:
                    stats.tokens += chunk.usage.completion_tokens
        except Exception as exc:  # noqa: BLE001 - every failure is counted by kind
            stats.errors[error_kind(exc)] += 1
            wait = 1.0
            if isinstance(exc, openai.APIStatusError) and exc.status_code in (429, 503):
                try:
                    wait = float(exc.response.headers.get("retry-after") or 1.0)
                except ValueError:
                    wait = 1.0
            await asyncio.sleep(min(wait, 5.0))
            continue
        done = time.monotonic()
        stats.ok += 1
        stats.latency_s.append(done - started)
        stats.ttft_s.append((first or done) - started)
        if stats.recovered_at is not None and started > stats.recovered_at:
            stats.after_recovery_ok += 1


async def kill_engine_midway(stack: ServingStack, at: float, stats: Stats, log: list[str]) -> None:
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    pid = await asyncio.to_thread(stack.engine_pid)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    log.append(f"engine pid {pid} SIGKILLed at {killed - stats_start:.0f}s")
    while not await asyncio.to_thread(stack.gateway_routes):
        await asyncio.sleep(0.2)
    stats.recovered_at = time.monotonic()
    log.append(f"engine back (new pid {await asyncio.to_thread(stack.engine_pid)}) and routed "
               f"{stats.recovered_at - killed:.1f}s after the kill")


async def progress(stats: Stats, stop_at: float, every_s: float) -> None:
    while time.monotonic() < stop_at:
        await asyncio.sleep(every_s)
        errors = sum(stats.errors.values())
        print(f"  {time.monotonic() - stats_start:6.0f}s  served {stats.ok}  errors {errors}  "
              f"p50 {percentile(stats.latency_s[-2000:], 0.5):.2f}s", flush=True)


stats_start = 0.0


async def soak(stack: ServingStack, keys: list[str], args: argparse.Namespace) -> tuple[Stats, list[str], dict, dict]:
    global stats_start
    stats = Stats()
    log: list[str] = []
    clients = [openai.AsyncOpenAI(base_url=stack.gateway_url + "/v1", api_key=key, max_retries=0, timeout=120,
                                  http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=64), timeout=120))
               for key in keys]
    stats_start = time.monotonic()
    stop_at = stats_start + args.minutes * 60
    workers = [asyncio.create_task(stream_loop(clients[i % len(clients)], i, args, stats, stop_at))
               for i in range(args.streams)]
    await asyncio.sleep(args.warmup_s)
    rss_start = await asyncio.to_thread(stack.rss_mib)
    tasks = [asyncio.create_task(progress(stats, stop_at, args.progress_s)),
             asyncio.create_task(kill_engine_midway(stack, stats_start + args.minutes * 60 * args.kill_at, stats, log))]
    await asyncio.gather(*workers)
    rss_end = await asyncio.to_thread(stack.rss_mib)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for client in clients:
        await client.close()
    return stats, log, rss_start, rss_end


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--streams-per-key", type=int, default=8)
    parser.add_argument("--rpm", type=int, default=2000, help="requests per minute of each key")
    parser.add_argument("--tpm", type=int, default=200_000, help="tokens per minute of each key")
    parser.add_argument("--kill-at", type=float, default=0.5, help="when the engine is killed (fraction of the run)")
    parser.add_argument("--warmup-s", type=float, default=30.0, help="RSS 'start' is taken this long after the start")
    parser.add_argument("--progress-s", type=float, default=30.0)
    parser.add_argument("--rss-bound-mib", type=float, default=64.0)
    parser.add_argument("--rss-bound-pct", type=float, default=20.0)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="yard-soak-"))
    s3_server = start_s3_server(work / "s3")
    s3 = S3Settings(endpoint=s3_server.endpoint, access_key=s3_server.access_key, secret_key=s3_server.secret_key,
                    bucket=f"soak-{uuid.uuid4().hex[:8]}")
    model_dir = None
    if args.model == "smollm2":
        from cli.demo_models import build_smollm2

        model_dir = build_smollm2()
    stack = ServingStack(work / "stack", s3, model_dir=model_dir, deployment="soak", max_num_seqs=args.streams,
                         inference_env={"YARD_INFERENCE_LOG_LEVEL": "WARNING"},
                         gateway_env={"YARD_GATEWAY_LOG_LEVEL": "WARNING", "YARD_GATEWAY_TIMEOUTS__FIRST_TOKEN_S": "60"})
    started = time.monotonic()
    keys: list[str] = []
    try:
        stack.start()
        print(f"stack up in {time.monotonic() - started:.0f}s ({work}); model {args.model}, {args.streams} streams, "
              f"{args.minutes:g} min, max_tokens {args.max_tokens}", flush=True)
        keys = [stack.create_key(f"soak-{i}", rpm=args.rpm, tpm=args.tpm)["key"]
                for i in range(max(1, args.streams // args.streams_per_key))]
        stats, log, rss_start, rss_end = asyncio.run(soak(stack, keys, args))
    finally:
        stack.stop()
        s3_server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return report(stats, log, rss_start, rss_end, args, work, len(keys))


def report(stats: Stats, log: list[str], rss_start: dict, rss_end: dict, args: argparse.Namespace, work: Path,
           n_keys: int) -> int:
    seconds = args.minutes * 60
    errors = sum(stats.errors.values())
    print("\n=== soak ===")
    print(f"model {args.model} (transformers engine), {args.streams} concurrent streams, {n_keys} keys "
          f"(rpm {args.rpm}, tpm {args.tpm} each), {args.minutes:g} min, max_tokens {args.max_tokens}")
    for line in log:
        print(f"fault: {line}")
    print(f"requests served: {stats.ok} ({stats.ok / seconds:.1f}/s), completion tokens {stats.tokens} "
          f"({stats.tokens / seconds:.0f}/s); served after the engine came back: {stats.after_recovery_ok}")
    print(f"errors: {errors}" + "".join(f"\n  {kind}: {n}" for kind, n in stats.errors.most_common()))
    print(f"latency (whole stream): p50 {percentile(stats.latency_s, 0.5):.2f}s  p99 "
          f"{percentile(stats.latency_s, 0.99):.2f}s;  time to first token: p50 {percentile(stats.ttft_s, 0.5):.2f}s  "
          f"p99 {percentile(stats.ttft_s, 0.99):.2f}s")
    within = True
    print(f"RSS (MiB) after {args.warmup_s:.0f}s and at the end; bound: +{args.rss_bound_mib:.0f} MiB or "
          f"+{args.rss_bound_pct:.0f}%, whichever is larger")
    for name in ("gateway", "inference", "engine"):
        start, end = rss_start.get(name), rss_end.get(name)
        if start is None or end is None:
            print(f"  {name:9s} start {start}  end {end}  (not measured)")
            continue
        bound = max(args.rss_bound_mib, start * args.rss_bound_pct / 100)
        ok = end - start <= bound
        within &= ok
        note = " (a new process since the kill)" if name == "engine" and log else ""
        print(f"  {name:9s} start {start:7.1f}  end {end:7.1f}  growth {end - start:+7.1f}  "
              f"{'within' if ok else 'BEYOND'} bound {bound:.0f}{note}")
    print(f"memory growth within the bound: {'yes' if within else 'NO'}")
    print(json.dumps({"served": stats.ok, "errors": dict(stats.errors), "p50_s": percentile(stats.latency_s, 0.5),
                      "p99_s": percentile(stats.latency_s, 0.99), "rss_start_mib": rss_start,
                      "rss_end_mib": rss_end, "rss_within_bound": within}))
    if args.keep:
        print(f"logs: {work}")
    return 0 if within and (stats.after_recovery_ok > 0 or not log) else 1


if __name__ == "__main__":
    sys.exit(main())
