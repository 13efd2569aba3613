"""``yard models ...`` and ``yard datasets ...``: the registry from the command line.

Every command but ``datasets validate`` talks to the registry at ``YARD_REGISTRY_ADDR``
(default 127.0.0.1:50051) through ``modelyard.client.RegistryClient``. Errors print one line with
the message and the ErrorInfo reason and exit non-zero; no stack trace. ``list``/``show``/``lineage``
take ``-o table|json|yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from google.protobuf.json_format import MessageToDict
from pydantic_settings import BaseSettings, SettingsConfigDict
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from cli.common import client_command, fail
from cli.output import OutputFormat, OutputOption, emit, make_console, new_table, to_dict
from cli.quantization_cmds import lineage_quality_line, lineage_quantization_line
from modelyard.client import DomainError, RegistryClient, error_from_status
from modelyard.common.v1 import common_pb2 as cpb
from modelyard.registry.v1 import registry_pb2 as pb

console = make_console()
err_console = make_console(stderr=True)
models_app = typer.Typer(help="Models in the registry: import, list, show, delete, lineage.", no_args_is_help=True)
datasets_app = typer.Typer(help="Datasets (training and evaluation sets): upload, validate, list, show.",
                           no_args_is_help=True)
FORMAT_HELP = ("Expected format (default: detect): messages, alpaca, sharegpt, preference, kto (training); "
               "multiple_choice, qa (evaluation).")

UNARY_TIMEOUT_S = 120.0
UPLOAD_TIMEOUT_S = 3600.0


class RegistryClientSettings(BaseSettings):
    """Where the CLI finds the registry."""

    model_config = SettingsConfigDict(env_prefix="YARD_REGISTRY_", extra="ignore")

    addr: str = "127.0.0.1:50051"


_fail = fail
command = client_command("registry", lambda: RegistryClient(RegistryClientSettings().addr, timeout=UNARY_TIMEOUT_S))


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _enum_name(enum_type, value: int, prefix: str) -> str:
    return enum_type.Name(value).removeprefix(prefix).lower()


def _labels(values: list[str] | None) -> dict[str, str]:
    out = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep:
            _fail(f"--label {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _model_name(name: str) -> str:
    return name if name.startswith("models/") else f"models/{name}"


def _version_name(name: str) -> str:
    """``model/version``, ``model`` (its versions listed elsewhere) or a full resource name."""
    if name.startswith("models/"):
        return name
    model, _, version = name.partition("/")
    return f"models/{model}/versions/{version}" if version else f"models/{model}"


def _fmt_labels(labels) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _time(ts) -> str:
    return ts.ToDatetime().strftime("%Y-%m-%d %H:%M")


# ----------------------------------------------------------------------------- models


@models_app.command("import")
@command
async def import_model(
    client: RegistryClient,
    source: Annotated[str, typer.Argument(help="Local folder or .gguf file, s3://bucket/prefix, hf://org/name[@rev], "
                                                 "modelscope://org/name.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Model id (created when missing).")],
    version: Annotated[str, typer.Option("--version", help="Version id (default: next vN).")] = "",
    description: Annotated[str, typer.Option("--description")] = "",
    label: Annotated[list[str] | None, typer.Option("--label", help="KEY=VALUE, repeatable.")] = None,
) -> None:
    """Import a model version and follow its progress."""
    path = Path(source).expanduser()
    if "://" not in source and path.exists():
        source = str(path.resolve())  # the server resolves paths itself: send an absolute one
    started = await client.import_model(parent=_model_name(name), version_id=version, source_uri=source,
                                        description=description, labels=_labels(label))
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TextColumn("{task.fields[stage]}"), console=console, transient=True) as progress:
        task = progress.add_task(f"importing {started.model_version}", total=1.0, stage="queued")

        def on_event(event: cpb.JobEvent) -> None:
            payload = event.WhichOneof("payload")
            if payload == "metrics" and event.metrics.values.get("bytes_total"):
                values = event.metrics.values
                progress.update(task, completed=values["bytes_done"] / values["bytes_total"])
            elif payload == "log":
                progress.update(task, stage=event.log.line[:60])
            elif payload == "state_change":
                progress.update(task, stage=_enum_name(cpb.JobState, event.state_change.state, "JOB_STATE_"))

        last = await client.wait_import(started.name, on_event=on_event, timeout=24 * 3600)
    if last.state != cpb.JOB_STATE_SUCCEEDED:
        err = error_from_status(last.error)
        _fail(f"import {last.name} {_enum_name(cpb.JobState, last.state, 'JOB_STATE_')}: {err.message}", err.reason)
    v = await client.get_model_version(last.model_version)
    console.print(f"[green]imported[/green] {v.name}")
    console.print(_version_detail(v))


@models_app.command("list")
@command
async def list_models(
    client: RegistryClient,
    model: Annotated[str, typer.Argument(help="List the versions of this model ('-' for every model); "
                                               "without it, list models.")] = "",
    filter: Annotated[str, typer.Option("--filter", help='e.g. kind = ADAPTER AND labels.team = "nlp"')] = "",
    order_by: Annotated[str, typer.Option("--order-by")] = "",
    limit: Annotated[int, typer.Option("--limit", help="Stop after this many rows (0: all).")] = 0,
    output: OutputOption = OutputFormat.table,
) -> None:
    """List models, or the versions of one model."""
    if not model:
        models = [m async for m in client.iter_models(filter=filter, order_by=order_by, page_size=200, limit=limit)]

        def models_table() -> Table:
            table = new_table("name", "versions", "description", "labels", "created")
            for m in models:
                table.add_row(m.name, str(m.version_count), m.description, _fmt_labels(m.labels), _time(m.create_time))
            return table

        emit(models, output, models_table, console=console)
        return
    versions = [v async for v in client.iter_model_versions(parent=_model_name(model), filter=filter,
                                                             order_by=order_by, page_size=200, limit=limit)]

    def versions_table() -> Table:
        table = new_table("version", "kind", "format", "state", "params", "size", "base", "labels")
        for v in versions:
            table.add_row(v.name, _enum_name(pb.ModelKind, v.kind, "MODEL_KIND_"),
                          _enum_name(pb.ModelFormat, v.format, "MODEL_FORMAT_"),
                          _enum_name(pb.ModelVersionState, v.state, "MODEL_VERSION_STATE_"),
                          f"{v.metadata.parameter_count:,}", _human(v.metadata.total_size_bytes),
                          v.lineage.base_model_version, _fmt_labels(v.labels))
        return table

    emit(versions, output, versions_table, console=console)


def _vision_rows(m: pb.ModelMetadata) -> list[tuple[str, str]]:
    """The vision side of a vision-language model (nothing for a text-only one)."""
    if not m.HasField("vision"):
        return []
    x = m.vision
    merge = f", merge {x.spatial_merge_size}x{x.spatial_merge_size}" if x.spatial_merge_size > 1 else ""
    return [
        ("vision", f"{x.vision_model_type or '?'}: {x.depth} blocks, width {x.hidden_size}, "
                   f"patch {x.patch_size}px{merge}"),
        ("image token", x.image_token),
        ("processor files", ", ".join(x.processor_files)),
    ]


def _version_detail(v: pb.ModelVersion) -> Table:
    table = Table(show_header=False, box=None)
    m = v.metadata
    rows = [
        ("name", v.name), ("kind", _enum_name(pb.ModelKind, v.kind, "MODEL_KIND_")),
        ("format", _enum_name(pb.ModelFormat, v.format, "MODEL_FORMAT_")),
        ("state", _enum_name(pb.ModelVersionState, v.state, "MODEL_VERSION_STATE_")),
        ("architecture", m.architecture), ("task", m.task + (f" ({m.embedding_dimensions} dimensions)"
                                                           if m.embedding_dimensions else "")),
        ("parameters", f"{m.parameter_count:,}"), ("dtype", m.dtype),
        ("context length", str(m.context_length)), ("chat template", "yes" if m.has_chat_template else "no"),
        ("size", _human(m.total_size_bytes)), ("files", str(len(v.files))), *_vision_rows(m),
        ("source", v.lineage.source_uri), ("base", v.lineage.base_model_version),
        ("datasets", ", ".join(v.lineage.dataset_versions)), ("job", v.lineage.job),
        ("deployed by", ", ".join(v.deployed_by)), ("labels", _fmt_labels(v.labels)), ("description", v.description),
    ]
    for key, value in rows:
        if value:
            table.add_row(f"[bold]{key}[/bold]", value)
    return table


def _score_lines(v: pb.ModelVersion) -> Table | None:
    """The "scores" section: one line per (benchmark, metric) with its newest value, newest evaluation first."""
    newest: dict[tuple[str, str], pb.EvaluationScore] = {}
    for score in v.scores:  # the registry sends them newest evaluation first
        newest.setdefault((score.benchmark, score.metric), score)
    if not newest:
        return None
    table = Table(show_header=False, box=None, padding=(0, 2, 0, 0), title="scores", title_justify="left",
                  title_style="bold")
    for score in newest.values():
        value = f"{score.value:.4f}" + (f" ± {score.stderr:.4f}" if score.stderr else "")
        samples = f"(n={score.num_samples})" if score.num_samples else ""
        table.add_row(score.benchmark, score.metric, value, samples, score.evaluation,
                      _time(score.create_time) if score.HasField("create_time") else "")
    return table


@models_app.command("show")
@command
async def show(
    client: RegistryClient,
    name: Annotated[str, typer.Argument(help="model, model/version or models/{m}/versions/{v}.")],
    files: Annotated[bool, typer.Option("--files", help="Also list the files (table output; json/yaml always "
                                                        "have them).")] = False,
    output: OutputOption = OutputFormat.table,
) -> None:
    """Show a model or a version with its inspected metadata."""
    full = _version_name(name)
    if "/versions/" not in full:
        m = await client.get_model(full)
        emit(m, output, lambda: f"[bold]{m.name}[/bold]  versions: {m.version_count}  {m.description}",
             console=console)
        return
    v = await client.get_model_version(full)

    def detail() -> None:
        console.print(_version_detail(v))
        parameters = MessageToDict(v.lineage.parameters)
        for line in (lineage_quality_line(parameters), lineage_quantization_line(parameters)):
            if line:
                console.print(line, highlight=False, markup=False)
        scores = _score_lines(v)
        if scores is not None:
            console.print(scores)
            hidden = len(v.scores) - scores.row_count
            if hidden:
                plural = "s" if hidden != 1 else ""
                console.print(f"{hidden} older score{plural} of the same benchmarks not shown (-o json lists every "
                              "score)", highlight=False)
        if files:
            table = new_table("path", "size", "sha256")
            for f in v.files:
                table.add_row(f.path, _human(f.size_bytes), f.sha256[:16])
            console.print(table)

    emit(v, output, detail, console=console)


@models_app.command("delete")
@command
async def delete(
    client: RegistryClient,
    name: Annotated[str, typer.Argument(help="model/version (a version) or model (the model).")],
    force: Annotated[bool, typer.Option(
        "--force", help="Delete even with descendants / deployments / versions.")] = False,
) -> None:
    """Delete a version (and its artifacts) or a whole model."""
    full = _version_name(name)
    if "/versions/" in full:
        await client.delete_model_version(full, force=force)
    else:
        await client.delete_model(full, force=force)
    console.print(f"[green]deleted[/green] {full}")


@models_app.command("lineage")
@command
async def lineage(
    client: RegistryClient,
    name: Annotated[str, typer.Argument(help="model/version or a full model / dataset version name.")],
    direction: Annotated[str, typer.Option("--direction", help="ancestors, descendants or both.")] = "both",
    depth: Annotated[int, typer.Option("--depth", help="Hops (0: unlimited).")] = 0,
    output: OutputOption = OutputFormat.table,
) -> None:
    """Show where a version comes from and what was derived from it."""
    directions = {"ancestors": pb.LINEAGE_DIRECTION_ANCESTORS, "descendants": pb.LINEAGE_DIRECTION_DESCENDANTS,
                  "both": pb.LINEAGE_DIRECTION_BOTH}
    if direction not in directions:
        _fail(f"--direction must be one of {', '.join(directions)}, got {direction!r}")
    full = name if name.startswith("datasets/") else _version_name(name)
    graph = await client.get_lineage(full, direction=directions[direction], depth=depth)

    def table() -> None:
        edges = new_table("parent", "", "child", "relation", "job")
        for e in graph.edges:
            edges.add_row(e.parent, "->", e.child, _enum_name(pb.LineageRelation, e.relation, "LINEAGE_RELATION_"),
                          e.job)
        console.print(edges if graph.edges else f"{full}: no lineage recorded")
        deleted = [n.name for n in graph.nodes if n.deleted]
        if deleted:
            console.print(f"deleted since: {', '.join(deleted)}")

    emit(graph, output, table, console=console)


# ----------------------------------------------------------------------------- datasets


def _dataset_name(name: str) -> str:
    return name if name.startswith("datasets/") else f"datasets/{name}"


@datasets_app.command("upload")
@command
async def upload(
    client: RegistryClient,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help=(
        "JSONL / JSON / Parquet file, or an image+text archive (.zip, .tar, .tar.gz: one data file and the "
        "images its rows refer to)."))],
    name: Annotated[str, typer.Option("--name", "-n", help="Dataset id (created when missing).")],
    version: Annotated[str, typer.Option("--version")] = "",
    format: Annotated[str, typer.Option("--format", help=FORMAT_HELP)] = "",
    description: Annotated[str, typer.Option("--description")] = "",
) -> None:
    """Upload a dataset file as a new version (streamed in chunks).

    An evaluation set (multiple_choice rows {question, choices, answer}, qa rows {prompt, reference})
    is refused when any row is bad; the error names each bad row and field. Rows refer to images as
    message content parts {"type": "image_url", "image_url": {"url": "images/0001.png"}} (a path inside
    the archive, or a data: URL), evaluation rows as "images": [...].
    """
    with Progress(TextColumn("[bold]uploading"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  console=console, transient=True) as progress:
        task = progress.add_task("upload", total=max(file.stat().st_size, 1))
        v = await client.upload_dataset(file, parent=_dataset_name(name), version_id=version, expected_format=format,
                                        description=description, on_progress=lambda n: progress.advance(task, n),
                                        timeout=UPLOAD_TIMEOUT_S)
    images = f", {v.image_count} images" if v.image_count else ""
    console.print(f"[green]uploaded[/green] {v.name}: {v.format}, {v.row_count} rows "
                  f"({v.invalid_row_count} invalid){images}, sha256 {v.sha256}")
    if v.invalid_row_count:
        console.print(f"see the bad rows with: yard datasets show {v.name.removeprefix('datasets/')}", highlight=False)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "config.json", "preprocessor_config.json", "processor_config.json")


def _load_tokenizer(model: str):
    """The tokenizer of a local folder, or of a registry version (only its tokenizer files are fetched); for a
    vision-language model its processor (which counts image tokens)."""
    import tempfile

    from transformers import AutoTokenizer

    from services.core.vision import load_processor, vision_info

    folder = Path(model)
    with tempfile.TemporaryDirectory(prefix="yard-tokenizer-") as tmp:
        if not folder.is_dir():
            folder = Path(tmp)
            _fetch_tokenizer_files(_version_name(model), folder)
        try:
            if vision_info(folder) is not None:
                return load_processor(folder)
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure means no usable tokenizer
            _fail(f"--model {model!r}: cannot load its tokenizer: {exc}")


@command
async def _fetch_tokenizer_files(client: RegistryClient, name: str, dest: Path) -> None:
    version = await client.get_model_version(name)
    wanted = [f.path for f in version.files if f.path in TOKENIZER_FILES]
    if not wanted:
        _fail(f"--model {name}: the version has no tokenizer files")
    for path in wanted:
        await client.download_to(name, path=path, dest=dest / path)


@datasets_app.command("validate")
def validate(
    file: Annotated[Path, typer.Argument(help="Local JSONL / JSON / Parquet file, or an image+text archive.")],
    model: Annotated[str, typer.Option(
        "--model",
        help="Registry model version (MODEL/VERSION) or a local model folder whose tokenizer counts tokens.")] = "",
    max_length: Annotated[int, typer.Option("--max-length", help="Count rows longer than this many tokens.")] = 0,
    format: Annotated[str, typer.Option("--format", help=FORMAT_HELP)] = "",
    show: Annotated[int, typer.Option("--show", help="Row errors to print.")] = 50,
) -> None:
    """Validate a local dataset file (no server needed); exit 1 when any row is bad.

    An archive's images are all read and decoded; with a vision-language --model, rows are counted as its
    processor encodes them (image tokens included); with a text-only one, any image is a bad row.
    """
    from services.core.datasets import DatasetFormat, ImageCheck, validate_dataset

    formats = [f.value for f in DatasetFormat]
    if format and format not in formats:
        _fail(f"--format must be one of {', '.join(formats)}, got {format!r}")
    try:
        tokenizer = _load_tokenizer(model) if model else None
        images = ImageCheck()
        if tokenizer is not None and hasattr(tokenizer, "image_processor"):
            images, tokenizer = ImageCheck(model=model, processor=tokenizer), None
        elif tokenizer is not None:
            images = ImageCheck(model=model, takes_images=False)
        report = validate_dataset(file, expected_format=DatasetFormat(format) if format else None, tokenizer=tokenizer,
                                  max_length=max_length or None, images=images)
    except DomainError as err:
        _fail(err.message, err.reason)
    console.print(f"{file}: {report.file_type}, format {report.format or 'unknown'}, {report.row_count} rows, "
                  f"{report.valid_rows} valid, sha256 {report.sha256}")
    if report.image_count:
        console.print(f"images: {report.image_count} ({report.max_images_per_row} at most in one row)")
    if report.token_stats:
        t = report.token_stats
        console.print(f"tokens: min {t.min}, mean {t.mean:.1f}, max {t.max}"
                      + (f", {t.over_length} rows over {t.max_length}" if t.max_length else "")
                      + (f"; {t.image_tokens} image tokens" if t.image_tokens else ""))
    if report.errors:
        table = new_table("row", "field", "reason")
        for e in report.errors[:show]:
            table.add_row(str(e.row), e.field, e.reason)
        console.print(table)
        if len(report.errors) > show:
            console.print(f"... and {len(report.errors) - show} more")
    if not report.ok:
        raise typer.Exit(1)


@datasets_app.command("list")
@command
async def list_datasets(
    client: RegistryClient,
    dataset: Annotated[str, typer.Argument(help="List this dataset's versions; without it, list datasets.")] = "",
    filter: Annotated[str, typer.Option("--filter")] = "",
    order_by: Annotated[str, typer.Option("--order-by")] = "",
    output: OutputOption = OutputFormat.table,
) -> None:
    """List datasets, or the versions of one dataset."""
    if not dataset:
        datasets = [d async for d in client.iter_datasets(filter=filter, order_by=order_by, page_size=200)]

        def datasets_table() -> Table:
            table = new_table("name", "versions", "description")
            for d in datasets:
                table.add_row(d.name, str(d.version_count), d.description)
            return table

        emit(datasets, output, datasets_table, console=console)
        return
    versions = [v async for v in client.iter_dataset_versions(parent=_dataset_name(dataset), filter=filter,
                                                               order_by=order_by, page_size=200)]

    def versions_table() -> Table:
        table = new_table("version", "file", "format", "rows", "invalid", "images", "size", "sha256")
        for v in versions:
            table.add_row(v.name, v.filename, v.format, str(v.row_count), str(v.invalid_row_count),
                          str(v.image_count), _human(v.size_bytes), v.sha256[:16])
        return table

    emit(versions, output, versions_table, console=console)


@datasets_app.command("show")
@command
async def show_dataset(
    client: RegistryClient,
    name: Annotated[str, typer.Argument(help="dataset/version or datasets/{d}/versions/{v}.")],
    model: Annotated[str, typer.Option("--model", help="Model version (model/version) for token statistics.")] = "",
    max_length: Annotated[int, typer.Option("--max-length")] = 0,
    output: OutputOption = OutputFormat.table,
) -> None:
    """Show a stored dataset version and its validation report.

    json/yaml: ``{"dataset_version": {...}, "validation": {...}}`` (a dataset: the dataset itself).
    """
    if not name.startswith("datasets/"):
        ds, _, version = name.partition("/")
        name = f"datasets/{ds}/versions/{version}" if version else f"datasets/{ds}"
    if "/versions/" not in name:
        d = await client.get_dataset(name)
        emit(d, output, lambda: f"[bold]{d.name}[/bold]  versions: {d.version_count}  {d.description}",
             console=console)
        return
    v = await client.get_dataset_version(name)
    report = await client.validate_dataset(name, model_version=_version_name(model) if model else "",
                                           max_length=max_length)

    def detail() -> None:
        table = Table(show_header=False, box=None)
        for key, value in (("name", v.name), ("file", v.filename), ("format", v.format), ("rows", str(v.row_count)),
                           ("invalid rows", str(v.invalid_row_count)),
                           ("images", str(v.image_count) if v.image_count else ""), ("size", _human(v.size_bytes)),
                           ("sha256", v.sha256), ("description", v.description), ("labels", _fmt_labels(v.labels))):
            if value:
                table.add_row(f"[bold]{key}[/bold]", value)
        console.print(table)
        if report.HasField("token_stats") and report.token_stats.rows:
            t = report.token_stats
            console.print(f"tokens: min {t.min_tokens}, mean {t.mean_tokens:.1f}, max {t.max_tokens}, "
                          f"{t.rows_over_max_length} rows over {t.max_length or '-'}"
                          + (f"; {t.image_tokens} image tokens" if t.image_tokens else ""))
        if report.token_stats.images:
            console.print(f"images: {report.token_stats.images} ({report.token_stats.max_images_per_row} at most "
                          "in one row)")
        if report.errors:
            errors = new_table("row", "field", "reason")
            for e in report.errors[:50]:
                errors.add_row(str(e.row), e.field, e.reason)
            console.print(errors)

    emit({"dataset_version": to_dict(v), "validation": to_dict(report)}, output, detail, console=console)
