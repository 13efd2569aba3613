"""How ``list`` / ``show`` commands print: a table for people, JSON or YAML for scripts.

Every ``list``/``show`` command takes ``-o/--output table|json|yaml`` (``output_option``) and prints
through ``emit``:

    @app.command("list")
    def list_jobs(output: OutputOption = "table") -> None:
        jobs = ...                                   # protos
        emit(jobs, output, lambda: jobs_table(jobs))

``json``/``yaml`` print the full resource(s) through ``google.protobuf.json_format.MessageToDict``
(proto field names, enums by name, keys sorted), so a script sees every field whatever the table
shows: one message prints as one object, a list as a list. The table form is built by the
command; ``console`` never cuts it when stdout is not a terminal (no ellipsis, no wrapping), so
``yard models lineage X | grep`` finds full names.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from enum import StrEnum
from typing import Annotated, Any, TypeAlias

import typer
import yaml
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Console, RenderableType
from rich.table import Table

Data: TypeAlias = Message | dict[str, Any] | Iterable[Message | dict[str, Any]]
PIPE_WIDTH = 100_000  # wide enough that no row of a piped table is ever folded


class OutputFormat(StrEnum):
    """The ``-o`` choices."""

    table = "table"
    json = "json"
    yaml = "yaml"


OutputOption = Annotated[
    OutputFormat,
    typer.Option("--output", "-o", case_sensitive=False, help="table (for people), json or yaml (the full resource)."),
]


def make_console(*, stderr: bool = False) -> Console:
    """A rich Console that, when not writing to a terminal, never truncates or wraps a line."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr)
    return Console(stderr=stderr, width=PIPE_WIDTH, soft_wrap=True, no_color=True, highlight=False)


def to_dict(message: Message) -> dict[str, Any]:
    """The full resource as plain data: proto field names, enum names, defaults included."""
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _plain(item: Message | dict[str, Any]) -> Any:
    return to_dict(item) if isinstance(item, Message) else item


def render(data: Data, fmt: OutputFormat | str) -> str:
    """``data`` (protos and/or plain dicts) as JSON or YAML text (sorted keys, so output is stable)."""
    if isinstance(data, (Message, dict)):
        plain: Any = _plain(data)
    else:
        plain = [_plain(item) for item in data]
    if OutputFormat(fmt) is OutputFormat.yaml:
        return yaml.safe_dump(plain, sort_keys=True, allow_unicode=True, default_flow_style=False).rstrip("\n")
    return json.dumps(plain, indent=2, sort_keys=True, ensure_ascii=False)


def emit(
    data: Data,
    fmt: OutputFormat | str,
    table: Callable[[], RenderableType | str | None],
    *,
    console: Console | None = None,
) -> None:
    """Print ``data`` as ``fmt``: the table built by ``table()`` or the full resource(s) as JSON/YAML.

    JSON/YAML go straight to stdout (no rich markup, no wrapping) so they parse back whatever
    the terminal width.
    """
    if OutputFormat(fmt) is OutputFormat.table:
        renderable = table()
        if renderable is not None:
            (console or make_console()).print(renderable)
        return
    sys.stdout.write(render(data, fmt) + "\n")
    sys.stdout.flush()


def new_table(*columns: str, **kwargs: Any) -> Table:
    """A table whose cells are never cut with an ellipsis (they fold on a terminal, stay whole in a pipe)."""
    table = Table(*columns, **kwargs)
    for column in table.columns:
        column.overflow = "fold"
    return table


__all__ = ["Data", "OutputFormat", "OutputOption", "emit", "render", "to_dict", "make_console", "new_table"]
