"""The TrainerCallbacks of every recipe: metrics / progress / eval / cancel reporting, and checkpoint upload."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from services.core.artifacts import S3ArtifactStore

from .checkpoints import checkpoint_prefix
from .events import EventSink


class TokenCounter:
    """Non-padding tokens seen by the training steps of this process (filled by the trainer)."""

    def __init__(self) -> None:
        self.tokens = 0


class ReportingCallback(TrainerCallback):
    """Metrics every ``logging_steps`` (loss, learning_rate, grad_norm, epoch, tokens_per_s, elapsed_s, eta_s),
    progress every step, eval loss, and a cooperative stop when the job is cancelled.

    ``tokens_per_s`` counts non-padding tokens (for several ranks: rank 0's rate times the number of ranks)."""

    def __init__(self, sink: EventSink, counter: TokenCounter, *, distributed: bool = False, scale: int = 1) -> None:
        self.sink = sink
        self.counter = counter
        self.distributed = distributed
        self.scale = scale  # ranks: each counts its own tokens, rank 0 reports its rate times the ranks
        self.stopped_by_cancel = False
        self._start = time.monotonic()
        self._first_step = 0
        self._last_log = (time.monotonic(), 0)

    def _eta(self, state: TrainerState) -> float | None:
        done = state.global_step - self._first_step
        if done <= 0 or not state.max_steps:
            return None
        return (time.monotonic() - self._start) / done * (state.max_steps - state.global_step)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self._start = time.monotonic()
        self._first_step = state.global_step
        self._last_log = (self._start, self.counter.tokens)
        self.sink.log("training started", step=state.global_step, total_steps=state.max_steps)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.sink.progress(state.global_step / max(state.max_steps, 1), state.global_step, state.max_steps,
                           self._eta(state))
        if self._cancel_requested():
            self.stopped_by_cancel = True
            control.should_training_stop = True
            control.should_save = False

    def _cancel_requested(self) -> bool:
        local = self.sink.cancelled()
        if not self.distributed:
            return local
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if local else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        return bool(flag.item())

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kw: Any) -> None:
        logs = logs or {}
        if "loss" not in logs:
            return
        now = time.monotonic()
        last_t, last_tokens = self._last_log
        rate = self.scale * (self.counter.tokens - last_tokens) / (now - last_t) if now > last_t else 0.0
        self._last_log = (now, self.counter.tokens)
        values = {k: float(logs[k]) for k in ("loss", "learning_rate", "grad_norm", "epoch")
                  if isinstance(logs.get(k), int | float) and math.isfinite(logs[k])}
        eta = self._eta(state)
        values.update(tokens_per_s=round(rate, 2), elapsed_s=round(now - self._start, 3))
        if eta is not None:
            values["eta_s"] = round(eta, 3)
        self.sink.metrics(state.global_step, **values)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    metrics: dict[str, float] | None = None, **kw: Any) -> None:
        values = {k: float(v) for k, v in (metrics or {}).items() if k.startswith("eval_") and isinstance(v, int | float)}
        if values:
            self.sink.metrics(state.global_step, **values)


class CheckpointUploader(TrainerCallback):
    """After the Trainer writes ``checkpoint-N`` (model/adapter, optimizer, scheduler, RNG states,
    trainer_state), rank 0 uploads it to ``training/{job}/checkpoints/step-N`` and reports it.

    ``every`` = 0 saves one checkpoint at the last step only.
    """

    def __init__(self, store: S3ArtifactStore | None, job_name: str, sink: EventSink, every: int,
                 *, is_main: bool = True, distributed: bool = False) -> None:
        self.store = store
        self.job_name = job_name
        self.sink = sink
        self.every = every
        self.is_main = is_main
        self.distributed = distributed
        self.uploaded: list[dict[str, Any]] = []

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if self.every == 0 and state.global_step >= state.max_steps:
            control.should_save = True

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()  # every rank has written its part of the checkpoint
        if not self.is_main or self.store is None:
            return
        local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        prefix = checkpoint_prefix(self.job_name, state.global_step)
        self.store.upload_dir(prefix, local)  # files first, manifest.json last
        self.uploaded.append({"prefix": prefix, "step": state.global_step})
        self.sink.checkpoint(prefix, state.global_step)
