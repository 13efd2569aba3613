"""Job claims are exclusive on PostgreSQL: two OS processes with two ``Worker``s each (four workers, each with its
own connection pool) drain one queue of one real PostgreSQL database, and every job runs exactly once.

The job kind records each execution in a table of its own (``claim_executions``), written by the job's child
process, so the count does not rely on the job store being right about itself."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

from sqlalchemy import func, select, text

from services.core import listing
from services.core.db import Database
from services.core.jobs import EventType, JobState, JobStore
from services.core.jobs.store import JOB_SCHEMA, job_events
from tests.support.claim_jobkinds import EXECUTIONS_DDL

REPO = Path(__file__).resolve().parents[2]
JOBS = 40

WORKERS = textwrap.dedent("""
    import asyncio, os, sys, time
    from pathlib import Path
    from sqlalchemy import func, select
    from services.core.db import Database
    from services.core.jobs import JobStore, Worker
    from services.core.jobs.store import jobs
    from tests.support.claim_jobkinds import KINDS

    async def main(url, ready, go, workdir):
        workers = [Worker(JobStore(Database(url)), KINDS, f"p{os.getpid()}-w{i}", Path(workdir) / f"w{i}",
                          poll_interval_s=0.02, heartbeat_s=0.5, heartbeat_timeout_s=300.0, cancel_grace_s=2.0)
                   for i in range(2)]
        Path(ready, str(os.getpid())).touch()
        while not os.path.exists(go):  # both processes start claiming at the same moment
            await asyncio.sleep(0.005)
        for w in workers:
            await w.start()
        db = workers[0].store.db
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with db.session() as s:
                left = s.execute(select(func.count()).select_from(jobs)
                                 .where(jobs.c.state.in_(["QUEUED", "RUNNING"]))).scalar_one()
            if left == 0:
                break
            await asyncio.sleep(0.05)
        for w in workers:
            await w.stop()
        return 0 if left == 0 else 3

    sys.exit(asyncio.run(main(*sys.argv[1:])))
""")


def test_two_processes_with_two_workers_each_run_every_job_exactly_once(pg_url, tmp_path):
    db = Database(pg_url)
    store = JobStore(db)
    with db.engine.begin() as conn:
        conn.execute(text(EXECUTIONS_DDL))
    dsn = pg_url.replace("postgresql+psycopg://", "postgresql://")
    # one attempt each: a job claimed twice, or lost and requeued, would show up as a FAILED job or a second row
    names = [store.create("records", {"dsn": dsn}, name=f"claims/j{i:02d}", max_attempts=1).name
             for i in range(JOBS)]
    go, ready = tmp_path / "go", tmp_path / "ready"
    ready.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", WORKERS, pg_url, str(ready), str(go), str(tmp_path / f"p{n}")],
                              cwd=REPO) for n in range(2)]
    try:
        deadline = time.monotonic() + 60
        while len(list(ready.iterdir())) < 2:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "workers did not start"
            time.sleep(0.01)
        go.touch()
        assert [p.wait(150) for p in procs] == [0, 0]
    finally:
        for p in procs:
            p.kill()
            p.wait()

    done = store.list(listing.parse(JOB_SCHEMA, order_by="name", page_size=100)).items
    assert [j.name for j in done] == names
    assert {(j.state, j.attempt) for j in done} == {(JobState.SUCCEEDED, 1)}
    with db.engine.connect() as conn:
        executions = conn.execute(text("SELECT job, pid FROM claim_executions")).all()
        claims = dict(conn.execute(
            select(job_events.c.job, func.count()).where(job_events.c.type == EventType.STATE.value,
                                                         job_events.c.message == "running")
            .group_by(job_events.c.job)).all())
    assert Counter(job for job, _ in executions) == dict.fromkeys(names, 1)  # ran once each, none lost
    assert claims == dict.fromkeys(names, 1)  # claimed once each
    assert {j.name: j.outputs["pid"] for j in done} == dict(executions)  # the recorded run is the job's run
    processes = {j.worker.split("-")[0] for j in done}
    assert len(processes) == 2, Counter(j.worker for j in done)  # both processes took part
    db.dispose()
