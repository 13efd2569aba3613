"""SIGKILL of a training job's process at random steps: every job completes, with the parameters of an
uninterrupted run, and no attempt loses more than one checkpoint interval.

The kill steps come from a seeded generator; the seed is printed (``YARD_RELIABILITY_SEED=N`` replays it).
Jobs run as in production: a JobStore, Workers that run each attempt in a child process, a real S3 server.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from dataclasses import dataclass, field

from services.core.jobs import JobState, JobStore, Worker
from tests.integration.test_recipes import job_env
from tests.reliability.training import (
    EVERY,
    FAST,
    MAX_STEPS,
    TARGET,
    StepWatcher,
    adapter,
    attempts,
    max_abs_diff,
    start_worker_process,
    train_spec,
    wait_gone,
)

TOLERANCE = 1e-5
# 10 trials: 2 jobs killed 5 times each (with ``max_attempts`` 6, the service's ``max_attempts`` setting). Most
# of an attempt's cost is its child importing torch and transformers (~5 s of CPU), so the trials share jobs.
JOBS = 2
KILLS_PER_JOB = 5


@dataclass
class Kill:
    what: str  # "child" (the attempt's process) or "worker" (the worker process that runs it)
    target: int  # kill once the attempt has reported this step
    seen: int = 0  # the step seen when the kill was sent
    orphan_gone_s: float | None = None  # worker kills: how long the attempt's child outlived its worker


@dataclass
class Trial:
    job: str
    kind: str
    kills: list[Kill] = field(default_factory=list)


def plan(rng: random.Random) -> list[Trial]:
    """Kills at random steps, each later than the one before (so the job moves on between them); the last job's
    first kill hits its worker process instead of the attempt's child."""
    trials = []
    for i in range(JOBS):
        targets = sorted(rng.sample(range(1, MAX_STEPS - 3), KILLS_PER_JOB))  # leave room for a late kill to land
        worker_kill = i == JOBS - 1
        kills = [Kill("worker" if worker_kill and k == 0 else "child", t) for k, t in enumerate(targets)]
        trials.append(Trial(f"trainingJobs/killed-{i + 1}", "train-w" if worker_kill else "train", kills))
    return trials


async def drive(jobs: JobStore, trial: Trial, worker_proc, on_worker_killed) -> None:
    """Kill the job's attempts as planned, then wait for its end."""
    watch = StepWatcher(jobs, trial.job)
    done = 0
    deadline = time.monotonic() + 500
    while time.monotonic() < deadline:
        await watch.poll()
        if watch.finished:
            return
        if done < len(trial.kills) and watch.attempt == done + 1 and watch.step >= trial.kills[done].target:
            kill = trial.kills[done]
            kill.seen = watch.step
            if kill.what == "child":
                pid = (await asyncio.to_thread(jobs.get, trial.job)).child_pid
                assert pid, f"{trial.job}: no child pid at step {watch.step}"
                os.kill(pid, signal.SIGKILL)
            else:
                child = (await asyncio.to_thread(jobs.get, trial.job)).child_pid
                os.kill(worker_proc.pid, signal.SIGKILL)
                worker_proc.wait()
                await on_worker_killed()
                kill.orphan_gone_s = await wait_gone(child, timeout=10)  # the child kills itself (stdin EOF)
            done += 1
        await asyncio.sleep(0.05)
    raise AssertionError(f"{trial.job} did not finish (state {watch.state}, attempt {watch.attempt})")


