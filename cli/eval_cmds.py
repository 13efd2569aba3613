"""``yard eval ...``: the evaluation service from the command line.

Commands talk to the evaluation service at ``YARD_EVALUATION_ADDR`` (default 127.0.0.1:50054) through the
SDK's ``EvaluationClient``. ``yard eval run TARGET --benchmark NAME ...`` where TARGET is a model version
(``NAME/VERSION``), a deployment (``deployments/NAME`` or ``deployments/NAME:ADAPTER``) or an endpoint URL
(``http://host:8000/v1`` with ``--endpoint-model`` and ``--api-key`` / ``OPENAI_API_KEY``); ``--watch``
follows it with a live progress line (samples/s, ETA) and prints the scores. Errors print one line with
the message and the ErrorInfo reason (and the fields at fault) and exit 1.
"""

from __future__ import annotations

import math
import os
from typing import Annotated, Any

import typer
from pydantic_settings import BaseSettings, SettingsConfigDict
from rich.table import Table

from cli.common import CliError, client_command, console, err_console, resource_name, state_text, watch_with_progress
from cli.output import OutputFormat, OutputOption, emit, new_table
from modelyard.client import EvaluationClient, error_from_status
from modelyard.common.v1 import common_pb2 as cpb
from modelyard.evaluation.v1 import evaluation_pb2 as pb

PREFIX = "evaluations/"
KIND_TEXT = {
    pb.BENCHMARK_KIND_MULTIPLE_CHOICE: "multiple choice",
    pb.BENCHMARK_KIND_GENERATION: "generation",
    pb.BENCHMARK_KIND_CODE: "code",
    pb.BENCHMARK_KIND_PERPLEXITY: "perplexity",
}
NOTABLE_LOGS = ("benchmark finished", "benchmark failed", "temporary deployment")

eval_app = typer.Typer(help="Evaluate models on benchmarks: run, list, show, compare.", no_args_is_help=True)


class EvaluationClientSettings(BaseSettings):
    """Where the CLI finds the evaluation service."""

    model_config = SettingsConfigDict(env_prefix="YARD_EVALUATION_", extra="ignore")

    addr: str = "127.0.0.1:50054"


def evaluation_client(**kwargs: Any) -> EvaluationClient:
    return EvaluationClient(EvaluationClientSettings().addr, **{"timeout": 60, **kwargs})


command = client_command("evaluation service", evaluation_client)


def evaluation_name(name: str) -> str:
    return name if name.startswith(PREFIX) else f"{PREFIX}{name}"


def benchmark_name(name: str) -> str:
    return name.removeprefix("benchmarks/")


def parse_target(target: str, endpoint_model: str | None, api_key: str | None, spec: pb.EvaluationSpec) -> None:
    """Fill the spec's target from TARGET (a model version, ``deployments/NAME[:ADAPTER]``, or a URL)."""
    if target.startswith(("http://", "https://")):
        if not endpoint_model:
            raise CliError("an endpoint target needs --endpoint-model (the `model` sent with each request)")
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
        spec.endpoint.CopyFrom(pb.OpenAIEndpoint(base_url=target, model=endpoint_model, api_key=key))
        return
    if target.startswith("deployments/"):
        name, _, adapter = target.partition(":")
        spec.deployment = name
        spec.adapter = adapter
        return
    spec.model_version = resource_name(target, "models")


def parse_benchmark(text: str, limit: int, fewshot: int | None) -> pb.BenchmarkRun:
    """``bbh:boolean_expressions``, ``gsm8k``, ``mmlu?subject=anatomy`` or a custom set ``datasets/D/versions/V``
    (also ``@NAME/VERSION``)."""
    run = pb.BenchmarkRun()
    base, _, query = text.partition("?")
    if base.startswith("datasets/"):
        run.dataset_version = base
    elif base.startswith("@"):
        run.dataset_version = resource_name(base[1:], "datasets")
    else:
        run.benchmark = f"benchmarks/{benchmark_name(base)}"
    for part in filter(None, query.split("&")):
        key, sep, value = part.partition("=")
        if not sep:
            raise CliError(f"--benchmark {text!r}: options are KEY=VALUE joined by &")
        run.options[key] = value
    return run


