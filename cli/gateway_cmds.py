"""``yard keys create|list|revoke`` and ``yard usage``: the gateway's admin endpoints over HTTP.

The gateway is found at ``YARD_GATEWAY_URL`` (default http://127.0.0.1:8000); the admin token is
``YARD_GATEWAY_ADMIN_TOKEN`` or, for the local stack, the file the gateway wrote
(``YARD_GATEWAY_ADMIN_TOKEN_FILE``, default ~/.modelyard/gateway/admin_token).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from rich.markup import escape
from rich.table import Table

from cli.output import OutputFormat, OutputOption, emit, make_console, new_table
from services.core.settings import DEFAULT_DATA_DIR

console = make_console()
err_console = make_console(stderr=True)
keys_app = typer.Typer(help="API keys of the OpenAI-compatible gateway.", no_args_is_help=True)


class GatewayClientSettings(BaseSettings):
    """Where the CLI finds the gateway and its admin token."""

    model_config = SettingsConfigDict(env_prefix="YARD_GATEWAY_", extra="ignore")

    url: str = "http://127.0.0.1:8000"
    admin_token: SecretStr = SecretStr("")
    admin_token_file: Path = DEFAULT_DATA_DIR / "gateway" / "admin_token"

    def token(self) -> str:
        if self.admin_token.get_secret_value():
            return self.admin_token.get_secret_value()
        try:
            return self.admin_token_file.read_text().strip()
        except OSError:
            _fail(f"no admin token: set YARD_GATEWAY_ADMIN_TOKEN or start the local stack (it writes "
                  f"{self.admin_token_file})")
            raise  # unreachable: _fail exits


def _fail(message: str) -> None:
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(1)


def _admin(method: str, path: str, **kwargs: Any) -> Any:
    """One admin call; HTTP and connection errors become one line and exit 1."""
    settings = GatewayClientSettings()
    try:
        with httpx.Client(base_url=settings.url, timeout=30,
                          headers={"authorization": f"Bearer {settings.token()}"}) as client:
            response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        _fail(f"gateway at {settings.url} is unavailable: {exc}")
    if response.status_code >= 400:
        try:
            err = response.json()["error"]
            _fail(f"{err['message']}" + (f" [{err['code']}]" if err.get("code") else ""))
        except (ValueError, KeyError, TypeError):
            _fail(f"gateway answered HTTP {response.status_code}: {response.text[:200]}")
    return response.json()


def _limit(value: int) -> str:
    return str(value) if value else "unlimited"


@keys_app.command("create")
def create(
    name: Annotated[str, typer.Option("--name", help="What the key is for.")],
    rpm: Annotated[int | None, typer.Option("--rpm", min=0, help="Requests per minute (0: unlimited).")] = None,
    tpm: Annotated[int | None, typer.Option("--tpm", min=0, help="Tokens per minute (0: unlimited).")] = None,
) -> None:
    """Create a key; the secret is printed once and never stored in clear."""
    key = _admin("POST", "/admin/keys", json={"name": name, "rpm": rpm, "tpm": tpm})
    console.print(f"created {key['id']} ({escape(key['name'])}), rpm {_limit(key['rpm'])}, tpm {_limit(key['tpm'])}",
                  highlight=False)
    console.print("key (shown only now, store it safely):", highlight=False)
    print(key["key"])


@keys_app.command("list")
def list_keys(output: OutputOption = OutputFormat.table) -> None:
    """Every key with its limits and state (secrets are never shown)."""
    keys = _admin("GET", "/admin/keys")["data"]

    def table() -> Table:
        rows = new_table("id", "name", "prefix", "rpm", "tpm", "created", "state")
        for k in keys:
            rows.add_row(k["id"], k["name"], k["prefix"] + "...", _limit(k["rpm"]), _limit(k["tpm"]),
                         k["created_at"][:19], "revoked" if k["revoked_at"] else "active")
        return rows

    emit(keys, output, table, console=console)


@keys_app.command("revoke")
def revoke(key_id: Annotated[str, typer.Argument(help="The key id (key_...), from `yard keys list`.")]) -> None:
    """Revoke a key (effective at once on this gateway, within the key cache TTL on others)."""
    key = _admin("POST", f"/admin/keys/{key_id}/revoke")
    console.print(f"revoked {key['id']} ({escape(key['name'])})", highlight=False)


def usage(key: Annotated[str | None, typer.Option("--key", help="Only this key id.")] = None,
          output: OutputOption = OutputFormat.table) -> None:
    """Tokens used per key and model, as the engines reported them."""
    rows = _admin("GET", "/admin/usage", params={"key": key} if key else None)["data"]

    def table() -> Table:
        out = new_table("key", "model", "requests", "prompt tokens", "completion tokens", "total tokens")
        for r in rows:
            out.add_row(r["key_id"], r["model"], str(r["requests"]), str(r["prompt_tokens"]),
                        str(r["completion_tokens"]), str(r["total_tokens"]))
        return out

    emit(rows, output, table, console=console)
