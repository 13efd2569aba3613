"""The job runtime with real child processes, real signals and a real database: every test runs on a SQLite
file and on a PostgreSQL database of its own (``db_url`` in tests/conftest.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from sqlalchemy import update

from services.core import listing
from services.core.db import Database
from services.core.errors import FailedPrecondition
from services.core.jobs import JOB_ATTEMPTS_EXHAUSTED, JOB_CRASHED, EventType, JobState, JobStore, Worker, watch
from services.core.jobs.store import JOB_SCHEMA, jobs
from tests.jobkinds import KINDS

REPO = Path(__file__).resolve().parents[2]
# No test here races the heartbeat timeout: it is far longer than any stall of a loaded machine, and the
# one test of a dead worker's requeue gives its survivor a short one of its own.
FAST = dict(poll_interval_s=0.05, heartbeat_s=0.2, heartbeat_timeout_s=60.0, cancel_grace_s=3.0)


@pytest.fixture
def store(db_url):
    db = Database(db_url)
    yield JobStore(db)
    db.dispose()


@pytest.fixture
def make_worker(store, tmp_path):
    def make(worker_id: str = "w1", **overrides) -> Worker:
        return Worker(store, KINDS, worker_id, tmp_path / "work" / worker_id, **{**FAST, **overrides})

    return make


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def _until(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await asyncio.to_thread(predicate)
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_successful_job_stores_events_progress_and_outputs(store, make_worker, tmp_path):
    job = store.create("ok", {"lr": 0.1}, name="trainingJobs/ok-1", labels={"team": "a"})
    assert (job.state, job.attempt) == (JobState.QUEUED, 1)

    done = await make_worker().run_once()

    assert done.state == JobState.SUCCEEDED
    assert done.outputs["model"] == "models/m/versions/1" and done.outputs["partial"] is True
    assert done.outputs["omp"] == "1"
    assert done.outputs["cwd"] == str(tmp_path / "work" / "w1" / "trainingJobs" / "ok-1")
    assert not Path(done.outputs["cwd"]).exists()  # workdir removed once the job is terminal
    assert done.progress["fraction"] == 1.0 and done.progress["metrics"] == {"loss": 0.5, "lr": 0.1}
    assert done.worker == "w1" and done.started_at <= done.finished_at and done.error is None
    events = store.events(job.name)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    messages = [(e.type, e.message) for e in events]
    assert (EventType.LOG, "loading data") in messages
    assert (EventType.LOG, "plain stdout line") in messages and (EventType.LOG, "plain stderr line") in messages
    assert [e.data for e in events if e.type == EventType.METRICS] == [
        {"step": 1, "loss": 1.0, "lr": 0.1}, {"step": 2, "loss": 0.5, "lr": 0.1}]
    states = [e.data["state"] for e in events if e.type == EventType.STATE]
    assert states == ["QUEUED", "RUNNING", "SUCCEEDED"]
    assert store.events(job.name, after_seq=events[-2].seq) == events[-1:]


async def test_domain_error_keeps_its_code_reason_and_field(store, make_worker):
    job = store.create("fails_domain", {})
    done = await make_worker().run_once()
    assert done.state == JobState.FAILED
    assert done.error["code"] == "INVALID_ARGUMENT" and done.error["reason"] == "INVALID_ARGUMENT"
    assert done.error["violations"] == [{"field": "spec.learning_rate", "description": "must be > 0"}]
    assert done.domain_error().message == "spec.learning_rate: must be > 0"
    assert store.get(job.name).attempt == 1  # a domain failure is final, not retried


async def test_crash_fails_with_job_crashed_and_traceback_in_events(store, make_worker):
    job = store.create("crashes", {})
    done = await make_worker().run_once()
    assert done.state == JobState.FAILED
    assert done.error["reason"] == JOB_CRASHED
    assert done.error["message"] == "ZeroDivisionError: division by zero"
    tracebacks = [e.message for e in store.events(job.name) if e.data.get("traceback")]
    assert len(tracebacks) == 1 and "jobkinds.py" in tracebacks[0] and "1 / 0" in tracebacks[0]


def _claimer_script(db_url: str, ready: Path, go: Path) -> str:
    return textwrap.dedent(f"""
        import os, time
        from services.core.db import Database
        from services.core.jobs import JobState, JobStore
        store = JobStore(Database({db_url!r}))
        open(os.path.join({str(ready)!r}, str(os.getpid())), "w").close()
        while not os.path.exists({str(go)!r}):
            time.sleep(0.01)
        me = f"p{{os.getpid()}}"
        while (job := store.claim(me, ["ok"])) is not None:
            print(job.name, flush=True)
            store.finish(job.name, me, JobState.SUCCEEDED, outputs={{"by": me}})
    """)


def test_two_processes_claim_each_job_exactly_once(store, db_url, tmp_path):
    names = {store.create("ok", {"i": i}).name for i in range(20)}
    go, ready = tmp_path / "go", tmp_path / "ready"
    ready.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", _claimer_script(db_url, ready, go)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    deadline = time.monotonic() + 120
    while len(list(ready.iterdir())) < 2:  # both have imported and wait at the barrier: they start together
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "claimers did not start"
        time.sleep(0.01)
    go.touch()
    claimed = [p.communicate(timeout=60)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(claimed[0] + claimed[1]) == sorted(names)  # every job once, none twice
    jobs = store.list(listing.parse(JOB_SCHEMA, page_size=100), kinds=["ok"]).items
    assert {j.state for j in jobs} == {JobState.SUCCEEDED}
    assert all(j.outputs["by"] == j.worker for j in jobs)


async def test_cancel_running_job_kills_child_group_and_records_cancelled(store, make_worker):
    job = store.create("sleeps", {"grandchild": True})
    run = asyncio.create_task(make_worker().run_once())
    grandchild = await _until(lambda: next((e.data["pid"] for e in store.events(job.name)
                                            if e.message == "grandchild started"), None), what="grandchild")
    pid = store.get(job.name).child_pid
    assert _alive(pid) and _alive(grandchild)

    flagged = store.request_cancel(job.name)
    assert flagged.state == JobState.RUNNING and flagged.cancel_requested

    done = await asyncio.wait_for(run, 60)
    assert done.state == JobState.CANCELLED and done.finished_at is not None
    assert done.outputs["stopped_at"] < 600  # the job saw ctx.cancelled() and returned early
    assert not _alive(pid)
    await _until(lambda: not _alive(grandchild), what="grandchild gone")


async def test_cancel_kills_a_child_that_ignores_sigterm_after_the_grace_period(store, make_worker):
    job = store.create("ignores_sigterm", {})
    run = asyncio.create_task(make_worker(cancel_grace_s=0.5).run_once())
    await _until(lambda: any(e.message == "ignoring SIGTERM" for e in store.events(job.name)), what="job start")
    pid = store.get(job.name).child_pid
    store.request_cancel(job.name)
    done = await asyncio.wait_for(run, 60)
    assert done.state == JobState.CANCELLED and not _alive(pid)


def test_cancel_queued_job_is_immediate_and_finished_job_is_refused(store):
    job = store.create("ok", {})
    cancelled = store.request_cancel(job.name)
    assert cancelled.state == JobState.CANCELLED and cancelled.finished_at is not None
    assert store.claim("w1", ["ok"]) is None
    with pytest.raises(FailedPrecondition, match="already finished") as err:
        store.request_cancel(job.name)
    assert err.value.reason == "JOB_ALREADY_FINISHED"


async def test_sigkilled_child_is_requeued_and_next_attempt_resumes_from_saved_step(store, make_worker, tmp_path):
    job = store.create("counts_with_resume", {"steps": 8, "hold_after": 3, "gate": str(tmp_path / "never")})
    worker = make_worker()
    run = asyncio.create_task(worker.run_once())
    saved = await _until(lambda: (store.get(job.name).resume_state or {}).get("step", 0) >= 3, what="step 3 saved")
    assert saved
    pid = store.get(job.name).child_pid
    os.kill(pid, signal.SIGKILL)  # held after step 3 until killed

    requeued = await asyncio.wait_for(run, 60)
    assert (requeued.state, requeued.attempt, requeued.worker) == (JobState.QUEUED, 2, None)
    lost = [e for e in store.events(job.name) if e.message == "worker lost, requeued"]
    assert len(lost) == 1 and lost[0].data["why"] == "child process killed by SIGKILL"
    resume_from = requeued.resume_state["step"]
    assert resume_from == 3

    done = await worker.run_once()
    assert done.state == JobState.SUCCEEDED
    assert done.outputs == {"started_from": resume_from, "resumed": True, "attempt": 2}


WORKER_SCRIPT = """
import asyncio, sys
from services.core.db import Database
from services.core.jobs import JobStore, Worker
from tests.jobkinds import KINDS

