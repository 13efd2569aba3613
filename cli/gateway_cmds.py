"""``yard keys create|list|revoke``, ``yard projects ...`` and ``yard usage``: the gateway's admin
endpoints over HTTP.

Which gateway, and its admin token:

- the token: ``YARD_GATEWAY_ADMIN_TOKEN``; else the file the gateway wrote: ``<data dir>/gateway/admin_token``
  of the stack named by ``--data-dir``, else ``YARD_GATEWAY_ADMIN_TOKEN_FILE``, else that file in the data
  dir of ``YARD_DATA_DIR`` / ``YARD_STACK_DATA_DIR`` (what ``yard up`` reads), else ``~/.modelyard``;
- the URL: ``YARD_GATEWAY_URL``; else the gateway address ``yard up`` recorded in that data dir's
  ``stack.json``; else http://127.0.0.1:8000.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from rich.markup import escape
from rich.table import Table

from cli.output import OutputFormat, OutputOption, emit, make_console, new_table
from services.core.settings import DEFAULT_DATA_DIR

console = make_console()
err_console = make_console(stderr=True)
keys_app = typer.Typer(help="API keys of the OpenAI-compatible gateway.", no_args_is_help=True)
projects_app = typer.Typer(
    help="Projects: every API key belongs to one, and a project may use only the models it is allowed "
    "('*': all; 'MODEL'; 'MODEL:ADAPTER'; 'MODEL:*': every adapter of MODEL).",
    no_args_is_help=True,
)

DEFAULT_URL = "http://127.0.0.1:8000"
DataDirOption = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Data directory of the stack (`yard up --data-dir`): its gateway and admin token."),
]
ProjectOption = Annotated[str | None, typer.Option("--project", help="Only this project.")]


class GatewayClientSettings(BaseSettings):
    """Where the CLI finds the gateway and its admin token (env ``YARD_GATEWAY_URL``, ``..._ADMIN_TOKEN``,
    ``..._ADMIN_TOKEN_FILE``)."""

    model_config = SettingsConfigDict(env_prefix="YARD_GATEWAY_", extra="ignore")

    url: str = ""
    admin_token: SecretStr = SecretStr("")
    admin_token_file: Path | None = None


class StackDirSettings(BaseSettings):
    """The stack's data dir when no ``--data-dir`` is given (``YARD_DATA_DIR``, or ``yard up``'s own
    ``YARD_STACK_DATA_DIR``)."""

    model_config = SettingsConfigDict(extra="ignore")

    data_dir: Path = Field(default=DEFAULT_DATA_DIR, validation_alias=AliasChoices("YARD_DATA_DIR", "YARD_STACK_DATA_DIR"))


class GatewayTarget:
    """The resolved URL and admin token file (or token) of one command."""

    def __init__(self, data_dir: Path | None) -> None:
        settings = GatewayClientSettings()
        explicit = data_dir is not None
        self.data_dir = (data_dir or StackDirSettings().data_dir).expanduser().resolve()
        stack_file = self.data_dir / "gateway" / "admin_token"
        if explicit or settings.admin_token_file is None:
            self.token_file = stack_file
        else:
            self.token_file = settings.admin_token_file
        self._token = settings.admin_token.get_secret_value()
        self.url = settings.url or self._stack_url() or DEFAULT_URL

    def _stack_url(self) -> str | None:
        """The gateway address `yard up` recorded in ``<data dir>/stack.json`` (None when there is none)."""
        from cli.stack import read_state

        state = read_state(self.data_dir)
        if state is None:
            return None
        for service in state.services:
            if service.name == "gateway":
                host, _, port = service.address.rpartition(":")
                if host in ("", "0.0.0.0", "::", "[::]"):
                    host = "127.0.0.1"
                return f"http://{host}:{port}"
        return None

    def token(self) -> str:
        if self._token:
            return self._token
        try:
            token = self.token_file.read_text().strip()
        except OSError:
            token = ""
        if not token:
            _fail(
                f"no admin token: set YARD_GATEWAY_ADMIN_TOKEN, or point --data-dir (or YARD_DATA_DIR) at the "
                f"data dir of a started stack (its gateway writes {self.token_file})"
            )
        return token


def _fail(message: str) -> None:
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(1)


def _admin(method: str, path: str, data_dir: Path | None = None, **kwargs: Any) -> Any:
    """One admin call; HTTP and connection errors become one line and exit 1."""
    target = GatewayTarget(data_dir)
    try:
        with httpx.Client(base_url=target.url, timeout=30, headers={"authorization": f"Bearer {target.token()}"}) as c:
            response = c.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        _fail(f"gateway at {target.url} is unavailable: {exc}")
    if response.status_code >= 400:
        try:
            err = response.json()["error"]
            _fail(f"{err['message']}" + (f" [{err['code']}]" if err.get("code") else ""))
        except (ValueError, KeyError, TypeError):
            _fail(f"gateway answered HTTP {response.status_code}: {response.text[:200]}")
    return response.json()


def _limit(value: int) -> str:
    return str(value) if value else "unlimited"


# ---------------------------------------------------------------- keys


@keys_app.command("create")
def create(
    name: Annotated[str, typer.Option("--name", help="What the key is for.")],
    rpm: Annotated[int | None, typer.Option("--rpm", min=0, help="Requests per minute (0: unlimited).")] = None,
    tpm: Annotated[int | None, typer.Option("--tpm", min=0, help="Tokens per minute (0: unlimited).")] = None,
    project: Annotated[
        str, typer.Option("--project", help="The project the key belongs to (its models are what the key reaches).")
    ] = "default",
    data_dir: DataDirOption = None,
) -> None:
    """Create a key; the secret is printed once and never stored in clear."""
    key = _admin("POST", "/admin/keys", data_dir, json={"name": name, "rpm": rpm, "tpm": tpm, "project": project})
    console.print(
        f"created {key['id']} ({escape(key['name'])}) in project {escape(key['project'])}, "
        f"rpm {_limit(key['rpm'])}, tpm {_limit(key['tpm'])}",
        highlight=False,
    )
    console.print("key (shown only now, store it safely):", highlight=False)
    print(key["key"])


@keys_app.command("list")
def list_keys(
    project: ProjectOption = None, output: OutputOption = OutputFormat.table, data_dir: DataDirOption = None
) -> None:
    """Every key with its project, limits and state (secrets are never shown)."""
    keys = _admin("GET", "/admin/keys", data_dir, params={"project": project} if project else None)["data"]

    def table() -> Table:
        rows = new_table("id", "name", "project", "prefix", "rpm", "tpm", "created", "state")
        for k in keys:
            rows.add_row(k["id"], k["name"], k["project"], k["prefix"] + "...", _limit(k["rpm"]), _limit(k["tpm"]),
                         k["created_at"][:19], "revoked" if k["revoked_at"] else "active")
        return rows

    emit(keys, output, table, console=console)


@keys_app.command("revoke")
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key id (key_...), from `yard keys list`.")],
    data_dir: DataDirOption = None,
) -> None:
    """Revoke a key (effective at once on this gateway, within the key cache TTL on others)."""
    key = _admin("POST", f"/admin/keys/{key_id}/revoke", data_dir)
    console.print(f"revoked {key['id']} ({escape(key['name'])})", highlight=False)


# ---------------------------------------------------------------- projects

ModelsArgument = Annotated[
    list[str] | None, typer.Argument(help="Model entries: '*', MODEL, MODEL:ADAPTER or MODEL:*.", show_default=False)
]


def _project_table(projects: list[dict]) -> Table:
    rows = new_table("project", "models", "created", "updated")
    for p in projects:
        rows.add_row(p["name"], ", ".join(p["models"]) or "(none)", p["created_at"][:19], p["updated_at"][:19])
    return rows


def _show(project: dict, output: OutputFormat) -> None:
    emit(project, output, lambda: _project_table([project]), console=console)


@projects_app.command("create")
def create_project(
    name: Annotated[str, typer.Argument(help="Lowercase letters, digits, '.', '_', '-'.")],
    models: Annotated[
        list[str] | None, typer.Option("--model", "-m", help="An allowed model entry (repeat for several).")
    ] = None,
    output: OutputOption = OutputFormat.table,
    data_dir: DataDirOption = None,
) -> None:
    """Create a project, allowed the given models (none by default)."""
    _show(_admin("POST", "/admin/projects", data_dir, json={"name": name, "models": models or []}), output)


@projects_app.command("list")
def list_projects(output: OutputOption = OutputFormat.table, data_dir: DataDirOption = None) -> None:
    """Every project and its allowed models."""
    projects = _admin("GET", "/admin/projects", data_dir)["data"]
    emit(projects, output, lambda: _project_table(projects), console=console)


@projects_app.command("show")
def show_project(
    name: Annotated[str, typer.Argument()], output: OutputOption = OutputFormat.table, data_dir: DataDirOption = None
) -> None:
    """One project."""
    _show(_admin("GET", f"/admin/projects/{name}", data_dir), output)


@projects_app.command("set-models")
def set_models(
    name: Annotated[str, typer.Argument()],
    models: ModelsArgument = None,
    output: OutputOption = OutputFormat.table,
    data_dir: DataDirOption = None,
) -> None:
    """Replace the project's allowed models (none given: the project may use no model)."""
    _show(_admin("PUT", f"/admin/projects/{name}/models", data_dir, json={"models": models or []}), output)


