"""structlog setup: a console renderer on a terminal, JSON lines otherwise."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import MutableMapping
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def _fallback(obj: Any) -> Any:
    """What JSON cannot encode (structlog's fallback): ``__structlog__()``, else ``repr``."""
    method = getattr(obj, "__structlog__", None)
    return method() if method is not None else repr(obj)


_ENCODER = json.JSONEncoder(default=_fallback)


def _encode_json(obj: Any, **_: Any) -> str:
    return _ENCODER.encode(obj)


class _Stamp:
    """``timestamp``: UTC, ISO 8601 with microseconds and ``Z`` (structlog's
    ``TimeStamper(fmt="iso", utc=True)``), its seconds formatted once a second."""

    __slots__ = ("prefix", "second")

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""

    def __call__(self, logger: Any, name: str,
                 event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        now = time.time()
        second = int(now)
        if second != self.second:
            self.second = second
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event_dict["timestamp"] = f"{self.prefix}.{int((now - second) * 1e6):06d}Z"
        return event_dict


_timestamp = _Stamp()

# Fields every line of this process carries (a worker's index): one dict merge per line,
# where structlog's merge_contextvars copies and walks the whole context each time.
_FIELDS: dict[str, Any] = {}


def set_process_fields(**fields: Any) -> None:
    """Fields added to every log line of this process from now on (``worker=3``)."""
    _FIELDS.update(fields)


def _add_fields(logger: Any, name: str,
                event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if _FIELDS:
        for key, value in _FIELDS.items():
            event_dict.setdefault(key, value)
    return event_dict

# Bumped by every configure_logging: the loggers below build their bound logger again.
_generation = 0


def configure_logging(fmt: str = "auto", level: str = "info", stream: Any = None) -> None:
    global _generation, _json_out, _min_level
    _generation += 1
    out = stream if stream is not None else sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and hasattr(out, "isatty") and out.isatty())
    _json_out = None if use_console else out
    _min_level = _LEVELS.get(level, logging.INFO)
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=use_console and fmt != "json")
        if use_console
        # One encoder for every line: json.dumps(..., default=...) builds a new one per call.
        else structlog.processors.JSONRenderer(serializer=_encode_json)
    )
    structlog.configure(
        processors=[
            _add_fields,
            structlog.processors.add_log_level,
            _timestamp,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        # (A WriteLogger writes a line in one call: PrintLogger's print() makes two system
        # calls of it, the line and its newline.)
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


# JSON lines (not the console renderer): the stream they go to, written by ``Logger._json``
# directly, as structlog's chain above would render them; the least level written.
_json_out: Any = None
_min_level = logging.INFO
_write_lock = threading.Lock()  # one line at a time (a test process runs proxies in threads)


class Logger:
    """A module's logger. JSON lines are rendered and written here, exactly as the structlog
    chain configured above renders them (the same fields in the same order): in a busy
    process a line through structlog's processors cost about 20 us of CPU, three times its
    cost in a loop. The console renderer, and lines with ``exc_info``, go through
    structlog's logger, bound once per configuration (a lazy structlog proxy binds anew
    each time; caching it in structlog would keep the first configuration past a reload)."""

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

    def _json(self, level_no: int, level: str, event: str, kw: dict[str, Any]) -> bool:
        """Write the line as JSON if that is the configuration (True), else False."""
        out = _json_out
        if out is None or "exc_info" in kw:
            return False
        if level_no < _min_level:
            return True
        kw["event"] = event
        if _FIELDS:
            for key, value in _FIELDS.items():
                kw.setdefault(key, value)
        kw["level"] = level
        _timestamp(None, level, kw)
        line = _ENCODER.encode(kw) + "\n"
        with _write_lock:
            out.write(line)
            out.flush()
        return True

    def debug(self, event: str, **kw: Any) -> Any:
        if not self._json(logging.DEBUG, "debug", event, kw):
            self._logger().debug(event, **kw)

    def info(self, event: str, **kw: Any) -> Any:
        if not self._json(logging.INFO, "info", event, kw):
            self._logger().info(event, **kw)

    def warning(self, event: str, **kw: Any) -> Any:
        if not self._json(logging.WARNING, "warning", event, kw):
            self._logger().warning(event, **kw)

    def error(self, event: str, **kw: Any) -> Any:
        if not self._json(logging.ERROR, "error", event, kw):
            self._logger().error(event, **kw)

    def exception(self, event: str, **kw: Any) -> Any:
        return self._logger().exception(event, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger(), name)


def get_logger(name: str) -> Any:
    return Logger(name)
