"""What every `yard` sub-command shares: one-line errors and the async gRPC command wrapper."""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import grpc
import typer
from rich.console import Console

from services.core.errors import DomainError
from services.core.grpc_client import error_from_rpc_error, make_channel

console = Console()
err_console = Console(stderr=True)


class CliError(Exception):
    """A usage error found by the CLI itself (exit 1 with the message)."""


def fail(message: str, reason: str | None = None, fields: list[str] | None = None) -> NoReturn:
    suffix = f" [{reason}]" if reason else ""
    err_console.print(f"[red]error:[/red] {message}{suffix}", highlight=False)
    for field in fields or []:
        err_console.print(f"  - {field}", highlight=False)
    raise typer.Exit(1)


def grpc_command(
    service: str,
    address: Callable[[], str],
    stub_factory: Callable[[grpc.aio.Channel], Any],
    *,
    timeout_s: float | None,
) -> Callable[[Callable[..., Awaitable[None]]], Callable[..., None]]:
    """A decorator running an async command with a stub of ``service``.

    gRPC and domain errors become one line (message and ErrorInfo reason, plus the field
    violations) and exit 1; the decorated function's first parameter (the stub) is hidden
    from typer.
    """

    def decorate(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> None:
            addr = address()

            async def run() -> None:
                channel = make_channel(addr, default_timeout_s=timeout_s)
                try:
                    await fn(stub_factory(channel), *args, **kwargs)
                finally:
                    await channel.close()

            try:
                asyncio.run(run())
            except grpc.aio.AioRpcError as exc:
                err = error_from_rpc_error(exc)
                if exc.code() == grpc.StatusCode.UNAVAILABLE and err.reason == "UNAVAILABLE":
                    fail(f"{service} at {addr} is unavailable: {err.message}", err.reason)
                fail(err.message, err.reason, [f"{v.field}: {v.description}" for v in err.violations][:20])
            except DomainError as err:
                fail(err.message, err.reason)
            except CliError as err:
                fail(str(err))
            except KeyboardInterrupt:
                raise typer.Exit(130) from None

        signature = inspect.signature(fn, eval_str=True)
        wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=list(signature.parameters.values())[1:])
        return wrapper

    return decorate
