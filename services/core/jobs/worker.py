"""The worker: claims jobs, runs each attempt in a child process and is the only writer of its state.

One ``Worker`` lives in a service process (asyncio) with ``slots`` concurrent attempts. For each
attempt it spawns ``python -m services.core.jobs.child`` in a new session (its own process group),
reads the child's event pipe and its stdout/stderr, stores events in batches with the heartbeat,
turns a cancel request into SIGTERM then SIGKILL of the group, and records the outcome.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import structlog
from sqlalchemy.exc import SQLAlchemyError

from ..errors import FailedPrecondition, Internal, error_dict
from ..grpc_server import GrpcServer
from ..logging import get_logger
from ..settings import JobServiceSettings
from .records import JOB_CRASHED, TERMINAL_STATES, EventType, JobRecord, JobState, NewEvent
from .store import JobStore

log = get_logger(__name__)

S = TypeVar("S", bound=JobServiceSettings)
J = TypeVar("J")

_MAX_LOG_LINE = 16 * 1024


def crash_error(message: str) -> dict[str, Any]:
    return error_dict(Internal(message, reason=JOB_CRASHED))


async def _lines(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """Lines of a stream of any length (StreamReader.readline has a line length limit)."""
    buf = b""
    while chunk := await reader.read(1 << 16):
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            yield line
    if buf:
        yield buf


# Signals of a crash in native code: the child's faulthandler prints its stacks to stderr (the job's log).
_CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL, signal.SIGFPE}


class _Attempt:
    """One attempt of one job in one child process."""

    def __init__(self, worker: Worker, job: JobRecord) -> None:
        self.worker = worker
        self.job = job
        self.store = worker.store
        self.workdir = worker.workdir_root / job.name
        self.pending: list[NewEvent] = []
        self.progress = {**job.progress, "metrics": dict(job.progress.get("metrics") or {})}
        self.progress_version = 0
        self.progress_saved = 0
        self.resume_state: dict[str, Any] | None = None
        self.outputs: dict[str, Any] = {}
        self.outputs_version = self.outputs_saved = 0  # outputs are stored while the job runs, not only at its end
        self.final: dict[str, Any] | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.cancelling = False
        self.stopping = False
        self.lost = False
        self.kill_at: float | None = None

    # ---------------------------------------------------------------- child process

    async def execute(self) -> None:
        name, wid = self.job.name, self.worker.worker_id
        self.workdir.mkdir(parents=True, exist_ok=True)
        read_fd, write_fd = os.pipe()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                self.worker.python,
                "-m",
                "services.core.jobs.child",
                str(write_fd),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=(write_fd,),
                start_new_session=True,
                cwd=self.workdir,
                env=self._child_env(),
            )
        except OSError as e:
            os.close(read_fd)
            log.error("job_child_spawn_failed", error=str(e))
            await asyncio.to_thread(
                self.store.finish, name, wid, JobState.FAILED, crash_error(f"could not start the child process: {e}")
            )
            return
        finally:
            os.close(write_fd)
        log.info("job_child_started", pid=self.proc.pid)
        events = asyncio.StreamReader()
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(events), os.fdopen(read_fd, "rb", 0)
        )
        stdin, stdout, stderr = self.proc.stdin, self.proc.stdout, self.proc.stderr
        assert stdin is not None and stdout is not None and stderr is not None  # all three are PIPEs
        readers = asyncio.gather(
            self._read_events(events), self._read_output(stdout, "stdout"), self._read_output(stderr, "stderr")
        )
        try:
            await asyncio.to_thread(self.store.set_child, name, wid, self.proc.pid)
            start = {
                "target": self.worker.kinds[self.job.kind],
                "name": name,
                "spec": self.job.spec,
                "attempt": self.job.attempt,
                "workdir": str(self.workdir),
                "resume_state": self.job.resume_state,
            }
            try:
                stdin.write((json.dumps(start) + "\n").encode())
                await stdin.drain()
            except (ConnectionError, RuntimeError) as e:
                # The child died before reading its start line (killed, or it failed on start-up). asyncio
                # raises ConnectionResetError here, uvloop RuntimeError ("the handler is closed"). The attempt
                # ends by the child's exit status below, not by a stale heartbeat much later.
                log.warning("job_child_gone_before_start", pid=self.proc.pid, error=str(e))
            await self._supervise()
        except FailedPrecondition:
            self.lost = True  # requeued by another worker before the child started
            self._signal(signal.SIGKILL)
        except BaseException:
            self._signal(signal.SIGKILL)
            raise
        finally:
            await self.proc.wait()
            self._signal(signal.SIGKILL)  # whatever the job left behind in its process group
            stdin.close()
            try:
                await asyncio.wait_for(readers, timeout=10)
            except TimeoutError:
                log.warning("job_child_output_not_closed")
            transport.close()
        await self._conclude()

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)  # the child inherits the service's environment ...
        env["OMP_NUM_THREADS"] = str(self.job.spec.get("omp_num_threads", 1))
        # ... and imports what the service imports (its cwd is the job's workdir).
        env["PYTHONPATH"] = os.pathsep.join(p or os.getcwd() for p in sys.path)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.worker.child_env)
        return env

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def terminate(self) -> None:
        """SIGTERM the child's group now, SIGKILL it after the grace period."""
        self._signal(signal.SIGTERM)
        self.kill_at = time.monotonic() + self.worker.cancel_grace_s

    def stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            self.terminate()

    # ---------------------------------------------------------------- channel

    async def _read_events(self, reader: asyncio.StreamReader) -> None:
        async for line in _lines(reader):
            try:
                msg = json.loads(line)
            except ValueError:
                self.pending.append(
                    NewEvent(
                        EventType.LOG,
                        line.decode(errors="replace")[:_MAX_LOG_LINE],
                        {"stream": "events", "level": "warning"},
                    )
                )
                continue
            self._on_message(msg)

    def _on_message(self, msg: dict[str, Any]) -> None:
        t = msg.get("t")
        if t == "log":
            self.pending.append(NewEvent(EventType.LOG, str(msg.get("message", "")), msg.get("data") or {}))
        elif t == "metrics":
            values, step = msg.get("values") or {}, msg.get("step")
            self.pending.append(NewEvent(EventType.METRICS, "metrics", {"step": step, **values}))
            if step is not None:
                self.progress["step"] = step
            self.progress["metrics"].update(values)
            self.progress_version += 1
        elif t == "progress":
            fields = {k: msg.get(k) for k in ("fraction", "step", "total_steps", "eta_s") if msg.get(k) is not None}
            self.pending.append(NewEvent(EventType.PROGRESS, "progress", fields))
            self.progress.update(fields)
            self.progress_version += 1
        elif t == "outputs":
            self.outputs.update(msg.get("outputs") or {})
            self.outputs_version += 1
        elif t == "resume_state":
            self.resume_state = msg.get("state")
        elif t in ("result", "error", "crash", "interrupted"):
            self.final = msg
            if msg.get("traceback"):
                self.pending.append(NewEvent(EventType.LOG, msg["traceback"], {"level": "error", "traceback": True}))

    async def _read_output(self, reader: asyncio.StreamReader, stream: str) -> None:
        async for line in _lines(reader):
            text = line.decode(errors="replace").rstrip("\r")
            if text:
                self.pending.append(NewEvent(EventType.LOG, text[:_MAX_LOG_LINE], {"stream": stream}))

    # ---------------------------------------------------------------- supervision

    async def _supervise(self) -> None:
        assert self.proc is not None
        exited = asyncio.ensure_future(self.proc.wait())
        last_beat = time.monotonic()
        while True:
            done, _ = await asyncio.wait({exited}, timeout=self.worker.poll_interval_s)
            if done:
                return
            now = time.monotonic()
            beat = now - last_beat >= self.worker.heartbeat_s
            try:
                cancel = await self._flush(heartbeat=beat)
                last_beat = now if beat else last_beat
            except FailedPrecondition:
                if not self.lost:
                    log.warning("job_lost_to_another_worker")
                self.lost = True
                self._signal(signal.SIGKILL)
                continue
            except SQLAlchemyError as e:
                log.warning("job_sync_failed", error=str(e))
                cancel = False
            if cancel and not self.cancelling and not self.stopping:
                log.info("job_cancelling", pid=self.proc.pid)
                self.cancelling = True
                self.terminate()
            if self.kill_at is not None and now >= self.kill_at:
                log.warning("job_child_killed_after_grace", grace_s=self.worker.cancel_grace_s)
                self._signal(signal.SIGKILL)
                self.kill_at = None

    async def _flush(self, heartbeat: bool = False) -> bool:
        """Store what the child sent since the last flush; returns whether a cancel was requested."""
        events, self.pending = self.pending, []
        version = self.progress_version
        progress = json.loads(json.dumps(self.progress)) if version != self.progress_saved else None
        resume = self.resume_state
        outputs_version = self.outputs_version
        outputs = json.loads(json.dumps(self.outputs)) if outputs_version != self.outputs_saved else None
        try:
            cancel = await asyncio.to_thread(
                self.store.sync,
                self.job.name,
                self.worker.worker_id,
                events,
                progress=progress,
                resume_state=resume,
                outputs=outputs,
                heartbeat=heartbeat,
            )
        except BaseException:
            self.pending[:0] = events
            raise
        self.progress_saved = version
        self.outputs_saved = outputs_version
        if self.resume_state is resume:
            self.resume_state = None
        return cancel

    async def _conclude(self) -> None:
        assert self.proc is not None
        name, wid, rc = self.job.name, self.worker.worker_id, self.proc.returncode
        assert rc is not None  # concluded after the process was waited for
        if self.lost:
            return
        try:
            await self._flush()
            final = self.final or {}
            t = final.get("t")
            outputs = {**self.outputs, **(final.get("outputs") or {})}
            if self.stopping:
                job = await asyncio.to_thread(self.store.lose_attempt, name, wid, "worker stopped")
            elif self.cancelling:  # outputs a cancelled job reported (e.g. its last checkpoint) are kept
                job = await asyncio.to_thread(self.store.finish, name, wid, JobState.CANCELLED, None, outputs)
            elif t == "result":
                job = await asyncio.to_thread(self.store.finish, name, wid, JobState.SUCCEEDED, None, outputs)
            elif t == "error":  # outputs reported before the failure (partial results) are kept
                job = await asyncio.to_thread(
                    self.store.finish, name, wid, JobState.FAILED, final["error"], outputs or None
                )
            elif t == "crash":
                job = await asyncio.to_thread(
                    self.store.finish,
                    name,
                    wid,
                    JobState.FAILED,
                    crash_error(final.get("message") or "job crashed"),
                    outputs or None,
                )
            elif t == "interrupted" or rc < 0:
                why = f"child process killed by {signal.Signals(-rc).name}" if rc < 0 else final.get("message", "")
                if -rc in _CRASH_SIGNALS:
                    why += " (the job's log holds the stack it crashed in)"
                job = await asyncio.to_thread(self.store.lose_attempt, name, wid, why)
            else:
                job = await asyncio.to_thread(
                    self.store.finish,
                    name,
                    wid,
                    JobState.FAILED,
                    crash_error(f"child process exited with code {rc} without a result"),
                )
        except FailedPrecondition:
            log.warning("job_lost_to_another_worker")
            return
        log.info("job_attempt_ended", state=job.state.value, exit_code=rc)
        if job.state in TERMINAL_STATES:
            shutil.rmtree(self.workdir, ignore_errors=True)