def _fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def results_table(ev: pb.Evaluation) -> Table:
    table = new_table("benchmark", "metric", "value", "± stderr", "n", "fewshot", "samples/s")
    for r in ev.outputs.results:
        if r.HasField("error"):
            err = error_from_status(r.error)
            table.add_row(benchmark_name(r.benchmark), "[red]failed[/red]", err.message, "", "", "", "")
            continue
        for metric, value in r.metrics.items():
            se = r.stderr.get(metric)
            table.add_row(
                benchmark_name(r.benchmark),
                metric,
                _fmt(value),
                _fmt(se) if se is not None else "",
                str(r.num_samples),
                str(r.num_fewshot),
                f"{r.samples_per_second:.2f}",
            )
    return table


def _target_text(spec: pb.EvaluationSpec) -> str:
    which = spec.WhichOneof("target")
    if which == "deployment":
        return spec.deployment + (f":{spec.adapter}" if spec.adapter else "")
    if which == "endpoint":
        return f"{spec.endpoint.base_url} (model {spec.endpoint.model})"
    return spec.model_version


def evaluation_table(ev: pb.Evaluation) -> Table:
    rows = [
        ("name", ev.name),
        ("state", state_text(ev.state)),
        ("target", _target_text(ev.spec)),
        ("benchmarks", ", ".join(benchmark_name(b.benchmark) for b in ev.spec.benchmarks)),
        ("attempts", str(ev.attempt_count)),
        ("created", ev.create_time.ToDatetime().isoformat(sep=" ", timespec="seconds")),
        ("progress", f"{ev.progress.step}/{ev.progress.total_steps}" if ev.progress.total_steps else ""),
    ]
    if ev.display_name:
        rows.insert(1, ("display name", ev.display_name))
    out = ev.outputs
    if out.deployment:
        rows.append(
            ("deployment", out.deployment + (" (temporary, removed at the end)" if out.temporary_deployment else ""))
        )
    if out.model_version:
        rows.append(("scores recorded on", out.model_version))
    if out.report_artifact_key:
        rows.append(("report", out.report_artifact_key))
    if ev.HasField("error"):
        err = error_from_status(ev.error)
        rows.append(("error", f"{err.message} [{err.reason}]"))
    table = new_table(show_header=False, box=None)
    table.add_column()
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(f"[bold]{key}[/bold]", value)
    if out.results:
        outer = new_table(show_header=False, box=None)
        outer.add_column()
        outer.add_row(table)
        outer.add_row(results_table(ev))
        return outer
    return table


def _detail(event: cpb.JobEvent) -> str | None:
    if event.WhichOneof("payload") == "metrics" and "samples_per_s" in event.metrics.values:
        return f"{event.metrics.values['samples_per_s']:.2f} samples/s"
    return None


async def _watch(client: EvaluationClient, name: str, output: OutputFormat | str) -> None:
    live = console if OutputFormat(output) is OutputFormat.table else err_console
    ev = await watch_with_progress(
        name,
        client.watch_evaluation,
        client.get_evaluation,
        detail=_detail,
        initial_detail="",
        echo_logs=NOTABLE_LOGS,
        live_console=live,
    )
    emit(ev, output, lambda: evaluation_table(ev), console=console)


