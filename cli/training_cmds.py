"""``yard train ...`` and ``yard jobs ...``: the training service from the command line.

Commands talk to the training service at ``YARD_TRAINING_ADDR`` (default 127.0.0.1:50052) through the SDK's
``TrainingClient``. Errors print one line with the message and the ErrorInfo reason (and the fields at fault)
and exit 1; no stack trace. ``--watch`` / ``yard jobs watch`` show a live progress bar (step/total, loss,
eta). ``yard train ... --dry-run`` runs the service's preflight only and prints the resolved hyperparameters
(the defaults the job would use). ``list`` / ``show`` take ``-o table|json|yaml`` (``cli.output``).

``yard jobs`` covers quantization jobs too (``cli.quantization_cmds``, ``YARD_QUANTIZATION_ADDR``):
``quantizationJobs/ID`` goes to the quantization service, ``trainingJobs/ID`` to training, and a bare ID to
training first, then quantization when training has no such job. ``yard jobs list`` lists both
(``--service training|quantization|all``).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from google.protobuf import json_format
from google.protobuf.message import Message
from pydantic_settings import BaseSettings, SettingsConfigDict
from rich.table import Table

from cli import quantization_cmds as quant
from cli.common import (
    WATCH_TIMEOUT_S,
    CliError,
    client_command,
    err_console,
    fail_with,
    model_name,
    print_job_logs,
    resource_name,
    state_text,
    watch_with_progress,
)
from cli.output import OutputFormat, OutputOption, emit, make_console, new_table
from modelyard.client import DomainError, NotFound, TrainingClient, Unavailable
from modelyard.client.training import ENUM_PREFIXES, full_enum_names
from modelyard.common.v1 import common_pb2 as cpb
from modelyard.quantization.v1 import quantization_pb2 as qpb
from modelyard.training.v1 import training_pb2 as pb
from services.core.status import error_from_status_proto

console = make_console()
train_app = typer.Typer(help="Fine-tune a registry model: sft (lora, qlora, dora, full), dpo, orpo, kto, simpo, cpo.",
                        no_args_is_help=True)
jobs_app = typer.Typer(help="Training and quantization jobs: list, show, watch, logs, cancel.", no_args_is_help=True)

HYPERPARAMETERS = {f.name for f in pb.Hyperparameters.DESCRIPTOR.fields}
# Short enum values accepted in --config / --set: field name -> enum value prefix.
TERMINAL = {cpb.JOB_STATE_SUCCEEDED, cpb.JOB_STATE_FAILED, cpb.JOB_STATE_CANCELLED}


class TrainingClientSettings(BaseSettings):
    """Where the CLI finds the training service."""

    model_config = SettingsConfigDict(env_prefix="YARD_TRAINING_", extra="ignore")

    addr: str = "127.0.0.1:50052"


command = client_command("training service", lambda: TrainingClient(TrainingClientSettings().addr, timeout=60))


def job_name(name: str) -> str:
    return name if name.startswith("trainingJobs/") else f"trainingJobs/{name}"


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix).lower()


def _set(target: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) == 1 and parts[0] in HYPERPARAMETERS:
        parts = ["hyperparameters", *parts]
    for part in parts[:-1]:
        target = target.setdefault(part, {})
    target[parts[-1]] = value


def build_spec(config: Path | None, overrides: list[str], **fields: Any) -> pb.TrainingJobSpec:
    """The spec from a YAML file (TrainingJobSpec fields), then ``fields``, then ``--set key=value``."""
    data: dict[str, Any] = {}
    if config is not None:
        try:
            loaded = yaml.safe_load(config.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise CliError(f"--config {config}: {exc}") from None
        if not isinstance(loaded, dict):
            raise CliError(f"--config {config}: expected a mapping of TrainingJobSpec fields")
        data = loaded
    for key, value in fields.items():
        if value not in (None, [], ""):
            _set(data, key, value)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CliError(f"--set {item!r}: expected KEY=VALUE (e.g. learning_rate=2e-4, launcher.type=deepspeed)")
        _set(data, key.strip(), yaml.safe_load(raw))
    try:
        return json_format.ParseDict(full_enum_names(data), pb.TrainingJobSpec())
    except json_format.ParseError as exc:
        raise CliError(f"invalid job spec: {exc}") from None


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def resolved_hyperparameters(job: pb.TrainingJob) -> dict[str, str]:
    """The job's hyperparameters as the service resolved them, as printed by ``--dry-run`` (short enum names)."""
    hp = job.spec.hyperparameters
    rows: dict[str, str] = {}
    for fd in hp.DESCRIPTOR.fields:
        value = getattr(hp, fd.name)
        if fd.enum_type is not None:
            value = fd.enum_type.values_by_number[value].name.removeprefix(ENUM_PREFIXES[fd.name]).lower()
        elif fd.is_repeated:
            value = list(value)
        rows[fd.name] = _value_text(value)
    return rows


