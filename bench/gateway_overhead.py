"""Output tokens/s through the gateway vs straight to the engine's own OpenAI server.

Runs the same streaming chat requests (max_tokens fixed, ignore_eos where the engine supports it)
at concurrency 1, 16 and 64 against both URLs, in one run, alternating the order per level, and
prints tokens/s, time to first token p50/p99, and the ratio gateway/engine (target >= 0.95 at 16
and 64). Tokens are the engines' own counts (stream_options.include_usage).

Needs a running stack: an inference deployment and the gateway in front of it, plus the engine's
endpoint (``GetDeployment``'s ``engine_endpoints``, e.g. vLLM's server). Starting the stack
itself is not implemented yet (the inference service is being written).

    .venv/bin/python bench/gateway_overhead.py --gateway-url http://127.0.0.1:8000 \\
        --engine-url http://127.0.0.1:41237 --model tiny [--engine-model NAME] [--api-key sk-yard-...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx


async def one_request(client: httpx.AsyncClient, url: str, model: str, headers: dict, max_tokens: int,
                      ttfts: list[float]) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "Count from one to one hundred."}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True}
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", url.rstrip("/") + "/v1/chat/completions", json=body, headers=headers) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            if first is None and event.get("choices"):
                first = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    ttfts.append(first or 0.0)
    return tokens


async def level(url: str, model: str, headers: dict, concurrency: int, requests: int, max_tokens: int) -> dict:
    ttfts: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_request(client, url, model, headers, 4, [])  # warm the connection and the engine
        queue = list(range(requests))

        async def worker() -> int:
            total = 0
            while queue:
                queue.pop()
                total += await one_request(client, url, model, headers, max_tokens, ttfts)
            return total

        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(worker() for _ in range(concurrency))))
        elapsed = time.perf_counter() - start
    ttfts.sort()
    return {"tokens_per_s": tokens / elapsed, "ttft_p50_ms": 1000 * statistics.median(ttfts),
            "ttft_p99_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway-url", required=True)
    parser.add_argument("--engine-url", required=True)
    parser.add_argument("--model", required=True, help="model name at the gateway")
    parser.add_argument("--engine-model", help="model name at the engine (default: its first /v1/models entry)")
    parser.add_argument("--api-key", default="", help="gateway key (not needed with auth disabled)")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--requests-per-stream", type=int, default=4, help="requests per concurrent stream")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    engine_model = args.engine_model
    if not engine_model:
        engine_model = httpx.get(args.engine_url.rstrip("/") + "/v1/models").json()["data"][0]["id"]
    gw_headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    print(f"{'conc':>5} {'engine tok/s':>13} {'gateway tok/s':>14} {'ratio':>6} "
          f"{'ttft p50 e/g ms':>17} {'ttft p99 e/g ms':>17}")
    for i, c in enumerate(int(x) for x in args.concurrency.split(",")):
        n = c * args.requests_per_stream
        runs = [("engine", args.engine_url, engine_model, {}), ("gateway", args.gateway_url, args.model, gw_headers)]
        if i % 2:
            runs.reverse()  # alternate the order so warm-up effects do not favour one side
        results = {name: await level(url, model, h, c, n, args.max_tokens) for name, url, model, h in runs}
        e, g = results["engine"], results["gateway"]
        print(f"{c:>5} {e['tokens_per_s']:>13.1f} {g['tokens_per_s']:>14.1f} {g['tokens_per_s'] / e['tokens_per_s']:>6.3f} "
              f"{e['ttft_p50_ms']:>8.1f}/{g['ttft_p50_ms']:<8.1f} {e['ttft_p99_ms']:>8.1f}/{g['ttft_p99_ms']:<8.1f}",
              flush=True)


if __name__ == "__main__":
    asyncio.run(main())