@eval_app.command("run")
@command
async def run(
    client: EvaluationClient,
    target: Annotated[
        str,
        typer.Argument(
            help=(
                "Model version NAME/VERSION, deployments/NAME[:ADAPTER], or an OpenAI-compatible URL (http://host/v1)."
            )
        ),
    ],
    benchmark: Annotated[
        list[str],
        typer.Option(
            "--benchmark",
            "-b",
            help=(
                "Benchmark (repeatable): bbh:boolean_expressions, bbh_mc:navigate, gsm8k, humaneval, mmlu:anatomy... "
                "Options as NAME?key=value. A custom set: @DATASET/VERSION."
            ),
        ),
    ],
    limit: Annotated[int, typer.Option("--limit", help="Samples per benchmark (0: all).")] = 0,
    fewshot: Annotated[
        int | None, typer.Option("--fewshot", help="Few-shot examples (default: each benchmark's).")
    ] = None,
    chat_template: Annotated[
        bool | None,
        typer.Option(
            "--chat-template/--no-chat-template", help="Render prompts with the model's chat template (default off)."
        ),
    ] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", help="Samples in flight (0: service default).")] = 0,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="Generation limit (default: the benchmark's).")
    ] = None,
    temperature: Annotated[
        float | None, typer.Option("--temperature", help="Sampling temperature (default greedy).")
    ] = None,
    engine: Annotated[str, typer.Option("--engine", help="Engine of a model version's temporary deployment.")] = "",
    endpoint_model: Annotated[
        str | None, typer.Option("--endpoint-model", help="`model` for an endpoint target.")
    ] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", help="Endpoint key (default: $OPENAI_API_KEY).")] = None,
    evaluation_id: Annotated[str | None, typer.Option("--id", help="Evaluation id (evaluations/ID).")] = None,
    display_name: Annotated[str | None, typer.Option("--display-name", help="Free-form description.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the spec; queue nothing.")] = False,
    watch_: Annotated[bool, typer.Option("--watch", "-w", help="Follow it, then print the scores.")] = False,
    output: OutputOption = OutputFormat.table,
) -> None:
    """Evaluate a model version, a deployment or an endpoint on benchmarks (a job)."""
    spec = pb.EvaluationSpec(limit=limit, num_fewshot=fewshot, batch_size=concurrency, engine=engine,
                             apply_chat_template=chat_template)  # fmt: skip
    parse_target(target, endpoint_model, api_key, spec)
    spec.benchmarks.extend(parse_benchmark(b, 0, None) for b in benchmark)
    if max_tokens is not None:
        spec.generation.max_tokens = max_tokens
    if temperature is not None:
        spec.generation.temperature = temperature
    request = pb.Evaluation(spec=spec, display_name=display_name or "")
    ev = await client.create_evaluation(request, evaluation_id=evaluation_id or "", validate_only=dry_run)
    if dry_run:
        emit(ev, output, lambda: evaluation_table(ev), console=console)
        return
    if watch_:
        if OutputFormat(output) is OutputFormat.table:
            console.print(f"[green]queued[/green] {ev.name}", highlight=False)
        await _watch(client, ev.name, output)
        return
    emit(ev, output, lambda: f"[green]queued[/green] {ev.name}", console=console)


@eval_app.command("list")
@command
async def list_(
    client: EvaluationClient,
    filter_: Annotated[
        str, typer.Option("--filter", help='e.g. state = JOB_STATE_SUCCEEDED, model_version = "..."')
    ] = "",
    limit: Annotated[int, typer.Option("--limit", help="At most this many (0: all).")] = 50,
    output: OutputOption = OutputFormat.table,
) -> None:
    """Evaluations, newest first."""
    items = [e async for e in client.iter_evaluations(filter=filter_, limit=limit)]

    def table() -> Table:
        t = new_table("name", "state", "target", "benchmarks", "primary scores", "created")
        for e in items:
            scores = ", ".join(
                f"{benchmark_name(r.benchmark)} {_fmt(next(iter(r.metrics.values())))}"
                for r in e.outputs.results
                if r.metrics
            )
            t.add_row(e.name, state_text(e.state), _target_text(e.spec),
                      ", ".join(benchmark_name(b.benchmark) for b in e.spec.benchmarks), scores,
                      e.create_time.ToDatetime().isoformat(sep=" ", timespec="seconds"))  # fmt: skip
        return t

    emit(items, output, table, console=console)


@eval_app.command("show")
@command
async def show(client: EvaluationClient, name: Annotated[str, typer.Argument(help="evaluations/ID or ID.")],
               output: OutputOption = OutputFormat.table) -> None:  # fmt: skip
    """One evaluation with its scores."""
    ev = await client.get_evaluation(evaluation_name(name))
    emit(ev, output, lambda: evaluation_table(ev), console=console)


@eval_app.command("watch")
@command
async def watch(client: EvaluationClient, name: Annotated[str, typer.Argument(help="evaluations/ID or ID.")],
                output: OutputOption = OutputFormat.table) -> None:  # fmt: skip
    """Follow an evaluation until it ends, then print its scores."""
    await _watch(client, evaluation_name(name), output)