class Worker:
    """Claims jobs of ``kinds`` (``{kind: "package.module:function"}``) and runs up to ``slots`` at once."""

    def __init__(
        self,
        store: JobStore,
        kinds: Mapping[str, str],
        worker_id: str | None = None,
        workdir_root: Path | str = "jobs-work",
        *,
        slots: int = 1,
        poll_interval_s: float = 0.5,
        heartbeat_s: float = 2.0,
        heartbeat_timeout_s: float = 15.0,
        cancel_grace_s: float = 10.0,
        python: str = sys.executable,
        child_env: Mapping[str, str] | None = None,
    ) -> None:
        for kind, target in kinds.items():
            module, sep, attr = target.partition(":")
            if not (sep and module and attr):
                raise ValueError(f"job kind {kind!r}: target {target!r} must look like 'package.module:function'")
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if heartbeat_timeout_s <= heartbeat_s:
            raise ValueError(f"heartbeat_timeout_s ({heartbeat_timeout_s}) must exceed heartbeat_s ({heartbeat_s})")
        self.store = store
        self.kinds = dict(kinds)
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.workdir_root = Path(workdir_root).resolve()
        self.slots = slots
        self.poll_interval_s = poll_interval_s
        self.heartbeat_s = heartbeat_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.cancel_grace_s = cancel_grace_s
        self.python = python
        # Extra environment for every job child (credentials the service hands its jobs, never stored in specs).
        self.child_env = dict(child_env or {})
        self._attempts: dict[str, _Attempt] = {}
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self._next_stale_check = 0.0

    @property
    def running(self) -> list[str]:
        """Names of the jobs this worker runs now."""
        return list(self._attempts)

    async def start(self) -> None:
        if self._loop_task is None:
            self._stopping = False
            self._loop_task = asyncio.create_task(self._loop(), name=f"job-worker-{self.worker_id}")
            log.info("job_worker_started", worker=self.worker_id, kinds=sorted(self.kinds), slots=self.slots)

    async def stop(self) -> None:
        """Stop claiming; running attempts are stopped (SIGTERM, then SIGKILL after the grace period) and
        their jobs requeued, to resume on another worker from their saved state."""
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            await self._loop_task
            self._loop_task = None
        for attempt in list(self._attempts.values()):
            attempt.stop()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        log.info("job_worker_stopped", worker=self.worker_id)

    async def run_once(self) -> JobRecord | None:
        """Requeue stale jobs, claim one job and run it to the end of its attempt (for tests and tools)."""
        await asyncio.to_thread(self.store.requeue_stale, self.heartbeat_timeout_s)
        job = await asyncio.to_thread(self.store.claim, self.worker_id, list(self.kinds))
        if job is None:
            return None
        await self._run(self._admit(job))
        return await asyncio.to_thread(self.store.get, job.name)

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                await self._poll()
            except SQLAlchemyError as e:
                log.warning("job_poll_failed", worker=self.worker_id, error=str(e))
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_interval_s)
            except TimeoutError:
                pass
            self._wake.clear()

    async def _poll(self) -> None:
        if time.monotonic() >= self._next_stale_check:
            await asyncio.to_thread(self.store.requeue_stale, self.heartbeat_timeout_s)
            self._next_stale_check = time.monotonic() + self.heartbeat_s
        while len(self._attempts) < self.slots and not self._stopping:
            job = await asyncio.to_thread(self.store.claim, self.worker_id, list(self.kinds))
            if job is None:
                return
            task = asyncio.create_task(self._run(self._admit(job)), name=f"job-{job.name}")
            self._tasks.add(task)
            task.add_done_callback(self._run_done)

    def _run_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._wake.set()

    def _admit(self, job: JobRecord) -> _Attempt:
        """Count the claimed job against the slots at once (before its task first runs)."""
        attempt = self._attempts[job.name] = _Attempt(self, job)
        return attempt

    async def _run(self, attempt: _Attempt) -> None:
        job = attempt.job
        try:
            with structlog.contextvars.bound_contextvars(job=job.name, attempt=job.attempt, worker=self.worker_id):
                log.info("job_claimed", kind=job.kind)
                try:
                    await attempt.execute()
                except Exception:  # a runner bug must not kill the worker; the heartbeat goes stale -> requeue
                    log.exception("job_runner_failed")
        finally:
            self._attempts.pop(job.name, None)


