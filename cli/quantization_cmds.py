"""``yard quantize ...``: the quantization service from the command line.

Commands talk to the quantization service at ``YARD_QUANTIZATION_ADDR`` (default 127.0.0.1:50053) through the
SDK's ``QuantizationClient``. Errors print one line with the message and the ErrorInfo reason (and the fields at
fault) and exit 1; no stack trace. ``--dry-run`` runs the service's preflight only and prints the resolved spec
(every default filled) with the memory estimate and the expected size; ``--watch`` follows the job with a live
progress line and prints what it registered (size, quality next to the source, format). ``yard jobs
show|watch|logs|cancel quantizationJobs/ID`` (``cli.training_cmds``) use the helpers here too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import typer
from pydantic_settings import BaseSettings, SettingsConfigDict
from rich.table import Table

from cli.common import (
    CliError,
    client_command,
    console,
    err_console,
    fail_with,
    model_name,
    print_job_logs,
    resource_name,
    state_text,
    watch_with_progress,
)
from cli.output import OutputFormat, OutputOption, emit, new_table
from modelyard.client import DomainError, QuantizationClient, error_from_status
from modelyard.common.v1 import common_pb2 as cpb
from modelyard.quantization.v1 import quantization_pb2 as pb

JOB_PREFIX = "quantizationJobs/"
# --method spellings -> proto enum (and back, for printing).
METHODS = {
    "awq": pb.QUANTIZATION_METHOD_AWQ,
    "gptq": pb.QUANTIZATION_METHOD_GPTQ,
    "w8a8": pb.QUANTIZATION_METHOD_W8A8_INT8,
    "fp8": pb.QUANTIZATION_METHOD_FP8_DYNAMIC,
    "int8": pb.QUANTIZATION_METHOD_INT8_WEIGHT_ONLY,
    "bnb-nf4": pb.QUANTIZATION_METHOD_BNB_4BIT,
    "bnb-int8": pb.QUANTIZATION_METHOD_BNB_8BIT,
}
BACKENDS = {
    "llm-compressor": pb.QUANTIZATION_BACKEND_LLM_COMPRESSOR,
    "autoawq": pb.QUANTIZATION_BACKEND_AUTOAWQ,
    "gptqmodel": pb.QUANTIZATION_BACKEND_GPTQMODEL,
    "bitsandbytes": pb.QUANTIZATION_BACKEND_BITSANDBYTES,
}
CALIBRATED = {pb.QUANTIZATION_METHOD_AWQ, pb.QUANTIZATION_METHOD_GPTQ, pb.QUANTIZATION_METHOD_W8A8_INT8}
_METHOD_TEXT = {value: text for text, value in METHODS.items()}
_BACKEND_TEXT = {value: text for text, value in BACKENDS.items()}
# Log lines of a job printed above the live progress line.
NOTABLE_LOGS = ("layers left unquantized", "version registered", "merged")


class QuantizationClientSettings(BaseSettings):
    """Where the CLI finds the quantization service."""

    model_config = SettingsConfigDict(env_prefix="YARD_QUANTIZATION_", extra="ignore")

    addr: str = "127.0.0.1:50053"


def quantization_client(**kwargs: Any) -> QuantizationClient:
    """A client of the quantization service at ``YARD_QUANTIZATION_ADDR`` (``kwargs``: ``QuantizationClient``'s)."""
    return QuantizationClient(QuantizationClientSettings().addr, **{"timeout": 60, **kwargs})


command = client_command("quantization service", quantization_client)


@asynccontextmanager
async def quantization_service(**kwargs: Any) -> AsyncIterator[QuantizationClient]:
    """A quantization client for a command of another service: its errors end the command as its own."""
    async with quantization_client(**kwargs) as client:
        try:
            yield client
        except DomainError as err:
            fail_with(err, "quantization service", client.target)


def job_name(name: str) -> str:
    return name if name.startswith(JOB_PREFIX) else f"{JOB_PREFIX}{name}"


# ----------------------------------------------------------------------------- how jobs print


def method_text(value: int) -> str:
    """``QUANTIZATION_METHOD_W8A8_INT8`` -> ``w8a8`` (the ``--method`` spelling)."""
    return _METHOD_TEXT.get(value) or pb.QuantizationMethod.Name(value).removeprefix("QUANTIZATION_METHOD_").lower()


def backend_text(value: int) -> str:
    return _BACKEND_TEXT.get(value, "default")


def size_text(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _ratio(size: int, source: int) -> str:
    return f" ({size / source:.2f}x)" if size and source else ""


def scheme_text(method: str, bits: int, group_size: int) -> str:
    """``gptq 4-bit group 64`` (``per channel`` for -1; no group when 0)."""
    text = method + (f" {bits}-bit" if bits else "")
    if group_size > 0:
        text += f" group {group_size}"
    elif group_size < 0:
        text += " per channel"
    return text


def quality_text(source_ppl: float, quantized_ppl: float, top1: float | None = None, tokens: int | None = None) -> str:
    """``perplexity 12.34 -> 12.80 (+3.7%), top-1 agreement 97.1% on 2,048 tokens``."""
    text = f"perplexity {source_ppl:.2f} -> {quantized_ppl:.2f}"
    if source_ppl:
        text += f" ({(quantized_ppl - source_ppl) / source_ppl:+.1%})"
    if top1 is not None:
        text += f", top-1 agreement {top1:.1%}"
    if tokens:
        text += f" on {tokens:,} tokens"
    return text


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def lineage_quality_line(parameters: dict[str, Any]) -> str | None:
    """The ``quality:`` line of ``yard models show`` from a quantized version's lineage parameters (or None)."""
    quality = parameters.get("quality")
    if not isinstance(quality, dict):
        return None
    source, quantized = _number(quality.get("source_perplexity")), _number(quality.get("quantized_perplexity"))
    if source is None or quantized is None:
        return None
    tokens = _number(quality.get("eval_tokens"))
    return "quality: " + quality_text(source, quantized, _number(quality.get("top1_agreement")),
                                      int(tokens) if tokens else None)


def _method_from_parameter(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    if value.lower() in METHODS:
        return value.lower()
    enum_name = value.upper().replace("-", "_")
    enum_name = enum_name if enum_name.startswith("QUANTIZATION_METHOD_") else f"QUANTIZATION_METHOD_{enum_name}"
    if enum_name in pb.QuantizationMethod.keys():  # noqa: SIM118 - an EnumTypeWrapper, not a dict
        return method_text(pb.QuantizationMethod.Value(enum_name))
    return value.lower()


def lineage_quantization_line(parameters: dict[str, Any]) -> str | None:
    """``quantization: gptq 4-bit group 64, compressed-tensors, llmcompressor 0.14.0.1`` (or None: no method)."""
    method = _method_from_parameter(parameters.get("method"))
    if method is None:
        return None
    bits, group = _number(parameters.get("bits")), _number(parameters.get("group_size"))
    parts = [scheme_text(method, int(bits or 0), int(group or 0))]
    if isinstance(parameters.get("format"), str) and parameters["format"]:
        parts.append(parameters["format"])
    libraries = parameters.get("library_versions")
    if isinstance(libraries, dict) and libraries:
        parts.append(", ".join(f"{name} {version}" for name, version in sorted(libraries.items())))
    return "quantization: " + ", ".join(parts)


def _spec_scheme(spec: pb.QuantizationJobSpec) -> str:
    return scheme_text(method_text(spec.method), spec.bits, spec.group_size)


def _calibration_text(spec: pb.QuantizationJobSpec) -> str:
    if spec.method not in CALIBRATED:
        return "none (not calibrated)"
    data = spec.calibration_dataset_version or "built-in calibration text"
    return f"{data}, {spec.calibration_samples or 64} samples x {spec.calibration_max_length or 512} tokens"


def _preflight_text(pre: pb.QuantizationPreflight) -> str:
    return (f"{pre.accelerator or '?'}, ~{pre.estimated_memory_bytes / 2**30:.2f} GiB of "
            f"{pre.available_memory_bytes / 2**30:.2f} GiB, {pre.parameter_count:,} parameters")


def spec_rows(job: pb.QuantizationJob) -> list[tuple[str, str]]:
    """The resolved spec and the preflight, as ``--dry-run`` and ``yard jobs show`` print them."""
    spec, pre = job.spec, job.preflight
    rows = [
        ("method", _spec_scheme(job.spec)), ("backend", backend_text(spec.backend)),
        ("source", spec.source_model_version), ("calibration", _calibration_text(spec)),
        ("output model", spec.output_model), ("merge adapter", "yes" if spec.merge_adapter else "no"),
    ]
    if job.HasField("preflight"):
        rows += [
            ("preflight", _preflight_text(pre)),
            ("source size", size_text(pre.source_size_bytes)),
            ("expected size", size_text(pre.expected_size_bytes) + _ratio(pre.expected_size_bytes,
                                                                           pre.source_size_bytes)),
            ("format", pre.format),
            ("checked in", pre.verify_engine or "transformers"),
            ("unquantized layers", ", ".join(pre.unquantized_layers) or "none"),
        ]
    return rows


def _rows_table(rows: list[tuple[str, str]]) -> Table:
    table = new_table(show_header=False, box=None)
    table.add_column()
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(f"[bold]{key}[/bold]", value)
    return table


def dry_run_table(job: pb.QuantizationJob) -> Table:
    """What ``--dry-run`` prints: the spec as the service resolved it, and what preflight found."""
    return _rows_table(spec_rows(job))


def output_rows(job: pb.QuantizationJob) -> list[tuple[str, str]]:
    """What a finished job registered: version, size next to the source, quality, format, engine, layers left."""
    out = job.outputs
    rows = [("model version", out.model_version)] if out.model_version else []
    if out.merged_model_version:
        rows.append(("merged version", out.merged_model_version))
    if out.size_bytes:
        source = f", source {size_text(out.source_size_bytes)}" if out.source_size_bytes else ""
        rows.append(("size", f"{size_text(out.size_bytes)}{source}{_ratio(out.size_bytes, out.source_size_bytes)}"))
    if out.HasField("quality") and out.quality.source_perplexity:
        q = out.quality
        rows.append(("quality", quality_text(q.source_perplexity, q.quantized_perplexity, q.top1_agreement,
                                             q.eval_tokens)))
    if out.format:
        rows.append(("format", out.format))
    if out.verified_with:
        rows.append(("verified with", out.verified_with))
    if out.model_version:
        rows.append(("unquantized layers", ", ".join(out.unquantized_layers) or "none"))
    if out.library_versions:
        rows.append(("libraries", ", ".join(f"{k} {v}" for k, v in sorted(out.library_versions.items()))))
    return rows


def output_lines(job: pb.QuantizationJob) -> list[str]:
    """``output_rows`` as ``key: value`` lines (what ``--watch`` prints at the end)."""
    return [f"{key}: {value}" for key, value in output_rows(job)]


def progress_text(job: pb.QuantizationJob) -> str:
    return f"{job.progress.fraction:.0%}" if job.progress.fraction else ""


def job_rows(job: pb.QuantizationJob) -> list[tuple[str, str]]:
    rows = [("name", job.name), ("kind", "quantize"), ("state", state_text(job.state)),
            ("attempts", str(job.attempt_count)), *spec_rows(job),
            ("created", job.create_time.ToDatetime().isoformat(sep=" ", timespec="seconds")),
            ("progress", progress_text(job))]
    if job.display_name:
        rows.insert(1, ("display name", job.display_name))
    rows += output_rows(job)
    if job.HasField("error"):
        err = error_from_status(job.error)
        rows.append(("error", f"{err.message} [{err.reason}]"))
    return rows


def job_table(job: pb.QuantizationJob) -> Table:
    return _rows_table(job_rows(job))


# ----------------------------------------------------------------------------- watch, logs


def _log_detail(event: cpb.JobEvent) -> str | None:
    if event.WhichOneof("payload") != "log":
        return None
    line = event.log.line
    return line if len(line) <= 60 else line[:57] + "..."


async def watch(client: QuantizationClient, name: str, output: OutputFormat | str = OutputFormat.table) -> None:
    """Follow a job with a live progress line, then print what it registered; exit 1 unless it succeeded."""
    job = await watch_with_progress(
        name, client.watch_quantization_job, client.get_quantization_job, detail=_log_detail, initial_detail="",
        echo_logs=NOTABLE_LOGS, live_console=console if OutputFormat(output) is OutputFormat.table else err_console)
    emit(job, output, lambda: "\n".join(output_lines(job)), console=console)


async def logs(client: QuantizationClient, name: str) -> None:
    await print_job_logs(client.watch_quantization_job(name))


# ----------------------------------------------------------------------------- yard quantize


def build_spec(model: str, method: str, *, backend: str | None = None, bits: int = 0, group_size: int = 0,
               calibration_dataset: str | None = None, samples: int = 0, seq_len: int = 0,
               output_model: str | None = None, merge_adapter: bool = False) -> pb.QuantizationJobSpec:
    """The spec of ``yard quantize``'s arguments (short names made full, CLI spellings made enums)."""
    if method.lower() not in METHODS:
        raise CliError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    if backend and backend.lower() not in BACKENDS:
        raise CliError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    return pb.QuantizationJobSpec(
        source_model_version=resource_name(model, "models"),
        method=METHODS[method.lower()],
        backend=BACKENDS[backend.lower()] if backend else pb.QUANTIZATION_BACKEND_UNSPECIFIED,
        bits=bits, group_size=group_size,
        calibration_dataset_version=resource_name(calibration_dataset, "datasets") if calibration_dataset else "",
        calibration_samples=samples, calibration_max_length=seq_len,
        output_model=model_name(output_model) if output_model else "",
        merge_adapter=merge_adapter)


@command
async def quantize(
    client: QuantizationClient,
    model: Annotated[str, typer.Argument(help="Source model version: NAME/VERSION or models/NAME/versions/V.")],
    method: Annotated[str, typer.Option("--method", "-m", help="awq, gptq, w8a8, fp8, int8, bnb-nf4 or bnb-int8.")],
    backend: Annotated[str | None, typer.Option(
        "--backend", help="llm-compressor, autoawq, gptqmodel or bitsandbytes (default: the method's).")] = None,
    bits: Annotated[int, typer.Option("--bits", help="Weight bits (0: the method's; GPTQ takes 4 or 8).")] = 0,
    group_size: Annotated[int, typer.Option(
        "--group-size", help="Weights per group for AWQ / GPTQ 4-bit (0: largest that fits; -1: per channel).")] = 0,
    calibration_dataset: Annotated[str | None, typer.Option(
        "--calibration-dataset", help="Calibration dataset version: NAME/VERSION (default: built-in text).")] = None,
    samples: Annotated[int, typer.Option("--samples", help="Calibration samples (0: 64).")] = 0,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per calibration sample (0: 512).")] = 0,
    output_model: Annotated[str | None, typer.Option(
        "--output-model", help="Registry model for the result (default: {source model}-{method}).")] = None,
    merge_adapter: Annotated[bool, typer.Option(
        "--merge-adapter", help="The source is an adapter: merge it into its base first.")] = False,
    job_id: Annotated[str | None, typer.Option("--job-id", help="Job id (quantizationJobs/ID).")] = None,
    display_name: Annotated[str | None, typer.Option("--display-name", help="Free-form description.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help=(
        "Run preflight only and print the resolved spec, memory estimate and expected size; queue nothing."))] = False,
    watch_: Annotated[bool, typer.Option("--watch", "-w", help="Follow the job, then print size and quality.")] = False,
    output: OutputOption = OutputFormat.table,
) -> None:
    """Quantize a registered model version (a job; preflight runs first and nothing is queued if it fails)."""
    if dry_run and watch_:
        raise CliError("--dry-run queues nothing to --watch")
    spec = build_spec(model, method, backend=backend, bits=bits, group_size=group_size,
                      calibration_dataset=calibration_dataset, samples=samples, seq_len=seq_len,
                      output_model=output_model, merge_adapter=merge_adapter)
    request = pb.QuantizationJob(spec=spec, display_name=display_name or "")
    if dry_run:
        job = await client.create_quantization_job(request, quantization_job_id=job_id or "", validate_only=True)
        emit(job, output, lambda: dry_run_table(job), console=console)
        return
    job = await client.create_quantization_job(request, quantization_job_id=job_id or "")
    if watch_:
        if OutputFormat(output) is OutputFormat.table:
            console.print(f"[green]queued[/green] {job.name}", highlight=False)
        await watch(client, job.name, output)
        return
    pre = job.preflight
    emit(job, output, lambda: f"[green]queued[/green] {job.name}  ({_spec_scheme(job.spec)} on "
                              f"{pre.accelerator or '?'}, ~{pre.estimated_memory_bytes / 2**30:.2f} GiB, expected "
                              f"{size_text(pre.expected_size_bytes)})", console=console)