@eval_app.command("cancel")
@command
async def cancel(client: EvaluationClient, name: Annotated[str, typer.Argument(help="evaluations/ID or ID.")],
                 output: OutputOption = OutputFormat.table) -> None:  # fmt: skip
    """Stop an evaluation (its temporary deployment is removed; finished benchmarks are kept)."""
    ev = await client.cancel_evaluation(evaluation_name(name))
    emit(ev, output, lambda: f"{ev.name}: {state_text(ev.state)}", console=console)


@eval_app.command("compare")
@command
async def compare(
    client: EvaluationClient,
    names: Annotated[list[str], typer.Argument(help="Two or more evaluations; the first is the baseline.")],
    benchmark: Annotated[list[str] | None, typer.Option("--benchmark", "-b", help="Only these benchmarks.")] = None,
    changed: Annotated[int, typer.Option("--changed", help="Changed samples shown per benchmark.")] = 5,
    output: OutputOption = OutputFormat.table,
) -> None:
    """Metrics side by side, paired deltas against the first with a 95% interval, and the samples that changed."""
    if len(names) < 2:
        raise CliError("compare needs at least two evaluations")
    resp = await client.compare_evaluations(
        [evaluation_name(n) for n in names],
        benchmarks=[f"benchmarks/{benchmark_name(b)}" for b in benchmark or []],
        max_changed_samples=max(changed, 1),
    )

    def table() -> Table:
        cols = ["benchmark", "metric", *(n.removeprefix(PREFIX) for n in resp.evaluations)]
        cols += [f"Δ {n.removeprefix(PREFIX)} (95% CI)" for n in resp.evaluations[1:]]
        t = new_table(*cols)
        for row in resp.rows:
            cells = [benchmark_name(row.benchmark), row.metric]
            for v in row.values:
                text = _fmt(v.value) if v.HasField("value") else "-"
                if v.HasField("stderr"):
                    text += f" ± {_fmt(v.stderr)}"
                cells.append(text)
            by_eval = {d.evaluation: d for d in row.deltas}
            for n in resp.evaluations[1:]:
                d = by_eval.get(n)
                if d is None:
                    cells.append("-")
                elif math.isnan(d.ci_low):
                    cells.append(f"{d.delta:+.4f}")
                else:
                    cells.append(f"{d.delta:+.4f} [{d.ci_low:+.4f}, {d.ci_high:+.4f}] n={d.paired_samples}")
            t.add_row(*cells)
        outer = new_table(show_header=False, box=None)
        outer.add_column()
        outer.add_row(t)
        if resp.changed_samples:
            c = new_table("benchmark", "doc", "evaluation", "score", "prediction", "reference")
            shown: dict[tuple[str, str], int] = {}
            for s in resp.changed_samples:
                key = (s.benchmark, s.evaluation)
                if shown.get(key, 0) >= changed:
                    continue
                shown[key] = shown.get(key, 0) + 1
                c.add_row(benchmark_name(s.benchmark), s.doc_id, s.evaluation.removeprefix(PREFIX),
                          f"{s.baseline_score:g} -> {s.score:g}",
                          f"{s.baseline_prediction[:40]!r} -> {s.prediction[:40]!r}", s.reference[:40])  # fmt: skip
            outer.add_row(c)
        return outer

    emit(resp, output, table, console=console)


@eval_app.command("benchmarks")
@command
async def benchmarks(
    client: EvaluationClient,
    filter_: Annotated[str, typer.Option("--filter", help="e.g. kind = BENCHMARK_KIND_GENERATION")] = "",
    output: OutputOption = OutputFormat.table,
) -> None:
    """The benchmark catalogue."""
    items = [b async for b in client.iter_benchmarks(filter=filter_)]

    def table() -> Table:
        t = new_table("name", "kind", "metrics", "samples", "fewshot", "source")
        for b in items:
            t.add_row(benchmark_name(b.name), KIND_TEXT.get(b.kind, "?"), ", ".join(b.metrics),
                      str(b.num_samples or "?"), str(b.default_num_fewshot), b.source)  # fmt: skip
        return t

    emit(items, output, table, console=console)