def _launcher_text(job: pb.TrainingJob) -> str:
    launcher = job.spec.launcher
    text = f"{_enum_name(pb.LauncherType, launcher.type, 'LAUNCHER_TYPE_')}, {launcher.num_processes} process(es)"
    if launcher.type == pb.LAUNCHER_TYPE_DEEPSPEED:
        text += f", ZeRO-{launcher.zero_stage}" + (", offload optimizer" if launcher.offload_optimizer else "") + (
            ", offload parameters" if launcher.offload_parameters else "")
    return text


def _preflight_text(job: pb.TrainingJob) -> str:
    pre = job.preflight
    return (f"{pre.accelerator}, {_enum_name(pb.Precision, pre.precision, 'PRECISION_')}, "
            f"~{pre.estimated_memory_bytes / 2**30:.2f} GiB of {pre.available_memory_bytes / 2**30:.2f} GiB, "
            f"{pre.trainable_parameter_count:,} of {pre.parameter_count:,} parameters trained")


def dry_run_table(job: pb.TrainingJob) -> Table:
    """What ``--dry-run`` prints: the preflight verdict, the launcher and every resolved hyperparameter."""
    table = new_table("setting", "value", box=None)
    table.add_row("method", _method(job))
    table.add_row("preflight", _preflight_text(job))
    table.add_row("launcher", _launcher_text(job))
    table.add_row("output model", job.spec.output_model)
    for name, value in resolved_hyperparameters(job).items():
        table.add_row(name, value)
    return table


async def _create(client: TrainingClient, kind: str, model: str, datasets: list[str], method: str,
                  config: Path | None, overrides: list[str], validation: str | None, output_model: str | None,
                  merge: bool, job_id: str | None, display_name: str | None, watch: bool, dry_run: bool,
                  output: OutputFormat) -> None:
    if kind == "sft":
        if method not in ("lora", "qlora", "dora", "full"):
            raise CliError(f"--method {method!r}: sft takes lora, qlora, dora or full")
        proto_method, full_weights = method, None
    else:
        if method not in ("lora", "full"):
            raise CliError(f"--method {method!r}: {kind} takes lora or full")
        proto_method, full_weights = kind, method == "full" or None
    if dry_run and watch:
        raise CliError("--dry-run queues nothing to --watch")
    spec = build_spec(
        config, overrides, base_model_version=resource_name(model, "models"),
        dataset_versions=[resource_name(d, "datasets") for d in datasets], method=proto_method,
        validation_dataset_version=resource_name(validation, "datasets") if validation else None,
        output_model=model_name(output_model) if output_model else None,
        merge_adapter=merge or None, full_weights=full_weights)
    training_job = pb.TrainingJob(spec=spec, display_name=display_name or "")
    if dry_run:
        job = await client.create_training_job(training_job, training_job_id=job_id or "", validate_only=True)
        emit(job, output, lambda: dry_run_table(job), console=console)
        return
    job = await client.create_training_job(training_job, training_job_id=job_id or "")
    pre = job.preflight
    emit(job, output, lambda: f"[green]queued[/green] {job.name}  ({_method(job)} on {pre.accelerator}, "
                              f"{_enum_name(pb.Precision, pre.precision, 'PRECISION_')}, "
                              f"~{pre.estimated_memory_bytes / 2**30:.2f} GiB of "
                              f"{pre.available_memory_bytes / 2**30:.2f} GiB)", console=console)
    if watch:
        await _watch(client, job.name)


