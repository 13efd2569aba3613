"""Helpers of the training reliability tests: the job spec, a worker in a process of its own, and what a job's
events say about its attempts (where each one stopped, where the next one resumed)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from services.core.artifacts import S3ArtifactStore
from services.core.jobs import JobStore
from services.core.settings import S3Settings
from tests.integration.test_recipes import job_env, make_spec, trainable_tensors, upload_dataset, upload_model
from tests.reliability.worker_process import FAST  # noqa: F401 - re-exported for the tests

ROOT = Path(__file__).resolve().parents[2]
TARGET = "services.training.recipes.run:run_training"
MAX_STEPS = 20
EVERY = 4  # checkpoint interval (steps)
# Everything a resume has to restore: a warmup + cosine schedule, AdamW moments, LoRA dropout (RNG), gradient
# accumulation over 2 micro-batches, activation checkpointing, a shuffled sampler over epochs of 3 steps.
HP = {"max_steps": MAX_STEPS, "batch_size": 2, "gradient_accumulation_steps": 2, "max_length": 64,
      "learning_rate": 2e-3, "lr_scheduler": "cosine", "warmup_ratio": 0.1, "lora_rank": 4, "lora_alpha": 8,
      "lora_dropout": 0.1, "seed": 7}


def train_spec(s3: S3Settings, store: S3ArtifactStore, model: Path, dataset: Path, **overrides: Any) -> dict[str, Any]:
    """The spec every job of a test trains (only the S3 endpoint may differ; the result must not)."""
    return make_spec(s3, upload_model(store, model), [upload_dataset(store, dataset, "messages")],
                     checkpoint_every_steps=EVERY, hyperparameters=dict(HP), **overrides)


def adapter(store: S3ArtifactStore, job_outputs: dict[str, Any], dest: Path) -> dict[str, torch.Tensor]:
    return trainable_tensors(store, job_outputs["adapter_prefix"], dest)


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a, (sorted(a), sorted(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ----------------------------------------------------------------------------- attempts, from the job's events


@dataclass
class Attempt:
    number: int
    last_step: int = 0  # the last step this attempt reported (progress)
    trained: list[int] = field(default_factory=list)  # steps with a training loss (log_every_steps = 1)
    resumed_from: int | None = None  # the checkpoint step it downloaded (0: none was complete)
    lost_why: str | None = None  # why the attempt was lost (requeued), None if it ended the job


def attempts(jobs: JobStore, name: str) -> list[Attempt]:
    out: list[Attempt] = []
    for e in jobs.events(name, limit=100_000):
        kind = e.type.value
        if kind == "state" and e.message == "running":
            out.append(Attempt(e.data["attempt"]))
        elif not out:
            continue
        elif kind == "progress" and e.data.get("step") is not None:
            out[-1].last_step = max(out[-1].last_step, e.data["step"])
        elif kind == "metrics" and "loss" in e.data:
            out[-1].trained.append(e.data["step"])
        elif kind == "log" and e.message == "checkpoint downloaded":
            out[-1].resumed_from = e.data["step"]
        elif kind == "log" and e.message.startswith("no complete checkpoint"):
            out[-1].resumed_from = 0
        elif kind == "state" and e.message == "worker lost, requeued":
            out[-1].lost_why = e.data.get("why")
    return out


class StepWatcher:
    """Follows a job's events as they are stored: the attempt running now and the last step it reported."""

    def __init__(self, jobs: JobStore, name: str) -> None:
        self.jobs, self.name = jobs, name
        self.cursor = 0
        self.attempt = 0
        self.step = 0
        self.state = ""

    async def poll(self) -> None:
        state, events = await asyncio.to_thread(self.jobs.state_and_events, self.name, self.cursor)
        self.state = state.value
        for e in events:
            self.cursor = e.seq
            if e.type.value == "state" and e.message == "running":
                self.attempt, self.step = e.data["attempt"], 0
            elif e.type.value == "progress" and e.data.get("step") is not None:
                self.step = e.data["step"]

    @property
    def finished(self) -> bool:
        return self.state in ("SUCCEEDED", "FAILED", "CANCELLED")


# ----------------------------------------------------------------------------- a worker in its own process


def start_worker_process(db_url: str, workdir: Path, worker_id: str, kinds: dict[str, str],
                         s3: S3Settings) -> subprocess.Popen:
    """``python -m tests.reliability.worker_process``: a Worker (one slot) that runs until it is killed."""
    env = {**os.environ, **job_env(s3), "OMP_NUM_THREADS": "1"}
    args = [f"{k}={v}" for k, v in kinds.items()]
    return subprocess.Popen([sys.executable, "-m", "tests.reliability.worker_process", db_url, str(workdir),
                             worker_id, *args], cwd=ROOT, env=env)


def gone(pid: int) -> bool:
    """The process ``pid`` no longer exists (or is a zombie no one waits for)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def wait_gone(pid: int, timeout: float) -> float:
    """Seconds until ``pid`` is gone; AssertionError after ``timeout``."""
    start = time.monotonic()
    while not gone(pid):
        if time.monotonic() - start > timeout:
            raise AssertionError(f"process {pid} still alive {timeout}s later")
        await asyncio.sleep(0.02)
    return time.monotonic() - start