async def main():
    worker = Worker(JobStore(Database(sys.argv[1])), KINDS, "doomed", sys.argv[2],
                    poll_interval_s=0.05, heartbeat_s=0.2, heartbeat_timeout_s=60.0)
    await worker.start()
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_dead_worker_job_is_requeued_by_another_worker_and_resumed(store, make_worker, db_url, tmp_path):
    job = store.create("counts_with_resume", {"steps": 6, "hold_after": 2, "gate": str(tmp_path / "never")})
    service = subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT, db_url, str(tmp_path / "doomed")], cwd=REPO)
    try:
        await _until(lambda: (store.get(job.name).resume_state or {}).get("step", 0) >= 2, what="step 2 saved")
        child = store.get(job.name).child_pid
        service.kill()  # the whole service process dies (no cleanup)
        service.wait(60)
    finally:
        service.kill()
    await _until(lambda: not _alive(child), what="orphaned child exits")
    stuck = store.get(job.name)
    assert (stuck.state, stuck.worker) == (JobState.RUNNING, "doomed")
    assert store.requeue_stale(60.0) == []  # a heartbeat younger than the timeout is not a dead worker

    # A survivor with a short timeout requeues it once the last heartbeat is older than that (no upper bound
    # on how long this takes is asserted: a loaded machine only makes it later).
    survivor = make_worker("survivor", heartbeat_s=0.1, heartbeat_timeout_s=0.5)
    deadline = time.monotonic() + 60
    while (done := await survivor.run_once()) is None:  # None until the heartbeat is older than the timeout
        assert time.monotonic() < deadline, "the dead worker's job was never requeued"
        await asyncio.sleep(0.1)
    assert (done.state, done.worker, done.attempt) == (JobState.SUCCEEDED, "survivor", 2)
    assert done.outputs["started_from"] == stuck.resume_state["step"] == 2
    lost = [e for e in store.events(job.name) if e.message == "worker lost, requeued"]
    assert "no heartbeat from worker doomed" in lost[0].data["why"]


