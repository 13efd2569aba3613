"""``yard pipeline ...``: the whole flow as one durable run (the pipeline service, ``YARD_PIPELINE_ADDR``,
default 127.0.0.1:50056).

``yard pipeline run FILE.yaml --param k=v`` sends the document (checked by the service before anything runs:
errors name the step and field), then follows the run: a line per step change, a live line with the running
step's progress and metric (loss, samples/s), and at the end the steps and the report table. The run lives in
the service: closing the terminal (or Ctrl-C) stops only the following; ``yard pipeline watch RUN`` picks it up
anywhere, ``yard pipeline retry RUN`` resumes a failed run at its failed step.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic_settings import BaseSettings, SettingsConfigDict
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from cli.common import CliError, client_command, console, err_console, fail, state_text
from cli.output import OutputFormat, OutputOption, emit, new_table
from modelyard.client import PipelineClient, error_from_status
from modelyard.common.v1 import common_pb2 as cpb
from modelyard.pipeline.v1 import pipeline_pb2 as pb

PREFIX = "pipelineRuns/"
WATCH_TIMEOUT_S = 7 * 24 * 3600.0

pipeline_app = typer.Typer(help="Run whole flows from a YAML file: run, watch, show, list, cancel, retry.",
                           no_args_is_help=True)  # fmt: skip


class PipelineClientSettings(BaseSettings):
    """Where the CLI finds the pipeline service."""

    model_config = SettingsConfigDict(env_prefix="YARD_PIPELINE_", extra="ignore")

    addr: str = "127.0.0.1:50056"


def pipeline_client(**kwargs: Any) -> PipelineClient:
    return PipelineClient(PipelineClientSettings().addr, **{"timeout": 60, **kwargs})


command = client_command("pipeline service", pipeline_client)


def run_name(name: str) -> str:
    return name if name.startswith(PREFIX) else f"{PREFIX}{name}"


def _step_state(value: int) -> str:
    return pb.StepState.Name(value).removeprefix("STEP_STATE_").lower()


_STATE_STYLE = {"succeeded": "green", "failed": "red", "running": "cyan", "cancelled": "yellow", "pending": "dim"}


def _seconds(step: pb.StepStatus) -> str:
    if not step.HasField("start_time"):
        return ""
    if not step.HasField("end_time"):
        return "…"
    s = (step.end_time.ToDatetime() - step.start_time.ToDatetime()).total_seconds()
    return f"{s:.0f} s" if s < 600 else f"{s / 60:.1f} min"


def steps_table(run: pb.PipelineRun) -> Table:
    t = new_table("step", "type", "state", "resource", "time", "outputs")
    for s in run.steps:
        state = _step_state(s.state)
        outputs = ", ".join(f"{k}={v}" for k, v in sorted(s.outputs.items()) if k in ("model_version", "dataset_version",
                                                                                     "deployment", "text"))  # fmt: skip
        if s.HasField("error"):
            outputs = f"[red]{error_from_status(s.error).message}[/red]"
        t.add_row(s.id, s.type, f"[{_STATE_STYLE.get(state, '')}]{state}[/]", s.resource, _seconds(s), outputs)
    return t


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n else "-"


def report_table(run: pb.PipelineRun) -> Table | None:
    r = run.outputs.report
    if not r.rows:
        return None
    t = new_table("version", "model version", f"{r.benchmark.removeprefix('benchmarks/')} {r.metric} ± 95% CI",
                  "n", "size", "decode tok/s", title="report")  # fmt: skip
    for row in r.rows:
        t.add_row(row.label, row.model_version.removeprefix("models/"),
                  f"{row.score:.3f} ± {row.score_ci95:.3f}", str(row.num_samples), _size(row.size_bytes),
                  f"{row.decode_tokens_per_second:.1f}" if row.decode_tokens_per_second else "-")  # fmt: skip
    return t


def report_lines(run: pb.PipelineRun) -> list[str]:
    r = run.outputs.report
    lines = list(r.notes)
    times = [s for s in run.steps if s.HasField("end_time") and s.HasField("start_time")]
    if times:
        lines.append("step times: " + " · ".join(f"{s.id} {_seconds(s)}" for s in times))
    if run.HasField("start_time") and run.HasField("end_time"):
        total = (run.end_time.ToDatetime() - run.start_time.ToDatetime()).total_seconds()
        lines.append(f"run time: {total:.0f} s")
    return lines


def run_table(run: pb.PipelineRun) -> Table:
    head = new_table(show_header=False, box=None)
    head.add_column()
    head.add_column(overflow="fold")
    rows = [("name", run.name), ("display name", run.display_name), ("state", state_text(run.state)),
            ("attempts", str(run.attempt_count)),
            ("created", run.create_time.ToDatetime().isoformat(sep=" ", timespec="seconds"))]  # fmt: skip
    if run.params:
        rows.append(("params", ", ".join(f"{k}={v}" for k, v in sorted(run.params.items()))))
    if run.HasField("error"):
        err = error_from_status(run.error)
        rows.append(("error", f"{err.message} [{err.reason}]"))
    for k, v in rows:
        if v:
            head.add_row(f"[bold]{k}[/bold]", v)
    outer = new_table(show_header=False, box=None)
    outer.add_column()
    outer.add_row(head)
    outer.add_row(steps_table(run))
    report = report_table(run)
    if report is not None:
        outer.add_row(report)
    for line in report_lines(run):
        outer.add_row(line)
    return outer


def _detail(values: dict[str, float]) -> str:
    for key, fmt in (("loss", "loss {:.4f}"), ("samples_per_s", "{:.2f} samples/s"), ("tokens_per_second", "{:.0f} tok/s")):
        for name, value in values.items():
            if name.endswith(f".{key}"):
                return fmt.format(value)
    return ""


async def follow(client: PipelineClient, name: str, output: OutputFormat | str = OutputFormat.table) -> pb.PipelineRun:
    """Follow the run to its end: step lines, a live progress line; then the steps and the report."""
    live = console if OutputFormat(output) is OutputFormat.table else err_console
    progress = Progress(TextColumn("[bold]{task.fields[step]}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                        TextColumn("{task.fields[detail]}"), console=live, transient=True)  # fmt: skip
    last = 0
    with progress:
        task = progress.add_task(name, total=1.0, step="queued", detail="")
        while True:
            seen = last
            async for event in client.watch_pipeline_run(name, after_sequence=last, timeout=WATCH_TIMEOUT_S):
                last = event.sequence
                which = event.WhichOneof("payload")
                if which == "log" and event.log.line.startswith("step "):
                    line = event.log.line.split(" step=")[0]  # the message; its fields are for machines
                    style = "red" if " failed" in line else ("green" if line.endswith("succeeded") else "")
                    progress.console.print(f"[{style}]{line}[/]" if style else line, highlight=False)
                    parts = line.split()
                    progress.update(task, step=f"{parts[1]}" if len(parts) > 1 else "", detail="")
                elif which == "metrics":
                    values = dict(event.metrics.values)
                    update: dict[str, Any] = {}
                    if "progress_fraction" in values:
                        update["completed"] = values["progress_fraction"]
                    text = _detail(values)
                    if text:
                        update["detail"] = text
                    if update:
                        progress.update(task, **update)
                elif which == "state_change":
                    progress.update(task, step=state_text(event.state_change.state))
            run = await client.get_pipeline_run(name)
            if run.state in (cpb.JOB_STATE_SUCCEEDED, cpb.JOB_STATE_FAILED, cpb.JOB_STATE_CANCELLED):
                break
            if last == seen:
                await asyncio.sleep(1.0)
    emit(run, output, lambda: run_table(run), console=console)
    if run.state != cpb.JOB_STATE_SUCCEEDED:
        err = error_from_status(run.error) if run.HasField("error") else None
        fail(f"{run.name} {state_text(run.state)}" + (f": {err.message}" if err else "") +
             f" (resume it with `yard pipeline retry {run.name.removeprefix(PREFIX)}`)",
             err.reason if err else None)  # fmt: skip
    return run


def _params(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--param {item!r}: expected NAME=VALUE")
        out[key.strip()] = value
    return out


@pipeline_app.command("run")
@command
async def run(
    client: PipelineClient,
    file: Annotated[Path, typer.Argument(help="The pipeline document (YAML or JSON).", exists=True, dir_okay=False)],
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="NAME=VALUE for ${params.NAME}.")] = None,
    run_id: Annotated[str | None, typer.Option("--id", help="Run id (pipelineRuns/ID); default: generated.")] = None,
    label: Annotated[list[str] | None, typer.Option("--label", help="KEY=VALUE, repeatable.")] = None,
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Queue it and return (follow it with `watch`).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the document; run nothing.")] = False,
    output: OutputOption = OutputFormat.table,
) -> None:
    """Run a pipeline: checked first, then every step as a job of its service, with live progress and a report."""
    source = file.read_text(encoding="utf-8")
    created = await client.create_pipeline_run(
        source, params=_params(param), working_dir=str(file.resolve().parent), display_name=file.stem,
        labels=_params(label), run_id=run_id or "", validate_only=dry_run,
    )  # fmt: skip
    if dry_run:
        emit(created, output, lambda: steps_table(created), console=console)
        console.print(f"[green]ok[/green]: {len(created.steps)} steps, nothing was run")
        return
    if OutputFormat(output) is OutputFormat.table:
        console.print(f"[green]queued[/green] {created.name}  (it runs in the pipeline service: Ctrl-C stops only "
                      f"this view; `yard pipeline watch {created.name.removeprefix(PREFIX)}` follows it again)",
                      highlight=False)  # fmt: skip
    if detach:
        if OutputFormat(output) is not OutputFormat.table:
            emit(created, output, lambda: "", console=console)
        return
    await follow(client, created.name, output)


@pipeline_app.command("watch")
@command
async def watch(client: PipelineClient, name: Annotated[str, typer.Argument(help="pipelineRuns/ID or ID.")],
                output: OutputOption = OutputFormat.table) -> None:  # fmt: skip
    """Follow a run until it ends, then print its steps and report."""
    await follow(client, run_name(name), output)


@pipeline_app.command("show")
@command
async def show(client: PipelineClient, name: Annotated[str, typer.Argument(help="pipelineRuns/ID or ID.")],
               output: OutputOption = OutputFormat.table) -> None:  # fmt: skip
    """One run: its steps with their states and resources, and the report."""
    r = await client.get_pipeline_run(run_name(name))
    emit(r, output, lambda: run_table(r), console=console)


@pipeline_app.command("list")
@command
async def list_(
    client: PipelineClient,
    filter_: Annotated[str, typer.Option("--filter", help="e.g. state = JOB_STATE_FAILED")] = "",
    limit: Annotated[int, typer.Option("--limit", help="At most this many (0: all).")] = 50,
    output: OutputOption = OutputFormat.table,
) -> None:
    """Pipeline runs, newest first."""
    items = [r async for r in client.iter_pipeline_runs(filter=filter_, limit=limit)]

    def table() -> Table:
        t = new_table("name", "pipeline", "state", "steps done", "current step", "created")
        for r in items:
            done = sum(1 for s in r.steps if s.state == pb.STEP_STATE_SUCCEEDED)
            current = next((s.id for s in r.steps if s.state in (pb.STEP_STATE_RUNNING, pb.STEP_STATE_FAILED)), "")
            t.add_row(r.name, r.display_name, state_text(r.state), f"{done}/{len(r.steps)}", current,
                      r.create_time.ToDatetime().isoformat(sep=" ", timespec="seconds"))  # fmt: skip
        return t

    emit(items, output, table, console=console)


@pipeline_app.command("cancel")
@command
async def cancel(client: PipelineClient, name: Annotated[str, typer.Argument(help="pipelineRuns/ID or ID.")],
                 output: OutputOption = OutputFormat.table) -> None:  # fmt: skip
    """Stop a run and the job of its running step."""
    r = await client.cancel_pipeline_run(run_name(name))
    emit(r, output, lambda: f"{r.name}: {state_text(r.state)} (cancel requested)", console=console)


@pipeline_app.command("retry")
@command
async def retry(
    client: PipelineClient,
    name: Annotated[str, typer.Argument(help="pipelineRuns/ID or ID.")],
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Queue it and return.")] = False,
    output: OutputOption = OutputFormat.table,
) -> None:
    """Resume a failed or cancelled run at the step that did not finish (finished steps are kept)."""
    r = await client.retry_pipeline_run(run_name(name))
    done = [s.id for s in r.steps if s.state == pb.STEP_STATE_SUCCEEDED]
    if OutputFormat(output) is OutputFormat.table:
        console.print(f"[green]queued[/green] {r.name} again (attempt {r.attempt_count}); kept: "
                      f"{', '.join(done) or 'no step'}", highlight=False)  # fmt: skip
    if not detach:
        await follow(client, r.name, output)
