"""structlog setup: a console renderer on a terminal, JSON lines otherwise."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


# Bumped by every configure_logging: the loggers below build their bound logger again.
_generation = 0


def configure_logging(fmt: str = "auto", level: str = "info", stream: Any = None) -> None:
    global _generation
    _generation += 1
    out = stream if stream is not None else sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and hasattr(out, "isatty") and out.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=use_console and fmt != "json")
        if use_console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        # (A WriteLogger writes a line in one call: PrintLogger's print() makes two system
        # calls of it, the line and its newline.)
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


class Logger:
    """A module's logger: structlog's, bound once per configuration rather than on every
    call (a lazy structlog proxy binds anew each time, a third of a log line's cost; caching
    it in structlog would keep the first configuration past a reload)."""

    __slots__ = ("_bound", "_generation", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._generation = -1
        self._bound: Any = None

    def _logger(self) -> Any:
        if self._generation != _generation:
            self._bound = structlog.get_logger(self._name).bind()
            self._generation = _generation
        return self._bound

    def debug(self, event: str, **kw: Any) -> Any:
        return self._logger().debug(event, **kw)

    def info(self, event: str, **kw: Any) -> Any:
        return self._logger().info(event, **kw)

    def warning(self, event: str, **kw: Any) -> Any:
        return self._logger().warning(event, **kw)

    def error(self, event: str, **kw: Any) -> Any:
        return self._logger().error(event, **kw)

    def exception(self, event: str, **kw: Any) -> Any:
        return self._logger().exception(event, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger(), name)


def get_logger(name: str) -> Any:
    return Logger(name)
