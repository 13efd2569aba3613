"""Job kinds for the job runtime's tests (imported by dotted path in the child process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from services.core.errors import InvalidArgument
from services.core.jobs.context import JobContext

KINDS = {
    "ok": "tests.jobkinds:ok",
    "fails_domain": "tests.jobkinds:fails_domain",
    "crashes": "tests.jobkinds:crashes",
    "sleeps": "tests.jobkinds:sleeps",
    "ignores_sigterm": "tests.jobkinds:ignores_sigterm",
    "counts_with_resume": "tests.jobkinds:counts_with_resume",
    "kills_itself": "tests.jobkinds:kills_itself",
    "segfaults": "tests.jobkinds:segfaults",
}


def ok(ctx: JobContext) -> dict:
    ctx.log("loading data", rows=3)
    print("plain stdout line")
    print("plain stderr line", file=sys.stderr)
    for step in (1, 2):
        ctx.metrics(step=step, loss=1.0 / step, lr=0.1)
    ctx.progress(fraction=1.0, step=2, total_steps=2, eta_s=0.0)
    ctx.set_outputs({"partial": True})
    return {"model": "models/m/versions/1", "omp": os.environ.get("OMP_NUM_THREADS"), "cwd": os.getcwd()}


def fails_domain(ctx: JobContext) -> None:
    raise InvalidArgument.for_field("spec.learning_rate", "must be > 0")


def crashes(ctx: JobContext) -> None:
    ctx.log("about to divide")
    1 / 0  # noqa: B018 - the crash under test


def _grandchild(ctx: JobContext) -> None:
    """A subprocess of the job (like a torchrun rank): must die with the job's process group."""
    if ctx.spec.get("grandchild"):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        ctx.log("grandchild started", pid=child.pid)


def sleeps(ctx: JobContext) -> dict:
    _grandchild(ctx)
    ctx.set_outputs({"partial": True})
    total = int(ctx.spec.get("steps", 600))
    for step in range(total):
        if ctx.cancelled():
            return {"stopped_at": step}
        ctx.progress(fraction=step / total, step=step, total_steps=total)
        time.sleep(0.05)
    return {"stopped_at": total}


def ignores_sigterm(ctx: JobContext) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ctx.log("ignoring SIGTERM")
    time.sleep(60)


def _hold(ctx: JobContext, gate: str) -> None:
    """Wait until the file ``gate`` exists (the test opens it) or the job is cancelled."""
    ctx.log("holding", gate=gate)
    while not os.path.exists(gate) and not ctx.cancelled():
        time.sleep(0.01)


def counts_with_resume(ctx: JobContext) -> dict:
    """Counts ``steps`` steps, saving each as its resume state. With ``hold_after`` and ``gate``, the first
    attempt stops after that step until the gate file exists, so a test acts on a job known to be running
    at a known step (SIGKILL it, kill its worker, watch it) instead of racing the clock."""
    saved = ctx.resume_state()
    start = saved["step"] if saved else 0
    total, step_s = int(ctx.spec["steps"]), float(ctx.spec.get("step_s", 0.0))
    hold_after = int(ctx.spec.get("hold_after", -1)) if ctx.attempt == 1 else -1
    ctx.log("counting", from_step=start, resume=ctx.resume)
    for step in range(start, total):
        time.sleep(step_s)
        ctx.metrics(step=step + 1, loss=1.0 / (step + 1))
        ctx.save_resume_state({"step": step + 1})
        ctx.progress(fraction=(step + 1) / total, step=step + 1, total_steps=total)
        if step + 1 == hold_after:
            _hold(ctx, ctx.spec["gate"])
    return {"started_from": start, "resumed": ctx.resume, "attempt": ctx.attempt}


def kills_itself(ctx: JobContext) -> None:
    ctx.log("going down")
    os.kill(os.getpid(), signal.SIGKILL)


def segfaults(ctx: JobContext) -> None:
    """Dies in native code: a NULL read through ctypes (a real SIGSEGV, as a crashing extension gives)."""
    import ctypes

    ctx.log("about to crash")
    ctypes.string_at(0)