@projects_app.command("allow")
def allow(
    name: Annotated[str, typer.Argument()],
    models: ModelsArgument = None,
    output: OutputOption = OutputFormat.table,
    data_dir: DataDirOption = None,
) -> None:
    """Add models to what the project may use."""
    _show(_admin("PATCH", f"/admin/projects/{name}/models", data_dir, json={"add_models": models or []}), output)


@projects_app.command("deny")
def deny(
    name: Annotated[str, typer.Argument()],
    models: ModelsArgument = None,
    output: OutputOption = OutputFormat.table,
    data_dir: DataDirOption = None,
) -> None:
    """Remove entries from what the project may use (exactly as listed: `deny P '*'` removes the wildcard)."""
    _show(_admin("PATCH", f"/admin/projects/{name}/models", data_dir, json={"remove_models": models or []}), output)


# ---------------------------------------------------------------- usage


def usage(
    key: Annotated[str | None, typer.Option("--key", help="Only this key id.")] = None,
    project: ProjectOption = None,
    by: Annotated[str, typer.Option("--by", help="Rows per 'key' or per 'project' (and model).")] = "key",
    output: OutputOption = OutputFormat.table,
    data_dir: DataDirOption = None,
) -> None:
    """Tokens used per key (or per project, --by project) and model, as the engines reported them."""
    if by not in ("key", "project"):
        _fail(f"--by must be 'key' or 'project', got {by!r}")
    params = {"group_by": by} | ({"key": key} if key else {}) | ({"project": project} if project else {})
    rows = _admin("GET", "/admin/usage", data_dir, params=params)["data"]
    group = "project" if by == "project" else "key_id"

    def table() -> Table:
        out = new_table(by, "model", "requests", "prompt tokens", "completion tokens", "total tokens")
        for r in rows:
            out.add_row(r[group], r["model"], str(r["requests"]), str(r["prompt_tokens"]),
                        str(r["completion_tokens"]), str(r["total_tokens"]))
        return out

    emit(rows, output, table, console=console)