async def test_a_child_crashing_in_native_code_loses_its_attempt_and_its_stack_is_in_the_log(store, make_worker):
    job = store.create("segfaults", {})
    requeued = await asyncio.wait_for(make_worker().run_once(), 60)
    assert (requeued.state, requeued.attempt) == (JobState.QUEUED, 2)
    lost = [e for e in store.events(job.name) if e.message == "worker lost, requeued"]
    assert [e.data["why"] for e in lost] == [
        "child process killed by SIGSEGV (the job's log holds the stack it crashed in)"]
    stderr = [e.message for e in store.events(job.name) if e.type == EventType.LOG and e.data.get("stream") == "stderr"]
    assert any("Fatal Python error: Segmentation fault" in line for line in stderr), stderr
    assert any("segfaults" in line and "jobkinds.py" in line for line in stderr), stderr


async def test_attempts_exhausted_fails_the_job(store, make_worker):
    job = store.create("kills_itself", {}, max_attempts=2)
    worker = make_worker()
    first = await worker.run_once()
    assert (first.state, first.attempt) == (JobState.QUEUED, 2)
    last = await worker.run_once()
    assert last.state == JobState.FAILED and last.attempt == 2
    assert last.error["reason"] == JOB_ATTEMPTS_EXHAUSTED
    assert "attempt 2 of 2" in last.error["message"] and "SIGKILL" in last.error["message"]
    assert await worker.run_once() is None
    assert store.get(job.name).state == JobState.FAILED


