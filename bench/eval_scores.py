"""Scores of SmolLM2-135M-Instruct on bundled benchmarks, through the evaluation service on a vLLM deployment.

Starts an in-process stack (nanio, registry, training, inference with vLLM, evaluation), registers
SmolLM2-135M-Instruct and evaluates the model version (a temporary deployment, removed afterwards) on the
benchmarks given, then prints each metric with its standard error, the samples and samples/s.

    .venv/bin/python bench/eval_scores.py
    .venv/bin/python bench/eval_scores.py -b bbh:navigate -b gsm8k --limit 100
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT = ["bbh:boolean_expressions", "bbh_mc:boolean_expressions", "bbh_mc:navigate", "bbh:navigate", "gsm8k"]


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-b", "--benchmark", action="append", help=f"benchmarks (default: {' '.join(DEFAULT)})")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--engine", default="vllm", choices=["vllm", "transformers"])
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from services.core.logging import configure_logging

    configure_logging(level="WARNING", json=False)
    from cli.demo_models import build_smollm2
    from cli.s3server import start_s3_server
    from modelyard.common.v1 import common_pb2 as cpb
    from modelyard.evaluation.v1 import evaluation_pb2 as epb
    from modelyard.registry.v1 import registry_pb2 as rpb
    from services.core.artifacts import S3ArtifactStore
    from services.core.settings import S3Settings
    from tests.support.evaluation_stack import evaluation_stack, wait_evaluation

    tmp = Path(tempfile.mkdtemp(prefix="eval-scores-"))
    server = start_s3_server(tmp / "s3")
    s3 = S3Settings(endpoint=server.endpoint, access_key=server.access_key, secret_key=server.secret_key,
                    bucket=f"scores-{uuid.uuid4().hex[:8]}")  # fmt: skip
    try:
        async with evaluation_stack(tmp / "stack", s3, vllm=args.engine == "vllm") as stack:
            S3ArtifactStore.connect(s3).upload_dir("uploads/smollm2", build_smollm2())
            base = await stack.registry.create_model_version(
                parent="models/smollm2", version_id="v1", model_version=rpb.ModelVersion(artifact_prefix="uploads/smollm2"))
            spec = epb.EvaluationSpec(model_version=base.name, limit=args.limit, engine=args.engine,
                                      benchmarks=[epb.BenchmarkRun(benchmark=f"benchmarks/{b}")
                                                  for b in args.benchmark or DEFAULT])  # fmt: skip
            t0 = time.monotonic()
            created = await stack.evaluation.create_evaluation(epb.Evaluation(spec=spec))
            ev = await wait_evaluation(stack.evaluation, created.name, timeout=7200)
            wall = time.monotonic() - t0
            if ev.state != cpb.JOB_STATE_SUCCEEDED:
                sys.exit(f"evaluation ended {ev.state}: {ev.error.message}")
    finally:
        server.stop()
    print(f"\nSmolLM2-135M-Instruct on {args.engine}, limit {args.limit}, wall {wall:.0f} s (deployment included)\n")
    print("| benchmark | metric | value ± stderr | n | few-shot | samples/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in ev.outputs.results:
        for metric, value in r.metrics.items():
            se = r.stderr.get(metric)
            se_text = f" ± {se:.3f}" if se is not None else ""
            print(f"| {r.benchmark.removeprefix('benchmarks/')} | {metric} | {value:.3f}{se_text} | {r.num_samples} | "
                  f"{r.num_fewshot} | {r.samples_per_second:.2f} |")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