def _train_command(kind: str, default_method: str) -> None:
    @train_app.command(kind, help=f"Start a {kind} job (preflight runs first; nothing is queued if it fails).")
    @command
    async def train(
        client: TrainingClient,
        model: Annotated[str, typer.Option("--model", "-m", help="Base model version: NAME/VERSION or models/NAME/versions/V.")],
        dataset: Annotated[list[str], typer.Option("--dataset", "-d", help="Dataset version (repeatable): NAME/VERSION.")],
        method: Annotated[str, typer.Option("--method", help="sft: lora|qlora|dora|full; preference: lora|full.")] = default_method,
        config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML file of TrainingJobSpec fields.")] = None,
        set_: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE override, e.g. learning_rate=2e-4.")] = None,
        validation_dataset: Annotated[str | None, typer.Option("--validation-dataset", help="Validation dataset version.")] = None,
        output_model: Annotated[str | None, typer.Option("--output-model", help="Registry model for the result.")] = None,
        merge: Annotated[bool, typer.Option("--merge", help="Also merge the adapter into the base model.")] = False,
        name: Annotated[str | None, typer.Option("--name", help="Job id (trainingJobs/ID).")] = None,
        display_name: Annotated[str | None, typer.Option("--display-name", help="Free-form description.")] = None,
        watch: Annotated[bool, typer.Option("--watch", "-w", help="Follow the job with a live progress bar.")] = False,
        dry_run: Annotated[bool, typer.Option("--dry-run", help=(
            "Run preflight only and print the resolved hyperparameters (every default filled); queue nothing."))] = False,
        output: OutputOption = OutputFormat.table,
    ) -> None:
        await _create(client, kind, model, dataset, method, config, set_ or [], validation_dataset, output_model,
                      merge, name, display_name, watch, dry_run, output)


for _kind in ("sft", "dpo", "orpo", "kto", "simpo", "cpo"):
    _train_command(_kind, "lora")


# ----------------------------------------------------------------------------- jobs


_state = state_text


def _method(job: pb.TrainingJob) -> str:
    if job.kind == pb.TRAINING_JOB_KIND_MERGE:
        return "merge"
    return _enum_name(pb.TrainingMethod, job.spec.method, "TRAINING_METHOD_")


def _progress_text(job: pb.TrainingJob) -> str:
    p = job.progress
    if not p.total_steps:
        return f"{p.fraction:.0%}" if p.fraction else ""
    loss = p.metrics.get("loss")
    return f"{p.step}/{p.total_steps}" + (f" loss {loss:.4f}" if loss is not None else "")


def _created(job: Any) -> str:
    return job.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")


def jobs_table(jobs: list[pb.TrainingJob | qpb.QuantizationJob]) -> Table:
    """Training and quantization jobs, one row each (``kind``: train, merge or quantize)."""
    table = new_table("name", "kind", "method", "state", "progress", "created", "output")
    for job in jobs:
        if isinstance(job, qpb.QuantizationJob):
            table.add_row(job.name.removeprefix(quant.JOB_PREFIX), "quantize", quant.method_text(job.spec.method),
                          _state(job.state), quant.progress_text(job), _created(job), job.outputs.model_version)
            continue
        table.add_row(job.name.removeprefix("trainingJobs/"),
                      "merge" if job.kind == pb.TRAINING_JOB_KIND_MERGE else "train", _method(job), _state(job.state),
                      _progress_text(job), _created(job), job.outputs.model_version or job.outputs.merged_model_version)
    return table


class JobService(StrEnum):
    """``yard jobs list --service``."""

    training = "training"
    quantization = "quantization"
    all = "all"


def _is_quantization_method(method: str) -> bool:
    return method.lower() in quant.METHODS or method.upper().startswith("QUANTIZATION_METHOD_")


def _sorted_by_create_time(jobs: list[Any], order_by: str) -> list[Any]:
    """Jobs of both services in one order: create_time (the default, newest first); other orders keep each
    service's own order, training first."""
    order = " ".join(order_by.split()).lower()
    if order not in ("", "create_time", "create_time desc", "create_time asc"):
        return jobs
    return sorted(jobs, key=lambda j: (j.create_time.seconds, j.create_time.nanos), reverse=order in ("", "create_time desc"))


async def _list_quantization_jobs(terms: list[str], order_by: str, page_size: int, all_pages: bool,
                                  required: bool) -> tuple[list[qpb.QuantizationJob], str, str]:
    """(jobs, next page token, why none were listed): an unreachable service is an error only when ``required``."""
    jobs: list[qpb.QuantizationJob] = []
    token = ""
    async with quant.quantization_client(retry_attempts=5 if required else 1) as client:
        try:
            while True:
                resp = await client.list_quantization_jobs(filter=" AND ".join(terms), order_by=order_by,
                                                           page_size=page_size, page_token=token)
                jobs += resp.quantization_jobs
                token = resp.next_page_token
                if not (all_pages and token):
                    break
        except Unavailable as err:
            if required:
                fail_with(err, "quantization service", client.target)
            return [], "", f"quantization service at {client.target} is unavailable: its jobs are not listed"
        except DomainError as err:
            fail_with(err, "quantization service", client.target)
    return jobs, token, ""


