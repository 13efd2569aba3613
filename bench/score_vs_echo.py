"""Multiple-choice log-likelihoods on one vLLM deployment: the Score RPC vs lm-evaluation-harness's echo requests.

lm-eval scores a choice with one ``/v1/completions`` request per (question, choice): prompt = the
token ids of context + choice, ``echo``, ``logprobs=1``, ``max_tokens=1``, and reads the prompt
logprobs of the choice's tokens. vLLM then prefills the context again for every choice (a request
with prompt logprobs skips prefix-cache reads). Score sends the question once with all its
choices; the engine computes the context once (prefix cache) and scores each choice on it.

Both sides go through the inference service's gRPC API (Complete with ``prompt_token_ids`` and
echo, as lm-eval's requests arrive there from the gateway; Score), at the same concurrency (8
requests in flight: 8 (question, choice) echo requests, or 8 questions of Score). The echo side's
tokens are lm-eval's ``_encode_pair`` done here with the model's tokenizer; Score encodes the same
text with the same rule, and the token ids are checked equal. Score runs first (the echo requests
never read the prefix cache, so what Score left in it cannot help them). Prints seconds,
requests/s (lm-eval loglikelihood requests: one per choice), the ratio and max |delta logprob|.

    .venv/bin/python bench/score_vs_echo.py                       # SmolLM2 on vLLM, own stack
    .venv/bin/python bench/score_vs_echo.py --questions 100 --dtype float32
    .venv/bin/python bench/score_vs_echo.py --inference-addr 127.0.0.1:50051 --deployment deployments/x \\
        --tokenizer /path/to/model
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
HOST = "127.0.0.1"
WORDS = [
    "river",
    "mountain",
    "capital",
    "ancient",
    "empire",
    "trade",
    "winter",
    "harvest",
    "village",
    "market",
    "bridge",
    "castle",
    "merchant",
    "ocean",
    "island",
    "forest",
    "desert",
    "valley",
    "storm",
    "kingdom",
    "council",
    "treaty",
    "battle",
    "harbor",
    "festival",
    "scholar",
    "library",
    "temple",
    "garden",
    "wheat",
    "copper",
    "silver",
    "iron",
    "coal",
    "railway",
    "canal",
    "bishop",
    "knight",
    "farmer",
    "sailor",
]


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
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900
    )
    if result.returncode:
        raise SystemExit(f"yard {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


@contextmanager
def own_stack(dtype: str, max_num_seqs: int) -> Iterator[tuple[str, str, Path]]:
    """Registry + inference with SmolLM2 deployed on vLLM as ``deployments/score-bench``:
    (inference address, deployment, model folder)."""
    from cli.demo_models import build_smollm2
    from cli.stack import StackSettings, start_stack

    if not VLLM_PYTHON.is_file():
        raise SystemExit(f"vLLM engine not installed ({VLLM_PYTHON} missing): run make engine-vllm")
    with tempfile.TemporaryDirectory(prefix="yard-score-bench-") as tmp:
        data = Path(tmp) / "yard"
        names = ("gateway", "registry", "training", "quantization", "evaluation", "inference", "s3")
        ports = dict(zip(names, _free_ports(len(names)), strict=True))
        os.environ.update(
            OMP_NUM_THREADS="1",
            TOKENIZERS_PARALLELISM="false",
            HF_HUB_OFFLINE="1",
            YARD_INFERENCE_VLLM_PYTHON=str(VLLM_PYTHON),
        )
        settings = StackSettings(
            data_dir=data, only=["registry", "inference"], **{f"port_{k}": v for k, v in ports.items()}
        )
        print(f"starting registry + inference in {data} ...", flush=True)
        stack = start_stack(settings)
        try:
            env = {
                **os.environ,
                "YARD_REGISTRY_ADDR": f"{HOST}:{ports['registry']}",
                "YARD_INFERENCE_ADDR": f"{HOST}:{ports['inference']}",
            }
            folder = build_smollm2()
            _yard(env, "models", "import", str(folder), "--name", "scorebench", "--version", "v1")
            addr = f"{HOST}:{ports['inference']}"
            name = asyncio.run(_deploy(addr, dtype, max_num_seqs))
            yield addr, name, folder
        finally:
            stack.stop()


async def _deploy(addr: str, dtype: str, max_num_seqs: int) -> str:
    from modelyard.client import InferenceClient
    from modelyard.inference.v1 import inference_pb2 as pb

    dtypes = {"auto": pb.DTYPE_UNSPECIFIED, "bfloat16": pb.DTYPE_BFLOAT16, "float32": pb.DTYPE_FLOAT32}
    started = time.monotonic()
    print(f"deploying SmolLM2 on vLLM (dtype {dtype}) ...", flush=True)
    async with InferenceClient(addr, timeout=60) as client:
        await client.deploy(
            pb.Deployment(
                model_version="models/scorebench/versions/v1",
                engine=pb.ENGINE_VLLM,
                options=pb.EngineOptions(
                    dtype=dtypes[dtype], max_model_len=1024, max_num_seqs=max_num_seqs, kv_cache_bytes=2 << 30
                ),
            ),
            deployment_id="score-bench",
        )
        while True:
            d = await client.get_deployment("deployments/score-bench")
            if d.state == pb.DEPLOYMENT_STATE_READY:
                break
            if d.state == pb.DEPLOYMENT_STATE_FAILED or time.monotonic() - started > 600:
                raise SystemExit(f"deployment failed: {d.error.message}")
            await asyncio.sleep(1)
    print(f"deployment READY in {time.monotonic() - started:.0f}s", flush=True)
    return "deployments/score-bench"


# ----------------------------------------------------------------------------- the task


def make_questions(n: int, choices: int, context_words: int, seed: int) -> list[tuple[str, list[str]]]:
    """``n`` questions: a context of about ``context_words`` words ending in ``Answer:`` (about 150
    tokens for 110 words) and ``choices`` answers of 1 to 4 words, each starting with a space."""
    rng = random.Random(seed)
    out = []
    for q in range(n):
        body = " ".join(rng.choice(WORDS) for _ in range(context_words))
        context = f"Passage {q}: {body}.\nQuestion: Which word best completes the passage?\nAnswer:"
        answers = [" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(choices)]
        out.append((context, answers))
    return out


def lm_eval_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness ``_encode_pair`` for API models (no special tokens)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    ctx = tok(context, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx) :]


async def run_echo(client, deployment: str, items: list[tuple[list[int], list[int]]], concurrency: int):
    from modelyard.inference.v1 import inference_pb2 as pb

    sem = asyncio.Semaphore(concurrency)
    sampling = pb.SamplingParams(max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=1)

    async def one(ctx: list[int], cont: list[int]) -> float:
        async with sem:
            lps = [
                lp
                async for c in client.complete(
                    deployment=deployment, prompt_token_ids=[*ctx, *cont], echo=True, sampling=sampling
                )
                for ch in c.choices
                for lp in ch.logprobs
            ]
        return sum(lp.logprob for lp in lps[len(ctx) : len(ctx) + len(cont)])

    return await asyncio.gather(*(one(ctx, cont) for ctx, cont in items))


async def run_score(client, deployment: str, questions: list[tuple[str, list[str]]], concurrency: int):
    sem = asyncio.Semaphore(concurrency)

    async def one(context: str, answers: list[str]):
        async with sem:
            return await client.score(deployment, context=context, continuations=answers)

    return await asyncio.gather(*(one(c, a) for c, a in questions))


async def measure(addr: str, deployment: str, tokenizer_dir: Path, args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from modelyard.client import InferenceClient

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    questions = make_questions(args.questions + 4, args.choices, args.context_words, args.seed)
    warmup, questions = questions[:4], questions[4:]
    items = [lm_eval_pair(tok, c, a) for c, answers in questions for a in answers]
    ctx_tokens = [len(lm_eval_pair(tok, c, answers[0])[0]) for c, answers in questions]
    n_requests = len(items)
    print(
        f"{len(questions)} questions x {args.choices} choices = {n_requests} loglikelihood requests, "
        f"context {min(ctx_tokens)}-{max(ctx_tokens)} tokens (mean {sum(ctx_tokens) / len(ctx_tokens):.0f}), "
        f"concurrency {args.concurrency}",
        flush=True,
    )
    async with InferenceClient(addr, timeout=600) as client:
        await run_score(client, deployment, warmup, args.concurrency)
        await run_echo(client, deployment, [lm_eval_pair(tok, c, a) for c, ans in warmup for a in ans], 8)

        started = time.perf_counter()
        scores = await run_score(client, deployment, questions, args.concurrency)
        score_s = time.perf_counter() - started
        started = time.perf_counter()
        echo = await run_echo(client, deployment, items, args.concurrency)
        echo_s = time.perf_counter() - started

    got = [s for r in scores for s in r.scores]
    mismatched = sum(1 for s, (_, cont) in zip(got, items, strict=True) if s.token_ids != cont)
    delta = max(abs(s.logprob - e) for s, e in zip(got, echo, strict=True))
    same_argmax = sum(
        1
        for q, r in enumerate(scores)
        if max(range(args.choices), key=lambda i: r.scores[i].logprob)
        == max(range(args.choices), key=lambda i: echo[q * args.choices + i])
    )
    print(f"echo (lm-eval style): {echo_s:8.2f} s  {n_requests / echo_s:8.1f} requests/s")
    print(f"Score:                {score_s:8.2f} s  {n_requests / score_s:8.1f} requests/s")
    print(f"ratio Score/echo:     {echo_s / score_s:8.2f}x")
    print(f"max |delta logprob|:  {delta:.2e} (sum over a choice's tokens)")
    print(f"same choice picked:   {same_argmax}/{len(questions)} questions; token ids differing: {mismatched}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument("--choices", type=int, default=6)
    parser.add_argument("--context-words", type=int, default=110, help="about 150 tokens with SmolLM2's tokenizer")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--inference-addr", help="a running inference service (with --deployment, --tokenizer)")
    parser.add_argument("--deployment")
    parser.add_argument("--tokenizer", type=Path)
    args = parser.parse_args()
    if args.inference_addr:
        if not args.deployment or not args.tokenizer:
            parser.error("--inference-addr needs --deployment and --tokenizer")
        asyncio.run(measure(args.inference_addr, args.deployment, args.tokenizer, args))
        return
    with own_stack(args.dtype, args.max_num_seqs) as (addr, deployment, folder):
        asyncio.run(measure(addr, deployment, folder, args))


if __name__ == "__main__":
    main()
