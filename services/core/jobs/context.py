"""What a job kind's ``run(ctx)`` receives in the child process, and the wire format to the parent.

The child never touches the database: every call here writes one JSON line to the event channel
(a pipe the parent reads). Messages: ``{"t": "log"|"metrics"|"progress"|"outputs"|"resume_state"|
"result"|"error"|"crash", ...}``.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import IO, Any


class JobInterrupted(BaseException):
    """Raised in a job that never polls ``ctx.cancelled()`` when the parent asks it to stop."""


class Channel:
    """The child's end of the event pipe (thread-safe, one JSON object per line)."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        line = json.dumps(message, default=str)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


class JobContext:
    """The running attempt, seen from the job: identity, spec, workdir, events, cancel and resume hooks."""

    def __init__(
        self,
        *,
        name: str,
        spec: dict[str, Any],
        attempt: int,
        workdir: Path,
        resume_state: dict[str, Any] | None,
        channel: Channel,
    ) -> None:
        self.name = name
        self.spec = spec
        self.attempt = attempt
        self.workdir = workdir
        self.resume = attempt > 1
        self._resume_state = resume_state
        self._channel = channel
        self._cancel = threading.Event()
        self._polls_cancel = False

    def log(self, message: str, **fields: Any) -> None:
        self._channel.send({"t": "log", "message": message, "data": fields})

    def metrics(self, step: int | None = None, **values: float) -> None:
        """Training-style metrics (loss, lr, tokens_per_s, ...) at ``step``; also the job's latest metrics."""
        self._channel.send({"t": "metrics", "step": step, "values": values})

    def progress(
        self,
        fraction: float | None = None,
        step: int | None = None,
        total_steps: int | None = None,
        eta_s: float | None = None,
    ) -> None:
        if fraction is not None and not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be within [0, 1], got {fraction}")
        self._channel.send(
            {"t": "progress", "fraction": fraction, "step": step, "total_steps": total_steps, "eta_s": eta_s}
        )

    def set_outputs(self, outputs: dict[str, Any]) -> None:
        """Outputs known so far (merged with the dict ``run`` returns)."""
        self._channel.send({"t": "outputs", "outputs": outputs})

    def cancelled(self) -> bool:
        """True once the job was asked to stop: return soon (a job that polls this is not interrupted)."""
        self._polls_cancel = True
        return self._cancel.is_set()

    def resume_state(self) -> dict[str, Any] | None:
        """What the previous attempt saved with ``save_resume_state`` (None on a first attempt)."""
        return self._resume_state

    def save_resume_state(self, state: dict[str, Any]) -> None:
        """Persist where to resume from (e.g. the latest checkpoint's key and step); a later attempt, on
        any worker, gets it from ``resume_state()``. Save it after the checkpoint itself is durable."""
        self._channel.send({"t": "resume_state", "state": state})

    def _on_terminate(self, signum: int, _frame: Any) -> None:
        self._cancel.set()
        if not self._polls_cancel:
            raise JobInterrupted(f"stopped by signal {signal.Signals(signum).name}")

    def _install_signal_handler(self) -> None:
        signal.signal(signal.SIGTERM, self._on_terminate)


def open_channel(fd: int) -> Channel:
    return Channel(os.fdopen(fd, "w", encoding="utf-8"))
