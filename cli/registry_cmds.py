"""``yard models ...`` and ``yard datasets ...``: the registry from the command line.

Every command but ``datasets validate`` talks to the registry at ``YARD_REGISTRY_ADDR``
(default 127.0.0.1:50051). Errors print one line with the message and the ErrorInfo reason
and exit non-zero; no stack trace.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic_settings import BaseSettings, SettingsConfigDict
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from modelyard.registry.v1 import registry_pb2 as pb
from modelyard.registry.v1 import registry_pb2_grpc
from cli.common import fail, grpc_command
from services.core.errors import DomainError
from services.core.status import error_from_status_proto

T = TypeVar("T")

console = Console()
err_console = Console(stderr=True)
models_app = typer.Typer(help="Models in the registry: import, list, show, delete, lineage.", no_args_is_help=True)
datasets_app = typer.Typer(help="Datasets: upload, validate, list, show.", no_args_is_help=True)

UPLOAD_CHUNK = 1024 * 1024


class RegistryClientSettings(BaseSettings):
    """Where the CLI finds the registry."""

    model_config = SettingsConfigDict(env_prefix="YARD_REGISTRY_", extra="ignore")

    addr: str = "127.0.0.1:50051"


_fail = fail
command = grpc_command("registry", lambda: RegistryClientSettings().addr, registry_pb2_grpc.RegistryServiceStub,
                       timeout_s=600)


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


# ----------------------------------------------------------------------------- models


@models_app.command("import")
@command
async def import_model(
    stub,
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
    started = (await stub.ImportModel(pb.ImportModelRequest(
        parent=_model_name(name), version_id=version, source_uri=source, description=description,
        labels=_labels(label)))).model_import
    last = started
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TextColumn("{task.fields[stage]}"), console=console, transient=True) as progress:
        task = progress.add_task(f"importing {started.model_version}", total=1.0, stage="pending")
        async for event in stub.WatchImport(pb.WatchImportRequest(name=started.name), timeout=24 * 3600):
            last = event.model_import
            progress.update(task, completed=last.progress.fraction, stage=last.progress.stage)
    if last.state != pb.IMPORT_STATE_SUCCEEDED:
        err = error_from_status_proto(last.error)
        _fail(f"import {last.name} failed: {err.message}", err.reason)
    v = (await stub.GetModelVersion(pb.GetModelVersionRequest(name=last.model_version))).model_version
    console.print(f"[green]imported[/green] {v.name}")
    _print_version(v)


@models_app.command("list")
@command
async def list_models(
    stub,
    model: Annotated[str, typer.Argument(help="List the versions of this model ('-' for every model); "
                                               "without it, list models.")] = "",
    filter: Annotated[str, typer.Option("--filter", help='e.g. kind = ADAPTER AND labels.team = "nlp"')] = "",
    order_by: Annotated[str, typer.Option("--order-by")] = "",
    limit: Annotated[int, typer.Option("--limit", help="Stop after this many rows (0: all).")] = 0,
) -> None:
    """List models, or the versions of one model."""
    if not model:
        table = Table("name", "versions", "description", "labels", "created")
        async for m in _pages(lambda tok: stub.ListModels(pb.ListModelsRequest(
                filter=filter, order_by=order_by, page_size=200, page_token=tok)), "models", limit):
            table.add_row(m.name, str(m.version_count), m.description, _fmt_labels(m.labels),
                          m.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M"))
    else:
        table = Table("version", "kind", "format", "state", "params", "size", "base", "labels")
        async for v in _pages(lambda tok: stub.ListModelVersions(pb.ListModelVersionsRequest(
                parent=_model_name(model), filter=filter, order_by=order_by, page_size=200, page_token=tok)),
                "model_versions", limit):
            table.add_row(v.name, _enum_name(pb.ModelKind, v.kind, "MODEL_KIND_"),
                          _enum_name(pb.ModelFormat, v.format, "MODEL_FORMAT_"),
                          _enum_name(pb.ModelVersionState, v.state, "MODEL_VERSION_STATE_"),
                          f"{v.metadata.parameter_count:,}", _human(v.metadata.total_size_bytes),
                          v.lineage.base_model_version, _fmt_labels(v.labels))
    table.columns[0].no_wrap = True
    console.print(table)


async def _pages(fetch: Callable[[str], Awaitable[Any]], field: str, limit: int) -> AsyncIterator[Any]:
    token, count = "", 0
    while True:
        resp = await fetch(token)
        for item in getattr(resp, field):
            yield item
            count += 1
            if limit and count >= limit:
                return
        token = resp.next_page_token
        if not token:
            return


def _fmt_labels(labels) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _print_version(v: pb.ModelVersion) -> None:
    table = Table(show_header=False, box=None)
    m = v.metadata
    rows = [
        ("name", v.name), ("kind", _enum_name(pb.ModelKind, v.kind, "MODEL_KIND_")),
        ("format", _enum_name(pb.ModelFormat, v.format, "MODEL_FORMAT_")),
        ("state", _enum_name(pb.ModelVersionState, v.state, "MODEL_VERSION_STATE_")),
        ("architecture", m.architecture), ("parameters", f"{m.parameter_count:,}"), ("dtype", m.dtype),
        ("context length", str(m.context_length)), ("chat template", "yes" if m.has_chat_template else "no"),
        ("size", _human(m.total_size_bytes)), ("files", str(len(v.files))),
        ("source", v.lineage.source_uri), ("base", v.lineage.base_model_version),
        ("datasets", ", ".join(v.lineage.dataset_versions)), ("job", v.lineage.job),
        ("deployed by", ", ".join(v.deployed_by)), ("labels", _fmt_labels(v.labels)), ("description", v.description),
    ]
    for key, value in rows:
        if value:
            table.add_row(f"[bold]{key}[/bold]", value)
    console.print(table)


@models_app.command("show")
@command
async def show(
    stub,
    name: Annotated[str, typer.Argument(help="model, model/version or models/{m}/versions/{v}.")],
    files: Annotated[bool, typer.Option("--files", help="Also list the files.")] = False,
) -> None:
    """Show a model or a version with its inspected metadata."""
    full = _version_name(name)
    if "/versions/" not in full:
        m = (await stub.GetModel(pb.GetModelRequest(name=full))).model
        console.print(f"[bold]{m.name}[/bold]  versions: {m.version_count}  {m.description}")
        return
    v = (await stub.GetModelVersion(pb.GetModelVersionRequest(name=full))).model_version
    _print_version(v)
    if files:
        table = Table("path", "size", "sha256")
        for f in v.files:
            table.add_row(f.path, _human(f.size_bytes), f.sha256[:16])
        console.print(table)


@models_app.command("delete")
@command
async def delete(
    stub,
    name: Annotated[str, typer.Argument(help="model/version (a version) or model (the model).")],
    force: Annotated[bool, typer.Option("--force", help="Delete even with descendants / deployments / versions.")] = False,
) -> None:
    """Delete a version (and its artifacts) or a whole model."""
    full = _version_name(name)
    if "/versions/" in full:
        await stub.DeleteModelVersion(pb.DeleteModelVersionRequest(name=full, force=force))
    else:
        await stub.DeleteModel(pb.DeleteModelRequest(name=full, force=force))
    console.print(f"[green]deleted[/green] {full}")


@models_app.command("lineage")
@command
async def lineage(
    stub,
    name: Annotated[str, typer.Argument(help="model/version or a full model / dataset version name.")],
    direction: Annotated[str, typer.Option("--direction", help="ancestors, descendants or both.")] = "both",
    depth: Annotated[int, typer.Option("--depth", help="Hops (0: unlimited).")] = 0,
) -> None:
    """Show where a version comes from and what was derived from it."""
    directions = {"ancestors": pb.LINEAGE_DIRECTION_ANCESTORS, "descendants": pb.LINEAGE_DIRECTION_DESCENDANTS,
                  "both": pb.LINEAGE_DIRECTION_BOTH}
    if direction not in directions:
        _fail(f"--direction must be one of {', '.join(directions)}, got {direction!r}")
    full = name if name.startswith("datasets/") else _version_name(name)
    graph = await stub.GetLineage(pb.GetLineageRequest(name=full, direction=directions[direction], depth=depth))
    table = Table("parent", "", "child", "relation", "job")
    for e in graph.edges:
        table.add_row(e.parent, "->", e.child, _enum_name(pb.LineageRelation, e.relation, "LINEAGE_RELATION_"), e.job)
    deleted = [n.name for n in graph.nodes if n.deleted]
    console.print(table if graph.edges else f"{full}: no lineage recorded")
    if deleted:
        console.print(f"deleted since: {', '.join(deleted)}")


# ----------------------------------------------------------------------------- datasets


def _dataset_name(name: str) -> str:
    return name if name.startswith("datasets/") else f"datasets/{name}"


@datasets_app.command("upload")
@command
async def upload(
    stub,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL / JSON / Parquet file.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Dataset id (created when missing).")],
    version: Annotated[str, typer.Option("--version")] = "",
    format: Annotated[str, typer.Option("--format", help="Expected format (default: detect).")] = "",
    description: Annotated[str, typer.Option("--description")] = "",
) -> None:
    """Upload a dataset file as a new version (streamed in chunks)."""
    size = file.stat().st_size

    with Progress(TextColumn("[bold]uploading"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  console=console, transient=True) as progress:
        task = progress.add_task("upload", total=max(size, 1))

        async def messages():
            yield pb.UploadDatasetRequest(metadata=pb.DatasetUploadMetadata(
                parent=_dataset_name(name), version_id=version, filename=file.name, expected_format=format,
                description=description))
            with file.open("rb") as f:
                while chunk := f.read(UPLOAD_CHUNK):
                    yield pb.UploadDatasetRequest(chunk=chunk)
                    progress.advance(task, len(chunk))

        v = (await stub.UploadDataset(messages())).dataset_version
    console.print(f"[green]uploaded[/green] {v.name}: {v.format}, {v.row_count} rows "
                  f"({v.invalid_row_count} invalid), sha256 {v.sha256}")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "config.json")


def _load_tokenizer(model: str):
    """The tokenizer of a local folder, or of a registry version (only its tokenizer files are fetched)."""
    import tempfile

    from transformers import AutoTokenizer

    folder = Path(model)
    with tempfile.TemporaryDirectory(prefix="yard-tokenizer-") as tmp:
        if not folder.is_dir():
            folder = Path(tmp)
            _fetch_tokenizer_files(_version_name(model), folder)
        try:
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure means no usable tokenizer
            _fail(f"--model {model!r}: cannot load its tokenizer: {exc}")


@command
async def _fetch_tokenizer_files(stub, name: str, dest: Path) -> None:
    version = (await stub.GetModelVersion(pb.GetModelVersionRequest(name=name))).model_version
    wanted = [f.path for f in version.files if f.path in TOKENIZER_FILES]
    if not wanted:
        _fail(f"--model {name}: the version has no tokenizer files")
    for path in wanted:
        with open(dest / path, "wb") as out:
            async for part in stub.DownloadFile(pb.DownloadFileRequest(name=name, path=path)):
                out.write(part.chunk)


@datasets_app.command("validate")
def validate(
    file: Annotated[Path, typer.Argument(help="Local JSONL / JSON / Parquet file.")],
    model: Annotated[str, typer.Option(
        "--model", help="Registry model version (MODEL/VERSION) or a local model folder whose tokenizer counts tokens.")] = "",
    max_length: Annotated[int, typer.Option("--max-length", help="Count rows longer than this many tokens.")] = 0,
    format: Annotated[str, typer.Option("--format", help="Expected format (default: detect).")] = "",
    show: Annotated[int, typer.Option("--show", help="Row errors to print.")] = 50,
) -> None:
    """Validate a local dataset file (no server needed); exit 1 when any row is bad."""
    from services.core.datasets import validate_dataset

    try:
        tokenizer = _load_tokenizer(model) if model else None
        report = validate_dataset(file, expected_format=format or None, tokenizer=tokenizer,
                                  max_length=max_length or None)
    except DomainError as err:
        _fail(err.message, err.reason)
        return
    console.print(f"{file}: {report.file_type}, format {report.format or 'unknown'}, {report.row_count} rows, "
                  f"{report.valid_rows} valid, sha256 {report.sha256}")
    if report.token_stats:
        t = report.token_stats
        console.print(f"tokens: min {t.min}, mean {t.mean:.1f}, max {t.max}"
                      + (f", {t.over_length} rows over {t.max_length}" if t.max_length else ""))
    if report.errors:
        table = Table("row", "field", "reason")
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
    stub,
    dataset: Annotated[str, typer.Argument(help="List this dataset's versions; without it, list datasets.")] = "",
    filter: Annotated[str, typer.Option("--filter")] = "",
) -> None:
    """List datasets, or the versions of one dataset."""
    if not dataset:
        table = Table("name", "versions", "description")
        async for d in _pages(lambda tok: stub.ListDatasets(pb.ListDatasetsRequest(
                filter=filter, page_size=200, page_token=tok)), "datasets", 0):
            table.add_row(d.name, str(d.version_count), d.description)
    else:
        table = Table("version", "file", "format", "rows", "invalid", "size", "sha256")
        async for v in _pages(lambda tok: stub.ListDatasetVersions(pb.ListDatasetVersionsRequest(
                parent=_dataset_name(dataset), filter=filter, page_size=200, page_token=tok)), "dataset_versions", 0):
            table.add_row(v.name, v.filename, v.format, str(v.row_count), str(v.invalid_row_count),
                          _human(v.size_bytes), v.sha256[:16])
    console.print(table)


@datasets_app.command("show")
@command
async def show_dataset(
    stub,
    name: Annotated[str, typer.Argument(help="dataset/version or datasets/{d}/versions/{v}.")],
    model: Annotated[str, typer.Option("--model", help="Model version (model/version) for token statistics.")] = "",
    max_length: Annotated[int, typer.Option("--max-length")] = 0,
) -> None:
    """Show a stored dataset version and its validation report."""
    if not name.startswith("datasets/"):
        ds, _, version = name.partition("/")
        name = f"datasets/{ds}/versions/{version}" if version else f"datasets/{ds}"
    if "/versions/" not in name:
        d = (await stub.GetDataset(pb.GetDatasetRequest(name=name))).dataset
        console.print(f"[bold]{d.name}[/bold]  versions: {d.version_count}  {d.description}")
        return
    v = (await stub.GetDatasetVersion(pb.GetDatasetVersionRequest(name=name))).dataset_version
    console.print(json.dumps({"name": v.name, "file": v.filename, "format": v.format, "rows": v.row_count,
                              "invalid_rows": v.invalid_row_count, "size_bytes": v.size_bytes, "sha256": v.sha256},
                             indent=2))
    report = await stub.ValidateDataset(pb.ValidateDatasetRequest(
        name=name, model_version=_version_name(model) if model else "", max_length=max_length))
    if report.HasField("token_stats"):
        t = report.token_stats
        console.print(f"tokens: min {t.min_tokens}, mean {t.mean_tokens:.1f}, max {t.max_tokens}, "
                      f"{t.rows_over_max_length} rows over {t.max_length or '-'}")
    if report.errors:
        table = Table("row", "field", "reason")
        for e in report.errors[:50]:
            table.add_row(str(e.row), e.field, e.reason)
        console.print(table)