@jobs_app.command("list")
@command
async def list_jobs(
    client: TrainingClient,
    state: Annotated[str | None, typer.Option("--state", help="queued, running, succeeded, failed or cancelled.")] = None,
    method: Annotated[str | None, typer.Option("--method", help="lora, full, dpo, ..., merge; or awq, gptq, w8a8...")] = None,
    filter_: Annotated[str | None, typer.Option("--filter", help='AIP-160 filter, e.g. \'create_time > "2026-01-01T00:00:00Z"\'.')] = None,
    order_by: Annotated[str, typer.Option("--order-by", help="e.g. 'create_time desc' (default), 'name'.")] = "",
    page_size: Annotated[int, typer.Option("--page-size", help="Jobs per request.")] = 50,
    all_pages: Annotated[bool, typer.Option("--all", help="Fetch every page.")] = False,
    service: Annotated[JobService, typer.Option("--service", case_sensitive=False,
                                                help="Whose jobs: training, quantization or all.")] = JobService.all,
    output: OutputOption = OutputFormat.table,
) -> None:
    """List training and quantization jobs, newest first."""
    quantization_method = bool(method) and _is_quantization_method(method or "")
    # A --method belongs to one service: with --service all, only that service is asked.
    want_training = service is JobService.training or (service is JobService.all and not quantization_method)
    want_quantization = service is JobService.quantization or (
        service is JobService.all and (not method or quantization_method))
    extra = [filter_] if filter_ else []
    jobs: list[Any] = []
    more: list[tuple[str, str]] = []
    if want_training:
        terms = [f"{key} = {value}" for key, value in (("state", state), ("method", method)) if value] + extra
        token = ""
        while True:
            resp = await client.list_training_jobs(filter=" AND ".join(terms), order_by=order_by,
                                                   page_size=page_size, page_token=token)
            jobs += resp.training_jobs
            token = resp.next_page_token
            if not (all_pages and token):
                break
        if token:
            more.append(("more training jobs" if want_quantization else "more", token))
    skipped = ""
    if want_quantization:
        quant_method = qpb.QuantizationMethod.Name(quant.METHODS[method.lower()]) \
            if method and method.lower() in quant.METHODS else method
        terms = [f"{key} = {value}" for key, value in (("state", state), ("method", quant_method)) if value] + extra
        quantization_jobs, token, skipped = await _list_quantization_jobs(
            terms, order_by, page_size, all_pages, required=service is JobService.quantization)
        if quantization_jobs and jobs:
            jobs = _sorted_by_create_time(jobs + quantization_jobs, order_by)
        else:
            jobs += quantization_jobs
        if token:
            more.append(("more quantization jobs", token))
    emit(jobs, output, lambda: jobs_table(jobs), console=console)
    if output is OutputFormat.table:
        for what, token in more:
            console.print(f"{what}: --all, or page token {token}", style="dim")
        if skipped:
            err_console.print(skipped, style="dim", highlight=False)


def job_rows(job: pb.TrainingJob) -> list[tuple[str, str]]:
    spec, hp = job.spec, job.spec.hyperparameters
    rows = [
        ("name", job.name), ("kind", "merge" if job.kind == pb.TRAINING_JOB_KIND_MERGE else "train"),
        ("method", _method(job)), ("state", _state(job.state)), ("attempts", str(job.attempt_count)),
        ("base model", spec.base_model_version), ("datasets", ", ".join(spec.dataset_versions)),
        ("output model", spec.output_model),
        ("created", job.create_time.ToDatetime().isoformat(sep=" ", timespec="seconds")),
    ]
    if job.kind == pb.TRAINING_JOB_KIND_TRAIN:
        rows += [
            ("hyperparameters", f"lr {hp.learning_rate:g}, {_enum_name(pb.LrScheduler, hp.lr_scheduler, 'LR_SCHEDULER_')}"
                                f", batch {hp.batch_size} x {hp.gradient_accumulation_steps}, max_length {hp.max_length}"
                                f", lora r{hp.lora_rank}/a{hp.lora_alpha}"),
            ("launcher", _launcher_text(job)),
            ("preflight", _preflight_text(job)),
        ]
    rows.append(("progress", _progress_text(job)))
    if job.outputs.model_version:
        rows.append(("model version", job.outputs.model_version))
    if job.outputs.merged_model_version:
        rows.append(("merged version", job.outputs.merged_model_version))
    if job.HasField("error"):
        err = error_from_status_proto(job.error)
        rows.append(("error", f"{err.message} [{err.reason}]"))
    return rows


