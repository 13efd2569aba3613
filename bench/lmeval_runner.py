"""lm-evaluation-harness 0.4.13 on BBH multiple choice, against an OpenAI-compatible completions endpoint.

Runs ``lm_eval.simple_evaluate`` with lm-eval's ``local-completions`` model (tokenized requests, the
Hugging Face tokenizer of a local model folder, ``num_concurrent`` requests in flight) on the
``bbh_mc_<task>`` tasks of ``bench/lmeval_tasks`` (generated into a temporary folder, reading the
vendored ``services/evaluation/data/bbh``), and writes one JSON file:

    {"seconds", "samples", "requests", "samples_per_s", "setup_seconds",
     "tasks": {task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "samples"}},
     "per_sample": {task: [{"doc_id", "loglikelihoods": [one per choice], "gold"}]}, ...}

``seconds`` is the wall time of ``simple_evaluate`` (task loading, every request, metrics); building the
client and loading the tokenizer is ``setup_seconds``. ``samples`` counts questions; ``requests`` counts
log-likelihood requests (one per choice of each question). The bearer key, if the endpoint needs one
(the gateway does), comes from ``OPENAI_API_KEY``. Run it with the bench virtualenv (``make engine-bench-eval``):

    OPENAI_API_KEY=sk-... .venv-bench/bin/python bench/lmeval_runner.py \\
        --base-url http://127.0.0.1:8000/v1/completions --model smollm2 --tokenizer /path/to/model \\
        --tasks bbh_mc_boolean_expressions --limit 50 --concurrency 8 --output /tmp/lmeval.json

``--list`` prints the qualifying task names and exits.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Offline by default: tasks read local JSON, the tokenizer a local folder. Set before lm_eval/datasets import.
for _key, _value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_key, _value)


def _load_bbh_mc():
    spec = importlib.util.spec_from_file_location("bbh_mc", HERE / "lmeval_tasks" / "bbh_mc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bbh_mc = _load_bbh_mc()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", help="the completions endpoint, e.g. http://127.0.0.1:8000/v1/completions")
    parser.add_argument("--model", help="the model name the endpoint serves")
    parser.add_argument("--tokenizer", type=Path, help="local folder holding the model's Hugging Face tokenizer")
    parser.add_argument("--tasks", help="comma-separated bbh_mc_<task> names, or 'all' for every qualifying task")
    parser.add_argument("--limit", type=int, default=None, help="first N examples of each task (default: all)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (lm-eval num_concurrent)")
    parser.add_argument("--batch-size", type=int, default=1, help="contexts per request (lm-eval batch_size)")
    parser.add_argument("--max-retries", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per request")
    parser.add_argument("--data-dir", type=Path, default=bbh_mc.DEFAULT_DATA_DIR, help="folder of BBH <task>.json")
    parser.add_argument("--output", type=Path, help="where to write the JSON result")
    parser.add_argument("--list", action="store_true", help="print the qualifying task names and exit")
    args = parser.parse_args(argv)
    if args.list:
        return args
    for name in ("base_url", "model", "tokenizer", "tasks", "output"):
        if getattr(args, name) is None:
            parser.error(f"--{name.replace('_', '-')} is required")
    if not (args.tokenizer / "tokenizer_config.json").is_file() and not (args.tokenizer / "tokenizer.json").is_file():
        parser.error(f"--tokenizer: {args.tokenizer} holds no Hugging Face tokenizer (tokenizer.json)")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit: must be at least 1, got {args.limit}")
    if args.concurrency < 1:
        parser.error(f"--concurrency: must be at least 1, got {args.concurrency}")
    if args.batch_size < 1:
        parser.error(f"--batch-size: must be at least 1, got {args.batch_size}")
    try:
        qualifying = bbh_mc.qualifying_tasks(args.data_dir)
    except ValueError as exc:
        parser.error(f"--data-dir: {exc}")
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.task_names = qualifying if names == ["all"] else names
    unknown = [t for t in args.task_names if t not in qualifying]
    if not args.task_names or unknown:
        parser.error(f"--tasks: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(qualifying)}")
    return args


def model_args(args: argparse.Namespace) -> dict:
    """lm-eval ``local-completions`` arguments: tokenized requests, no BOS (the served prompt is the raw text)."""
    return {
        "base_url": args.base_url,
        "model": args.model,
        "tokenizer_backend": "huggingface",
        "tokenizer": str(args.tokenizer),
        "num_concurrent": args.concurrency,
        "max_retries": args.max_retries,
        "tokenized_requests": True,
        "add_bos_token": False,
        "batch_size": args.batch_size,
        "timeout": args.timeout,
    }


def summarize(results: dict, task_names: list[str]) -> tuple[dict, dict]:
    """Per-task metrics and per-sample log-likelihoods out of ``simple_evaluate``'s result."""
    tasks, per_sample = {}, {}
    for task in task_names:
        metrics = results["results"][task]
        rows = sorted(results["samples"][task], key=lambda s: s["doc_id"])
        tasks[task] = {
            "acc": metrics["acc,none"],
            "acc_stderr": metrics["acc_stderr,none"],
            "acc_norm": metrics["acc_norm,none"],
            "acc_norm_stderr": metrics["acc_norm_stderr,none"],
            "samples": len(rows),
        }
        per_sample[task] = [
            {
                "doc_id": s["doc_id"],
                "loglikelihoods": [float(resp[0]) for resp in s["filtered_resps"]],
                "gold": int(s["target"]),
            }
            for s in rows
        ]
    return tasks, per_sample


def run(args: argparse.Namespace) -> dict:
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    start = time.perf_counter()
    # The same as simple_evaluate(model="local-completions", model_args=...), built first so that the
    # tokenizer load is not part of the timed evaluation.
    lm = get_model("local-completions")(**model_args(args))
    setup_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="bbh_mc_tasks.") as task_dir:
        bbh_mc.write_task_dir(Path(task_dir), args.task_names, data_dir=args.data_dir)
        manager = TaskManager(include_path=task_dir, include_defaults=False)
        start = time.perf_counter()
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=args.task_names,
            limit=args.limit,
            log_samples=True,
            task_manager=manager,
        )
        seconds = time.perf_counter() - start
    tasks, per_sample = summarize(results, args.task_names)
    samples = sum(t["samples"] for t in tasks.values())
    requests = sum(len(s["loglikelihoods"]) for rows in per_sample.values() for s in rows)
    return {
        "harness": f"lm_eval {importlib.metadata.version('lm_eval')}",
        "base_url": args.base_url,
        "model": args.model,
        "concurrency": args.concurrency,
        "batch_size": args.batch_size,
        "limit": args.limit,
        "setup_seconds": round(setup_seconds, 3),
        "seconds": round(seconds, 3),
        "samples": samples,
        "requests": requests,
        "samples_per_s": round(samples / seconds, 3) if seconds > 0 else None,
        "tasks": tasks,
        "per_sample": per_sample,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print("\n".join(bbh_mc.qualifying_tasks(args.data_dir)))
        return 0
    out = run(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=1) + "\n")
    for task, m in out["tasks"].items():
        print(f"{task}: acc {m['acc']:.4f} ± {m['acc_stderr']:.4f}  acc_norm {m['acc_norm']:.4f}  n={m['samples']}")
    print(
        f"{out['samples']} samples ({out['requests']} requests) in {out['seconds']:.2f} s: {out['samples_per_s']} samples/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
