"""A job child that dies before the worker hands it its start line (killed, or failing on start-up) ends its
attempt at once, by its exit status, on asyncio's loop and on uvloop (the services' loop).

The worker used to let the error of that write escape (asyncio: ConnectionResetError, uvloop: RuntimeError
"unable to perform operation on <WriteUnixTransport closed=True ...>"): the attempt was never concluded, the
job stayed RUNNING until its heartbeat went stale, and was then requeued as if its worker had died.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import uvloop

from services.core.jobs import JobState, Worker


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize(("death", "script"), [("exit", "exec 0<&-\nexit 3\n"), ("sigkill", "exec 0<&-\nkill -9 $$\n")])
def test_child_dead_before_its_start_line_ends_the_attempt_by_its_exit_status(jobs, tmp_path, loop, death, script):
    python = tmp_path / "dies-at-once"
    python.write_text("#!/bin/sh\n" + script)  # stands in for the child's interpreter: closes stdin, then dies
    python.chmod(0o755)
    worker = Worker(jobs, {"k": "tests.jobkinds:ok"}, "w", tmp_path / "work", python=str(python),
                    poll_interval_s=0.05, heartbeat_s=1, heartbeat_timeout_s=60)
    jobs.create("k", {}, name="jobs/early", max_attempts=2)
    start = time.monotonic()
    done = (uvloop.run if loop == "uvloop" else asyncio.run)(worker.run_once())
    assert time.monotonic() - start < 10  # not after a heartbeat timeout (60 s here)
    if death == "exit":
        assert done.state == JobState.FAILED and done.attempt == 1
        assert "exited with code 3 without a result" in done.error["message"]
    else:
        assert done.state == JobState.QUEUED and done.attempt == 2  # requeued at once, by its exit status
        lost = [e.data["why"] for e in jobs.events(done.name) if e.message == "worker lost, requeued"]
        assert lost == ["child process killed by SIGKILL"]
