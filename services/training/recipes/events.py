"""Training events: where they go (the job context, or a JSON-lines file a launcher relays).
The TrainerCallbacks that produce them live in :mod:`.callbacks`."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Protocol

from services.core.jobs.context import JobContext


class EventSink(Protocol):
    """What a training process reports to, and where it learns that it was cancelled."""

    def log(self, message: str, **fields: Any) -> None: ...
    def metrics(self, step: int, **values: float) -> None: ...
    def progress(self, fraction: float, step: int, total_steps: int, eta_s: float | None) -> None: ...
    def checkpoint(self, prefix: str, step: int) -> None: ...
    def cancelled(self) -> bool: ...


class ContextSink:
    """Events straight to the job context (training in the job's own child process)."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.checkpoints: list[dict[str, Any]] = []

    def log(self, message: str, **fields: Any) -> None:
        self.ctx.log(message, **fields)

    def metrics(self, step: int, **values: float) -> None:
        self.ctx.metrics(step=step, **values)

    def progress(self, fraction: float, step: int, total_steps: int, eta_s: float | None) -> None:
        self.ctx.progress(fraction=min(max(fraction, 0.0), 1.0), step=step, total_steps=total_steps, eta_s=eta_s)

    def checkpoint(self, prefix: str, step: int) -> None:
        """A checkpoint is durable in S3 (manifest written): resume from it, keep it on cancel."""
        self.checkpoints.append({"prefix": prefix, "step": step})
        self.ctx.save_resume_state({"checkpoint_prefix": prefix, "step": step})
        self.ctx.set_outputs({"checkpoints": list(self.checkpoints)})
        self.ctx.log("checkpoint saved", prefix=prefix, step=step)

    def cancelled(self) -> bool:
        return self.ctx.cancelled()


class FileSink:
    """Rank 0 of a multi-process run: one JSON object per line in ``path``; cancel is a flag file."""

    def __init__(self, path: Path, cancel_flag: Path) -> None:
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the rank
        self._cancel_flag = cancel_flag
        self._lock = threading.Lock()

    def _send(self, msg: dict[str, Any]) -> None:
        with self._lock:
            self._file.write(json.dumps(msg, default=str) + "\n")
            self._file.flush()

    def log(self, message: str, **fields: Any) -> None:
        self._send({"t": "log", "message": message, "data": fields})

    def metrics(self, step: int, **values: float) -> None:
        self._send({"t": "metrics", "step": step, "values": values})

    def progress(self, fraction: float, step: int, total_steps: int, eta_s: float | None) -> None:
        self._send({"t": "progress", "fraction": fraction, "step": step, "total_steps": total_steps, "eta_s": eta_s})

    def checkpoint(self, prefix: str, step: int) -> None:
        self._send({"t": "checkpoint", "prefix": prefix, "step": step})

    def error(self, error: dict[str, Any]) -> None:
        self._send({"t": "error", "error": error})

    def cancelled(self) -> bool:
        return self._cancel_flag.exists()


class NullSink:
    """Ranks other than 0: they train, rank 0 reports."""

    def __init__(self, cancel_flag: Path) -> None:
        self._cancel_flag = cancel_flag

    def log(self, message: str, **fields: Any) -> None:
        pass

    def metrics(self, step: int, **values: float) -> None:
        pass

    def progress(self, fraction: float, step: int, total_steps: int, eta_s: float | None) -> None:
        pass

    def checkpoint(self, prefix: str, step: int) -> None:
        pass

    def cancelled(self) -> bool:
        return self._cancel_flag.exists()


def relay(message: dict[str, Any], sink: ContextSink) -> dict[str, Any] | None:
    """Replay one line of a rank-0 event file on the job context; returns an ``error`` message."""
    t = message.get("t")
    if t == "log":
        sink.log(message["message"], **(message.get("data") or {}))
    elif t == "metrics":
        sink.metrics(message["step"], **message["values"])
    elif t == "progress":
        sink.progress(message["fraction"], message["step"], message["total_steps"], message.get("eta_s"))
    elif t == "checkpoint":
        sink.checkpoint(message["prefix"], message["step"])
    elif t == "error":
        return message["error"]
    return None
