"""What every `yard` sub-command shares: one-line errors and the async SDK command wrapper."""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import typer

from cli.output import make_console
from modelyard.client import DomainError, ServiceClient, Unavailable

console = make_console()
err_console = make_console(stderr=True)

C = TypeVar("C", bound=ServiceClient)


class CliError(Exception):
    """A usage error found by the CLI itself (exit 1 with the message)."""


def fail(message: str, reason: str | None = None, fields: list[str] | None = None) -> NoReturn:
    suffix = f" [{reason}]" if reason else ""
    err_console.print(f"[red]error:[/red] {message}{suffix}", highlight=False)
    for field in fields or []:
        err_console.print(f"  - {field}", highlight=False)
    raise typer.Exit(1)


def fail_with(err: DomainError, service: str = "", target: str = "") -> NoReturn:
    """One line for a typed error (message, ErrorInfo reason), then its field violations; exit 1."""
    if isinstance(err, Unavailable) and err.reason == "UNAVAILABLE" and service:
        fail(f"{service} at {target} is unavailable: {err.message}", err.reason)
    fail(err.message, err.reason, [f"{v.field}: {v.description}" for v in err.violations][:20])


def _run(coro: Callable[[], Awaitable[None]], service: str, target: Callable[[], str]) -> None:
    try:
        asyncio.run(coro())  # type: ignore[arg-type]
    except DomainError as err:
        fail_with(err, service, target())
    except CliError as err:
        fail(str(err))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _hide_first_parameter(wrapper: Callable[..., None], fn: Callable[..., Any]) -> None:
    signature = inspect.signature(fn, eval_str=True)
    wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=list(signature.parameters.values())[1:])


def client_command(
    service: str, client_factory: Callable[[], C],
) -> Callable[[Callable[..., Awaitable[None]]], Callable[..., None]]:
    """A decorator running an async command with an SDK client (``modelyard.client``) of ``service``.

    The client raises typed ``DomainError``s; they print as one line (message and ErrorInfo
    reason, plus the field violations) and exit 1. The decorated function's first parameter (the
    client) is hidden from typer.
    """

    def decorate(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> None:
            targets: list[str] = []

            async def run() -> None:
                async with client_factory() as client:  # made inside the loop: a grpc.aio channel binds to it
                    targets.append(client.target)
                    await fn(client, *args, **kwargs)

            _run(run, service, lambda: targets[0] if targets else "")

        _hide_first_parameter(wrapper, fn)
        return wrapper

    return decorate
