"""What every `yard` sub-command shares: one-line errors, the async SDK command wrapper, resource names
given on the command line, and the live progress line of a job (``watch_with_progress``)."""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any, NoReturn, Protocol, TypeVar

import typer
from google.rpc import status_pb2
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from cli.output import make_console
from modelyard.client import DomainError, ServiceClient, Unavailable, error_from_status
from modelyard.common.v1 import common_pb2 as cpb

console = make_console()
err_console = make_console(stderr=True)

C = TypeVar("C", bound=ServiceClient)


class CliError(Exception):
    """A usage error found by the CLI itself (exit 1 with the message)."""


def fail(message: str, reason: str | None = None, fields: list[str] | None = None) -> NoReturn:
    suffix = f" [{reason}]" if reason else ""
    err_console.print(f"[red]error:[/red] {message}{suffix}", highlight=False)
    for field in fields or []:
        err_console.print(f"  - {field}", highlight=False)
    raise typer.Exit(1)


def fail_with(err: DomainError, service: str = "", target: str = "") -> NoReturn:
    """One line for a typed error (message, ErrorInfo reason), then its field violations; exit 1."""
    if isinstance(err, Unavailable) and err.reason == "UNAVAILABLE" and service:
        fail(f"{service} at {target} is unavailable: {err.message}", err.reason)
    fail(err.message, err.reason, [f"{v.field}: {v.description}" for v in err.violations][:20])


def _run(coro: Callable[[], Awaitable[None]], service: str, target: Callable[[], str]) -> None:
    try:
        asyncio.run(coro())  # type: ignore[arg-type]
    except DomainError as err:
        fail_with(err, service, target())
    except CliError as err:
        fail(str(err))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _hide_first_parameter(wrapper: Callable[..., None], fn: Callable[..., Any]) -> None:
    signature = inspect.signature(fn, eval_str=True)
    wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=list(signature.parameters.values())[1:])


def client_command(
    service: str, client_factory: Callable[[], C],
) -> Callable[[Callable[..., Awaitable[None]]], Callable[..., None]]:
    """A decorator running an async command with an SDK client (``modelyard.client``) of ``service``.

    The client raises typed ``DomainError``s; they print as one line (message and ErrorInfo
    reason, plus the field violations) and exit 1. The decorated function's first parameter (the
    client) is hidden from typer.
    """

    def decorate(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> None:
            targets: list[str] = []

            async def run() -> None:
                async with client_factory() as client:  # made inside the loop: a grpc.aio channel binds to it
                    targets.append(client.target)
                    await fn(client, *args, **kwargs)

            _run(run, service, lambda: targets[0] if targets else "")

        _hide_first_parameter(wrapper, fn)
        return wrapper

    return decorate


# ----------------------------------------------------------------------------- resource names


def resource_name(name: str, collection: str) -> str:
    """``m/v`` -> ``{collection}/m/versions/v``; full names pass through (``collection`` is models or datasets)."""
    if name.startswith(f"{collection}/"):
        return name
    model, sep, version = name.partition("/")
    if not sep or not version:
        raise CliError(f"{name!r}: expected NAME/VERSION or {collection}/NAME/versions/VERSION")
    return f"{collection}/{model}/versions/{version}"


def model_name(name: str) -> str:
    """``m`` -> ``models/m``; ``models/m`` passes through."""
    return name if name.startswith("models/") else f"models/{name}"


# ----------------------------------------------------------------------------- jobs

WATCH_TIMEOUT_S = 7 * 24 * 3600.0  # a Watch follows a job to its end: a deadline, but a far one


def state_text(value: int) -> str:
    """``JOB_STATE_RUNNING`` -> ``running``."""
    return cpb.JobState.Name(value).removeprefix("JOB_STATE_").lower()


class _Job(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def state(self) -> Any: ...
    @property
    def error(self) -> status_pb2.Status: ...
    def HasField(self, field_name: str) -> bool: ...  # noqa: N802 - the protobuf method


J = TypeVar("J", bound=_Job)


def _loss_detail(event: cpb.JobEvent) -> str | None:
    values = event.metrics.values
    return f"loss {values['loss']:.4f}" if event.WhichOneof("payload") == "metrics" and "loss" in values else None


async def watch_with_progress(
    name: str,
    watch: Callable[..., AsyncIterator[cpb.JobEvent]],
    get: Callable[[str], Awaitable[J]],
    *,
    detail: Callable[[cpb.JobEvent], str | None] = _loss_detail,
    initial_detail: str = "loss -",
    echo_logs: tuple[str, ...] = (),
    live_console: Console | None = None,
) -> J:
    """Follow a job with one live progress line; the finished job, or exit 1 with its error unless it succeeded.

    ``watch(name, timeout=...)`` streams the job's events and ``get(name)`` fetches it (a client's
    ``watch_xxx_job`` / ``get_xxx_job``). The line shows the state, a bar with step/total (or a
    percentage when the job reports only a fraction), ``detail`` (what ``detail(event)`` last returned:
    the loss by default) and the eta; log lines starting with one of ``echo_logs`` print above it.
    The line goes to ``live_console`` (default: stdout).
    """
    progress = Progress(TextColumn("[bold]{task.fields[state]}"), BarColumn(), TextColumn("{task.fields[count]}"),
                        TextColumn("{task.fields[detail]}"), TextColumn("eta {task.fields[eta]}"),
                        TimeRemainingColumn(), console=live_console or console, transient=False)
    with progress:
        task = progress.add_task(name, total=None, state="queued", count="0/?", detail=initial_detail, eta="-")
        steps = 0  # total steps, once the job reported them (the bar then counts steps, not a fraction)
        async for event in watch(name, timeout=WATCH_TIMEOUT_S):
            which = event.WhichOneof("payload")
            update: dict[str, Any] = {}
            if which == "metrics":
                values = event.metrics.values
                if "total_steps" in values:
                    steps = int(values["total_steps"])
                    update["total"] = steps
                if "eta_seconds" in values:
                    update["eta"] = str(timedelta(seconds=int(values["eta_seconds"])))
                if event.metrics.step and (steps or "progress_fraction" not in values):
                    update["completed"] = event.metrics.step
                    update["count"] = f"{event.metrics.step}/{steps or '?'}"
                elif not steps and "progress_fraction" in values:
                    update.update(total=1.0, completed=values["progress_fraction"],
                                  count=f"{values['progress_fraction']:.0%}")
            elif which == "state_change":
                update["state"] = state_text(event.state_change.state)
                if event.state_change.state == cpb.JOB_STATE_SUCCEEDED and not steps:
                    update.update(total=1.0, completed=1.0, count="100%")  # a fraction's last report may be < 1
            elif which == "log" and echo_logs and event.log.line.startswith(echo_logs):
                progress.console.print(event.log.line, style="dim", highlight=False, markup=False)
            text = detail(event)
            if text is not None:
                update["detail"] = text
            if update:
                progress.update(task, **update)
    job = await get(name)
    if job.state == cpb.JOB_STATE_SUCCEEDED:
        return job
    if job.HasField("error"):
        err = error_from_status(job.error)
        fail(f"{name} {state_text(job.state)}: {err.message}", err.reason)
    fail(f"{name} {state_text(job.state)}")


async def print_job_logs(events: AsyncIterator[cpb.JobEvent]) -> None:
    """Print the log lines of a job's event stream (until the stream ends with the job)."""
    async for event in events:
        if event.WhichOneof("payload") == "log":
            console.print(event.log.line, highlight=False, markup=False)