async def test_watch_streams_events_live_and_ends_at_terminal_state(store, make_worker, tmp_path):
    gate = tmp_path / "gate"
    job = store.create("counts_with_resume", {"steps": 5, "hold_after": 1, "gate": str(gate)})
    worker = make_worker()
    await worker.start()
    try:
        seen, live = [], []
        async for event in watch(store, job.name, poll_s=0.05):
            seen.append(event)
            if event.type == EventType.PROGRESS:
                live.append(store.get(job.name).state == JobState.RUNNING)
                gate.touch()  # the job holds after its first step until the watcher has seen it
        assert [e.seq for e in seen] == list(range(1, len(seen) + 1))
        assert seen[-1].type == EventType.STATE and seen[-1].data["state"] == "SUCCEEDED"
        assert len(live) == 5 and live[0]  # the first progress arrived while the job still ran
        resumed = [e async for e in watch(store, job.name, after_seq=seen[-3].seq)]
        assert resumed == seen[-2:]
    finally:
        await worker.stop()


async def test_worker_runs_jobs_concurrently_in_slots_and_stop_requeues_running_ones(store, make_worker):
    jobs = [store.create("sleeps", {"steps": 600}) for _ in range(3)]
    worker = make_worker(slots=2, cancel_grace_s=2.0)
    await worker.start()
    try:
        await _until(lambda: sum(store.get(j.name).child_pid is not None for j in jobs) == 2, what="two running")
        assert store.get(jobs[2].name).state == JobState.QUEUED
    finally:
        await worker.stop()
    after = [store.get(j.name) for j in jobs]
    assert [(j.state, j.attempt) for j in after] == [(JobState.QUEUED, 2), (JobState.QUEUED, 2), (JobState.QUEUED, 1)]


async def test_retry_queues_a_failed_job_again_keeping_outputs_and_resume_state(store, make_worker):
    job = store.create("fails_domain", {}, name="trainingJobs/retry-1", max_attempts=1)
    failed = await make_worker().run_once()
    assert failed.state == JobState.FAILED and failed.attempt == 1
    with store.db.session() as s:  # as an attempt leaves them: what it reported and where to resume from
        s.execute(update(jobs).where(jobs.c.name == job.name).values(resume_state={"step": 3}, outputs={"a": 1}))
    retried = store.retry(job.name)
    assert (retried.state, retried.attempt, retried.max_attempts) == (JobState.QUEUED, 2, 2)
    assert retried.error is None and retried.finished_at is None and retried.outputs == {"a": 1}
    assert retried.resume_state == {"step": 3}
    assert [e.message for e in store.events(job.name)][-1] == "retried, queued"
    with pytest.raises(FailedPrecondition) as err:  # only FAILED or CANCELLED jobs
        store.retry(job.name)
    assert err.value.reason == "JOB_NOT_RETRYABLE"
    claimed = store.claim("w9", ["fails_domain"])
    assert claimed is not None and claimed.name == job.name and claimed.attempt == 2


async def test_outputs_reported_while_running_are_stored_before_the_job_ends(store, make_worker):
    job = store.create("sleeps", {"steps": 600})
    worker = make_worker()
    await worker.start()
    try:
        await _until(lambda: store.get(job.name).outputs.get("partial") is True, what="outputs stored while running")
        assert store.get(job.name).state == JobState.RUNNING
        store.request_cancel(job.name)
        await _until(lambda: store.get(job.name).state == JobState.CANCELLED, what="cancelled")
    finally:
        await worker.stop()
