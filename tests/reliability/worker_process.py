"""A job worker in a process of its own, for the tests that SIGKILL the worker itself:
``python -m tests.reliability.worker_process DB_URL WORKDIR WORKER_ID KIND=package.module:function ...``.

One slot, the tests' short heartbeat; stops on SIGTERM (its attempts are requeued), dies on SIGKILL (its job
children notice their closed stdin and kill themselves; another worker requeues the job once its heartbeat
is stale).
"""

from __future__ import annotations

import asyncio
import signal
import sys

from services.core.db import Database
from services.core.jobs import JobStore, Worker

# The tests' short heartbeat and poll intervals (shared with the in-process workers of the tests).
FAST = dict(poll_interval_s=0.05, heartbeat_s=0.2, heartbeat_timeout_s=3.0, cancel_grace_s=20.0)


async def main(argv: list[str]) -> None:
    db_url, workdir, worker_id, *kinds = argv
    worker = Worker(JobStore(Database(db_url)), dict(k.split("=", 1) for k in kinds), worker_id, workdir, **FAST)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await worker.start()
    await stop.wait()
    await worker.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
