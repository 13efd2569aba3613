"""Child process entry: ``python -m services.core.jobs.child EVENT_FD``.

Reads one JSON line from stdin (``target``, ``name``, ``spec``, ``attempt``, ``workdir``,
``resume_state``), imports the kind function and runs it, and reports the outcome on the event
channel. Stdin stays open while the parent lives: EOF means the parent (worker) died, and the child
kills its whole process group so no orphan keeps running the job.
"""

from __future__ import annotations

import faulthandler
import importlib
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import DomainError, error_dict
from .context import JobContext, JobInterrupted, open_channel


def load_kind(target: str) -> Callable[[JobContext], dict[str, Any] | None]:
    """``package.module:function`` -> the function."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"job kind target {target!r} must look like 'package.module:function'")
    return getattr(importlib.import_module(module_name), attr)


def _die_with_parent() -> None:
    sys.stdin.read()  # returns at EOF: the parent is gone
    os.killpg(os.getpgrp(), signal.SIGKILL)


def main(argv: list[str]) -> int:
    # A crash in native code (SIGSEGV, SIGBUS, ...) prints the Python stacks to stderr, which the worker stores
    # in the job's log: an attempt lost that way says where it died.
    faulthandler.enable(all_threads=True)
    channel = open_channel(int(argv[0]))
    start = json.loads(sys.stdin.readline())
    threading.Thread(target=_die_with_parent, name="parent-watch", daemon=True).start()
    ctx = JobContext(
        name=start["name"],
        spec=start["spec"],
        attempt=start["attempt"],
        workdir=Path(start["workdir"]),
        resume_state=start.get("resume_state"),
        channel=channel,
    )
    ctx._install_signal_handler()
    try:
        result = load_kind(start["target"])(ctx)
        if result is not None and not isinstance(result, dict):
            raise TypeError(f"job kind {start['target']} returned {type(result).__name__}, expected dict or None")
        channel.send({"t": "result", "outputs": result or {}})
    except DomainError as e:
        channel.send({"t": "error", "error": error_dict(e), "traceback": traceback.format_exc()})
    except JobInterrupted as e:
        channel.send({"t": "interrupted", "message": str(e)})
    except BaseException as e:  # noqa: BLE001 - everything else is a crash, reported with its traceback
        last = traceback.format_exception_only(e)[-1].strip()
        channel.send({"t": "crash", "message": last, "traceback": traceback.format_exc()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
