"""The job runtime shared by training, quantization and evaluation.

``JobStore`` (SQL, component ``jobs``) holds jobs and events; a ``Worker`` in the service process
claims jobs and runs each attempt in a child process where the kind function receives a
``JobContext``; ``watch`` streams stored events live. A job kind is ``"package.module:function"``
whose function is ``run(ctx: JobContext) -> dict | None`` (the outputs).

Exports are imported lazily so the child process does not load SQLAlchemy.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "JobState": "records",
    "JobRecord": "records",
    "JobEvent": "records",
    "NewEvent": "records",
    "EventType": "records",
    "TERMINAL_STATES": "records",
    "JOB_CRASHED": "records",
    "JOB_ATTEMPTS_EXHAUSTED": "records",
    "JobStore": "store",
    "JobContext": "context",
    "Worker": "worker",
    "watch": "stream",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
