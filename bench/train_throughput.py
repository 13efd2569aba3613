"""LoRA SFT throughput: a ModelYard training job vs a plain transformers Trainer + peft script.

Same model (SmolLM2-135M-Instruct, fp32, CPU), same data (tests/data/training/shout_train.jsonl), max_length 256,
batch 4, LoRA rank 8 / alpha 32 on all linear layers, OMP_NUM_THREADS=1, same number of steps. The job runs
through the real job runtime (JobStore + Worker child process, nanio S3); the baseline pads each batch to its
longest row (DataCollatorForSeq2Seq) and lets the model compute the loss. Both count non-padding tokens over
the training steps only (model loading and uploads excluded). Prints tokens/s of each and the ratio.

    OMP_NUM_THREADS=1 .venv/bin/python bench/train_throughput.py [--steps 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli.demo_models import build_smollm2  # noqa: E402
from cli.s3server import start_s3_server  # noqa: E402
from services.core.artifacts import S3ArtifactStore  # noqa: E402
from services.core.db import Database  # noqa: E402
from services.core.jobs import JobState, JobStore, Worker  # noqa: E402
from services.core.logging import configure_logging  # noqa: E402
from services.core.settings import S3Settings  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "training" / "shout_train.jsonl"
HP = {"learning_rate": 1e-4, "lr_scheduler": "cosine", "warmup_ratio": 0.0, "num_epochs": 100, "batch_size": 4,
      "gradient_accumulation_steps": 1, "max_length": 256, "seed": 42, "packing": False, "lora_rank": 8,
      "lora_alpha": 32, "lora_dropout": 0.05, "lora_target_modules": "all-linear", "beta": 0.1, "precision": "fp32",
      "weight_decay": 0.0, "max_grad_norm": 1.0}


def job_tokens_per_s(metrics: list[dict]) -> float:
    """Non-padding tokens / training seconds from the job's per-step metrics (tokens_per_s over each interval)."""
    tokens, seconds, last = 0.0, 0.0, 0.0
    for m in sorted(metrics, key=lambda m: m["step"]):
        dt = m["elapsed_s"] - last
        tokens, seconds, last = tokens + m["tokens_per_s"] * dt, seconds + dt, m["elapsed_s"]
    return tokens / seconds


async def run_job(model_dir: Path, steps: int, work: Path) -> float:
    server = start_s3_server(work / "s3")
    try:
        s3 = S3Settings(endpoint=server.endpoint, access_key=server.access_key, secret_key=server.secret_key,
                        bucket="bench")
        store = S3ArtifactStore.connect(s3)
        manifest = store.upload_dir("uploads/smollm2", model_dir)
        entry = store.put_file("uploads/shout.jsonl", DATA)
        spec = {"method": "lora", "use_lora": True,
                "base_model": {"name": "models/smollm2/versions/v1", "artifact_prefix": "uploads/smollm2",
                               "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in manifest.files]},
                "datasets": [{"name": "datasets/shout/versions/v1", "key": "uploads/shout.jsonl", "sha256": entry.sha256,
                              "format": "messages", "file_type": "jsonl"}],
                "validation_dataset": None, "validation_split": 0.0, "hyperparameters": {**HP, "max_steps": steps},
                "launcher": {"kind": "local", "num_processes": 1, "zero_stage": 2, "offload": False},
                "log_every_steps": 1, "eval_every_steps": 0, "checkpoint_every_steps": 0,
                "output": {"model": "models/bench", "merge": False, "description": ""},
                "s3": {"endpoint": s3.endpoint, "bucket": s3.bucket, "secure": False}, "registry_addr": "",
                "omp_num_threads": 1}
        db = Database(f"sqlite:///{work / 'jobs.db'}")
        jobs = JobStore(db)
        jobs.create("train", spec, name="trainingJobs/bench")
        worker = Worker(jobs, {"train": "services.training.recipes.run:run_training"}, "bench", work / "jobs",
                        child_env={"YARD_JOB_S3_ACCESS_KEY": s3.access_key,
                                   "YARD_JOB_S3_SECRET_KEY": s3.secret_key.get_secret_value()})
        done = await worker.run_once()
        if done is None or done.state != JobState.SUCCEEDED:
            raise SystemExit(f"job failed: {done.error if done else 'not claimed'}")
        metrics = [e.data for e in jobs.events(done.name) if e.type.value == "metrics" and "loss" in e.data]
        db.dispose()
        return job_tokens_per_s(metrics)
    finally:
        server.stop()


def run_plain(model_dir: Path, steps: int, work: Path) -> float:
    """The baseline: Trainer + peft, padded batches, the model's own loss."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from services.training.recipes.data import tokenize_conversation

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line)["messages"] for line in DATA.read_text().splitlines()]
    examples = []
    for messages in rows:
        ids, labels = tokenize_conversation(tokenizer, messages)
        examples.append({"input_ids": ids[:256], "attention_mask": [1] * len(ids[:256]), "labels": labels[:256]})
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                      task_type="CAUSAL_LM"))
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True)
    seen = {"tokens": 0}

    def counting(features):
        batch = collate(features)
        seen["tokens"] += int(batch["attention_mask"].sum())
        return batch

    clock: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock["start"] = time.monotonic()
            seen["tokens"] = 0

        def on_train_end(self, *a, **k):
            clock["end"] = time.monotonic()

    args = TrainingArguments(output_dir=str(work / "plain"), per_device_train_batch_size=4, max_steps=steps,
                             learning_rate=1e-4, lr_scheduler_type="cosine", seed=42, logging_steps=1, report_to=[],
                             disable_tqdm=True, save_strategy="no", use_cpu=True, dataloader_num_workers=0,
                             remove_unused_columns=False)
    Trainer(model=model, args=args, train_dataset=examples, data_collator=counting, callbacks=[Clock()]).train()
    return seen["tokens"] / (clock["end"] - clock["start"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    configure_logging(level="WARNING", json=False, service="bench")
    model_dir = build_smollm2()
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        work = Path(tmp)
        plain = run_plain(model_dir, args.steps, work)
        job = asyncio.run(run_job(model_dir, args.steps, work))
    print(f"steps={args.steps} batch=4 max_length=256 lora r=8 alpha=32 all-linear fp32 OMP_NUM_THREADS=1")
    print(f"plain Trainer+peft : {plain:8.1f} non-padding tokens/s")
    print(f"ModelYard job      : {job:8.1f} non-padding tokens/s")
    print(f"ratio job/plain    : {job / plain:8.2f}")


if __name__ == "__main__":
    main()