def job_table(job: pb.TrainingJob) -> Table:
    table = new_table(show_header=False, box=None)
    table.add_column()
    table.add_column(overflow="fold")
    for key, value in job_rows(job):
        table.add_row(f"[bold]{key}[/bold]", value)
    return table


async def _locate(client: TrainingClient, name: str) -> tuple[str, str, Message | None]:
    """The service a job named on the command line belongs to: (service, full name, the job when fetched).

    ``quantizationJobs/ID`` is a quantization job and ``trainingJobs/ID`` a training one; a bare ID is looked up
    in training, then (not found there) in quantization; not found in either: training's NOT_FOUND.
    """
    if name.startswith(quant.JOB_PREFIX):
        return "quantization", name, None
    if "/" in name:
        return "training", job_name(name), None
    try:
        return "training", job_name(name), await client.get_training_job(job_name(name))
    except NotFound as not_found:
        try:
            async with quant.quantization_client(retry_attempts=1) as quantization:
                found = await quantization.get_quantization_job(quant.job_name(name))
        except DomainError:  # not there either, or no quantization service to ask
            raise not_found from None
        return "quantization", found.name, found


JOB_HELP = "Job id, trainingJobs/ID or quantizationJobs/ID."


@jobs_app.command("show")
@command
async def show_job(client: TrainingClient, name: Annotated[str, typer.Argument(help=JOB_HELP)],
                   output: OutputOption = OutputFormat.table) -> None:
    """Show one job: spec, preflight, progress, outputs, error."""
    service, full, found = await _locate(client, name)
    if service == "quantization":
        if found is None:
            async with quant.quantization_service() as quantization:
                found = await quantization.get_quantization_job(full)
        qjob = found
        emit(qjob, output, lambda: quant.job_table(qjob), console=console)  # type: ignore[arg-type]
        return
    job = found or await client.get_training_job(full)
    emit(job, output, lambda: job_table(job), console=console)  # type: ignore[arg-type]


@jobs_app.command("cancel")
@command
async def cancel_job(client: TrainingClient, name: Annotated[str, typer.Argument(help=JOB_HELP)]) -> None:
    """Cancel a queued or running job."""
    service, full, _ = await _locate(client, name)
    if service == "quantization":
        async with quant.quantization_service() as quantization:
            job: Any = await quantization.cancel_quantization_job(full)
    else:
        job = await client.cancel_training_job(full)
    console.print(f"cancel requested for {job.name} (state {_state(job.state)})", highlight=False)


@jobs_app.command("logs")
@command
async def job_logs(client: TrainingClient, name: Annotated[str, typer.Argument(help=JOB_HELP)]) -> None:
    """Print the job's log lines, following them until the job ends."""
    service, full, _ = await _locate(client, name)
    if service == "quantization":
        async with quant.quantization_service() as quantization:
            await quant.logs(quantization, full)
        return
    await print_job_logs(client.watch_training_job(full, timeout=WATCH_TIMEOUT_S))


@jobs_app.command("watch")
@command
async def watch_job(client: TrainingClient, name: Annotated[str, typer.Argument(help=JOB_HELP)]) -> None:
    """Follow a job with a live progress bar (step/total, loss, eta); exit 1 unless it succeeds."""
    service, full, _ = await _locate(client, name)
    if service == "quantization":
        async with quant.quantization_service() as quantization:
            await quant.watch(quantization, full)
        return
    await _watch(client, full)


async def _watch(client: TrainingClient, name: str) -> None:
    job = await watch_with_progress(name, client.watch_training_job, client.get_training_job,
                                    echo_logs=("checkpoint saved", "version registered"))
    for label, value in (("model version", job.outputs.model_version),
                         ("merged version", job.outputs.merged_model_version)):
        if value:
            console.print(f"{label}: {value}", highlight=False)


@jobs_app.command("merge")
@command
async def merge_job(
    client: TrainingClient,
    adapter: Annotated[str, typer.Argument(help="Adapter version: NAME/VERSION or models/NAME/versions/V.")],
    output_model: Annotated[str | None, typer.Option("--output-model", help="Registry model for the merged version.")] = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Follow the merge job.")] = False,
) -> None:
    """Merge a registered adapter into its base model (a merge job)."""
    resp = await client.merge_adapter(
        adapter_version=resource_name(adapter, "models"), output_model=model_name(output_model) if output_model else "")
    console.print(f"[green]queued[/green] {resp.training_job.name}", highlight=False)
    if watch:
        await _watch(client, resp.training_job.name)
