"""Multiple-choice evaluation speed: ModelYard's evaluation service vs lm-evaluation-harness, one deployment.

Starts an in-process stack (nanio, registry, training, inference with the vLLM engine, evaluation) on free
loopback ports, registers SmolLM2-135M-Instruct, deploys it once on vLLM, then on that deployment and the
same BBH multiple-choice task and documents:

1. ModelYard: an evaluation of ``deployments/bench`` (the Score RPC: all choices of a question against one
   shared context, prefix cache on), ``--concurrency`` questions in flight;
2. lm-eval 0.4.13 (``local-completions`` with tokenized requests, ``num_concurrent`` = ``--concurrency``)
   against the engine's own OpenAI server (no gateway hop: the fastest lm-eval can get here), from the
   bench-only virtualenv ``.venv-bench`` (``make engine-bench-eval``).

ModelYard runs first, so lm-eval's requests could not warm a cache that ModelYard reads (and lm-eval's echo
requests cannot read the prefix cache). Prints samples/s of each (questions per second of scoring wall time;
lm-eval's is ``simple_evaluate``'s wall time), the ratio, both accuracies and the largest per-choice
log-likelihood difference.

    .venv/bin/python bench/eval_throughput.py                     # salient_translation_error_detection, 6 choices
    .venv/bin/python bench/eval_throughput.py --task navigate --limit 100 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="salient_translation_error_detection", help="BBH task (multiple-choice variant)")
    p.add_argument("--limit", type=int, default=250, help="documents (the first N)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16", help="vLLM dtype of the deployment")
    p.add_argument("--block-size", type=int, default=32, help="vLLM KV block size (0: vLLM's default, 128 on CPU)")
    p.add_argument("--skip-lmeval", action="store_true", help="only ModelYard")
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p.parse_args()


async def main() -> None:
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from services.core.logging import configure_logging

    configure_logging(level="WARNING", json=False)
    from cli.demo_models import build_smollm2
    from cli.s3server import start_s3_server
    from modelyard.common.v1 import common_pb2 as cpb
    from modelyard.evaluation.v1 import evaluation_pb2 as epb
    from modelyard.inference.v1 import inference_pb2 as ipb
    from modelyard.registry.v1 import registry_pb2 as rpb
    from services.core.artifacts import S3ArtifactStore
    from services.core.settings import S3Settings
    from tests.support.evaluation_stack import evaluation_stack, wait_evaluation

    if not args.skip_lmeval and not BENCH_PYTHON.is_file():
        sys.exit(f"{BENCH_PYTHON} missing: run `make engine-bench-eval` (or pass --skip-lmeval)")
    tmp = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    s3_server = start_s3_server(tmp / "s3")
    s3 = S3Settings(endpoint=s3_server.endpoint, access_key=s3_server.access_key, secret_key=s3_server.secret_key,
                    bucket=f"bench-{uuid.uuid4().hex[:8]}")  # fmt: skip
    model_dir = build_smollm2()
    benchmark = f"bbh_mc:{args.task}"
    figures: dict = {"task": args.task, "limit": args.limit, "concurrency": args.concurrency,
                     "dtype": args.dtype, "block_size": args.block_size}  # fmt: skip
    try:
        async with evaluation_stack(tmp / "stack", s3, vllm=True, inference={"vllm_block_size": args.block_size}) as stack:
            S3ArtifactStore.connect(s3).upload_dir("uploads/smollm2", model_dir)
            base = await stack.registry.create_model_version(
                parent="models/smollm2", version_id="v1", model_version=rpb.ModelVersion(artifact_prefix="uploads/smollm2"))
            dtype = {"bfloat16": ipb.DTYPE_BFLOAT16, "float32": ipb.DTYPE_FLOAT32}[args.dtype]
            await stack.inference.deploy(ipb.Deployment(
                model_version=base.name, engine=ipb.ENGINE_VLLM,
                options=ipb.EngineOptions(dtype=dtype, max_model_len=2048, max_num_seqs=32, kv_cache_bytes=1 << 30)),
                deployment_id="bench")  # fmt: skip
            t0 = time.monotonic()
            while (d := await stack.inference.get_deployment("deployments/bench")).state != ipb.DEPLOYMENT_STATE_READY:
                if d.state == ipb.DEPLOYMENT_STATE_FAILED:
                    sys.exit(f"deployment failed: {d.error.message}")
                await asyncio.sleep(1)
            print(f"vLLM deployment ready in {time.monotonic() - t0:.0f} s ({args.dtype})", flush=True)

            ev = epb.Evaluation(spec=epb.EvaluationSpec(
                deployment="deployments/bench", limit=args.limit, batch_size=args.concurrency,
                benchmarks=[epb.BenchmarkRun(benchmark=f"benchmarks/{benchmark}")]))  # fmt: skip
            created = await stack.evaluation.create_evaluation(ev)
            done = await wait_evaluation(stack.evaluation, created.name, timeout=3600)
            if done.state != cpb.JOB_STATE_SUCCEEDED:
                sys.exit(f"evaluation {done.state}: {done.error.message}")
            r = done.outputs.results[0]
            secs = r.duration.seconds + r.duration.nanos / 1e9
            store = S3ArtifactStore.connect(s3)
            rows = [json.loads(x) for x in store.get_bytes(r.predictions_artifact_key).decode().splitlines() if x]
            yard = {"seconds": secs, "samples": r.num_samples, "samples_per_s": r.num_samples / secs,
                    "acc": r.metrics["acc"], "acc_norm": r.metrics.get("acc_norm")}  # fmt: skip
            figures["modelyard"] = yard
            print(f"ModelYard: {r.num_samples} samples in {secs:.1f} s = {yard['samples_per_s']:.2f} samples/s, "
                  f"acc {yard['acc']:.4f}", flush=True)  # fmt: skip
            if not args.skip_lmeval:
                dep = await stack.inference.get_deployment("deployments/bench")
                out = tmp / "lmeval.json"
                cmd = [str(BENCH_PYTHON), str(ROOT / "bench" / "lmeval_runner.py"),
                       "--base-url", dep.engine_endpoints[0].rstrip("/") + "/v1/completions",
                       "--model", dep.served_model_name or "bench", "--tokenizer", str(model_dir),
                       "--tasks", f"bbh_mc_{args.task}", "--limit", str(args.limit),
                       "--concurrency", str(args.concurrency), "--output", str(out)]  # fmt: skip
                subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                lm = json.loads(out.read_text())
                task = lm["tasks"][f"bbh_mc_{args.task}"]
                figures["lmeval"] = {"seconds": lm["seconds"], "samples": lm["samples"],
                                     "samples_per_s": lm["samples_per_s"], "acc": task["acc"],
                                     "acc_norm": task.get("acc_norm")}  # fmt: skip
                ours = {str(x["doc_id"]): x["extra"]["loglikelihoods"] for x in rows}
                theirs = {str(x["doc_id"]): x["loglikelihoods"] for x in lm["per_sample"][f"bbh_mc_{args.task}"]}
                diffs = [abs(a - b) for k in ours.keys() & theirs.keys() for a, b in zip(ours[k], theirs[k], strict=True)]
                figures["max_abs_loglikelihood_diff"] = max(diffs) if diffs else None
                figures["paired_docs"] = len(ours.keys() & theirs.keys())
                figures["ratio"] = yard["samples_per_s"] / figures["lmeval"]["samples_per_s"]
    finally:
        s3_server.stop()
    print()
    print("| task | docs | conc. | ModelYard samples/s | lm-eval samples/s | ratio | acc ModelYard | acc lm-eval | max |Δ loglik| |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    y, lm = figures["modelyard"], figures.get("lmeval")
    if lm:
        print(f"| {args.task} | {args.limit} | {args.concurrency} | {y['samples_per_s']:.2f} | {lm['samples_per_s']:.2f} | "
              f"{figures['ratio']:.2f}x | {y['acc']:.4f} | {lm['acc']:.4f} | {figures['max_abs_loglikelihood_diff']:.4f} |")
    else:
        print(f"| {args.task} | {args.limit} | {args.concurrency} | {y['samples_per_s']:.2f} | - | - | {y['acc']:.4f} | - | - |")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
