"""structlog configuration shared by every process: JSON in services, pretty in the CLI.

``merge_contextvars`` comes first so ``request_id`` / ``rpc`` / ``job`` bound by the
interceptors and job runners appear on every line logged while handling that call.
"""

from __future__ import annotations

import logging
import sys

import structlog

_configured = False


def configure_logging(*, level: str = "INFO", json: bool = True, service: str | None = None) -> None:
    global _configured
    lvl = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(lvl, int):
        lvl = logging.INFO
    processors: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if service:
        processors.append(_static("service", service))
    if json:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors += [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(lvl, logging.WARNING), stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    _configured = True


def _static(key: str, value: str):
    def proc(_logger, _name, event_dict):
        event_dict.setdefault(key, value)
        return event_dict

    return proc


def get_logger(name: str | None = None, **bind):
    log = structlog.get_logger(name) if name else structlog.get_logger()
    return log.bind(**bind) if bind else log