async def test_training_sigkilled_at_random_steps_ends_with_the_parameters_of_an_uninterrupted_run(
        jobs, store, s3_settings, tiny_model, small_dataset, tmp_path):
    seed = int(os.environ.get("YARD_RELIABILITY_SEED") or random.SystemRandom().randrange(2**32))
    print(f"\nkill steps from seed {seed} (YARD_RELIABILITY_SEED={seed} replays them)")
    trials = plan(random.Random(seed))
    spec = train_spec(s3_settings, store, tiny_model, small_dataset)
    db_url = f"sqlite:///{tmp_path / 'jobs.db'}"
    start = time.monotonic()

    # The job whose worker is killed runs on a worker process of its own (kind "train-w", which no other worker
    # takes until then); a worker started after the kill takes it over once its heartbeat is stale.
    worker_proc = start_worker_process(db_url, tmp_path / "work-proc", "proc", {"train-w": TARGET}, s3_settings)
    jobs.create("train", spec, name="trainingJobs/straight")
    for t in trials:
        jobs.create(t.kind, spec, name=t.job, max_attempts=KILLS_PER_JOB + 1)
    env = job_env(s3_settings)
    main = Worker(jobs, {"train": TARGET}, "main", tmp_path / "work", slots=2, child_env=env, **FAST)
    rescue = Worker(jobs, {"train-w": TARGET}, "rescue", tmp_path / "work-rescue", child_env=env, **FAST)
    await main.start()
    try:
        await asyncio.gather(*(drive(jobs, t, worker_proc, rescue.start) for t in trials),
                             drive(jobs, Trial("trainingJobs/straight", "train"), None, None))
    finally:
        await main.stop()
        await rescue.stop()
        if worker_proc.poll() is None:
            worker_proc.kill()
            worker_proc.wait()
    elapsed = time.monotonic() - start

    straight = jobs.get("trainingJobs/straight")
    assert straight.state == JobState.SUCCEEDED, straight.error
    reference = adapter(store, straight.outputs, tmp_path / "straight")
    rows, failures = [], []
    for t in trials:
        job = jobs.get(t.job)
        assert job.state == JobState.SUCCEEDED, (t.job, job.error)
        runs = attempts(jobs, t.job)
        assert [a.number for a in runs] == list(range(1, len(t.kills) + 2)), (t.job, runs)
        for kill, killed, resumed in zip(t.kills, runs, runs[1:], strict=False):
            assert killed.lost_why, (t.job, killed)
            assert ("SIGKILL" in killed.lost_why) if kill.what == "child" else ("no heartbeat" in killed.lost_why)
            assert resumed.resumed_from is not None and resumed.resumed_from % EVERY == 0, (t.job, resumed)
            lost = killed.last_step - resumed.resumed_from
            rows.append((t.job.rsplit("/", 1)[1], kill.what, kill.target, kill.seen, killed.last_step,
                         resumed.resumed_from, lost, kill.orphan_gone_s))
            if lost > EVERY:
                failures.append(f"{t.job} attempt {killed.number}: reached step {killed.last_step}, the next "
                                f"attempt resumed from {resumed.resumed_from} ({lost} steps lost > {EVERY})")
            # the resumed attempt trains every step after its checkpoint once, none before it
            assert resumed.trained[0] == resumed.resumed_from + 1, (t.job, resumed)
        assert runs[-1].trained[-1] == MAX_STEPS and runs[-1].lost_why is None
        assert [c["step"] for c in job.outputs["checkpoints"]] == list(range(EVERY, MAX_STEPS + 1, EVERY))
        diff = max_abs_diff(reference, adapter(store, job.outputs, tmp_path / t.job.rsplit("/", 1)[1]))
        if diff > TOLERANCE:
            failures.append(f"{t.job}: adapter differs from the uninterrupted run's by {diff:.3g} > {TOLERANCE}")

    print(f"{'job':<10} {'killed':<7} {'target':>6} {'seen':>5} {'last':>5} {'resumed':>8} {'lost':>5}")
    for job, what, target, seen, last, resumed_from, lost, orphan in rows:
        extra = f"  (its child died {orphan:.2f}s after the worker)" if orphan is not None else ""
        print(f"{job:<10} {what:<7} {target:>6} {seen:>5} {last:>5} {resumed_from:>8} {lost:>5}{extra}")
    print(f"{len(rows)} kills, {len(trials)} jobs + 1 uninterrupted in {elapsed:.1f}s; max steps lost "
          f"{max(r[6] for r in rows)} (interval {EVERY})")
    assert len(rows) == JOBS * KILLS_PER_JOB
    assert not failures, "\n".join(failures)
