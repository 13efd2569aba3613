"""structlog configuration shared by every process: JSON in services, pretty in the CLI.

``merge_contextvars`` comes first so ``request_id`` / ``rpc`` / ``job`` bound by the
interceptors and job runners appear on every line logged while handling that call.

Standard-library ``logging`` records (uvicorn, grpc, sqlalchemy, transformers...) go through the
same processors and renderer: the root logger's one handler formats them with structlog's
``ProcessorFormatter``, so a service's stderr holds one format only (one JSON object a line).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

_HANDLER_MARK = "_modelyard_handler"


def configure_logging(*, level: str | int = "INFO", json: bool = True, service: str | None = None) -> None:
    """Configure structlog and the standard library's root logger for this process.

    Libraries' own records are let through from WARNING up (or from ``level`` when it is higher):
    their INFO chatter is not the service's log."""
    lvl = _level_number(level)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if service:
        shared.append(_static("service", service))
    renderer: Processor
    if json:
        renderer = structlog.processors.JSONRenderer()
        tail: list[Processor] = [structlog.processors.format_exc_info, renderer]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        tail = [renderer]
    structlog.configure(
        processors=[*shared, *tail],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    _configure_stdlib(shared, tail, max(lvl, logging.WARNING))


class _CurrentStderr:
    """Whatever ``sys.stderr`` is when a line is written (not the one when logging was configured): a CLI run
    inside a test harness or under a redirect configures logging on a stream that is replaced, then closed."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def _configure_stdlib(shared: list[Processor], tail: list[Processor], level: int) -> None:
    """One root handler that renders standard-library records like structlog's own lines."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, structlog.stdlib.ExtraAdder()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
    )
    handler = logging.StreamHandler(_CurrentStderr())
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def _level_number(level: str | int) -> int:
    if isinstance(level, int):
        return level
    number = logging.getLevelName(level.upper())
    return number if isinstance(number, int) else logging.INFO


def _static(key: str, value: str) -> Processor:
    def proc(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
        event_dict.setdefault(key, value)
        return event_dict

    return proc


def get_logger(name: str | None = None, **bind: Any) -> Any:
    log = structlog.get_logger(name) if name else structlog.get_logger()
    return log.bind(**bind) if bind else log