def service_worker(
    settings: JobServiceSettings, store: JobStore, kinds: Mapping[str, str], service: str
) -> Worker | None:
    """The job worker a service runs next to its gRPC server (None when ``worker_enabled`` is off). Its children
    get the S3 credentials in their environment (``services.core.jobs.secrets``), never in the stored spec, and
    the service's own gRPC credentials as the SDK's variables (``YARD_TOKEN``, ``YARD_TLS_*_FILE``), so that the
    clients a job makes call the other services as the service does."""
    if not settings.worker_enabled:
        return None
    child_env = {
        "YARD_JOB_S3_ACCESS_KEY": settings.s3.access_key,
        "YARD_JOB_S3_SECRET_KEY": settings.s3.secret_key.get_secret_value(),
        **settings.client_credentials().child_env(),
    }
    return Worker(
        store,
        kinds,
        workdir_root=settings.workdir_for(service),
        slots=settings.worker_slots,
        poll_interval_s=settings.worker_poll_interval_s,
        heartbeat_s=settings.heartbeat_s,
        heartbeat_timeout_s=settings.heartbeat_timeout_s,
        cancel_grace_s=settings.cancel_grace_s,
        child_env=child_env,
    )


@dataclass
class JobServiceApp(Generic[S, J]):
    """A job service's process: its settings, its domain (``jobs``), the gRPC server and the worker next to it.
    ``start`` listens, then claims jobs; the worker stops in the server's shutdown (``server.on_shutdown``)."""

    settings: S
    jobs: J
    worker: Worker | None
    server: GrpcServer

    async def start(self) -> None:
        await self.server.start()
        if self.worker is not None:
            await self.worker.start()

    async def stop(self, grace: float | None = None) -> None:
        await self.server.stop(grace)
