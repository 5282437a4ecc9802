"""The module logger's own JSON lines (``sqlproxy.logs.Logger``) are structlog's, field for
field and in the same order; levels below the configured one are dropped; the console
renderer still goes through structlog."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from sqlproxy import logs


@pytest.fixture(autouse=True)
def _restore() -> Iterator[None]:
    """Back to how the other tests' in-process proxies log: structlog's defaults."""
    yield
    logs._FIELDS.clear()
    logs._json_out = None
    logs._generation += 1
    structlog.reset_defaults()


class _Odd:
    def __repr__(self) -> str:
        return "<odd>"


def _lines(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_json_lines_are_the_structlog_chain_s() -> None:
    log = logs.get_logger("t")
    logs.set_process_fields(worker=3)
    fields = {"a": 1, "obj": _Odd(), "s": "é", "none": None, "worker": 9, "lst": [1, "x"]}
    ours = io.StringIO()
    logs.configure_logging("json", "info", stream=ours)
    for method in ("info", "warning", "error"):
        getattr(log, method)("an_event", **fields)
    theirs = io.StringIO()
    logs.configure_logging("json", "info", stream=theirs)
    logs._json_out = None  # (the structlog chain, as for the console renderer)
    for method in ("info", "warning", "error"):
        getattr(log, method)("an_event", **fields)
    a, b = _lines(ours), _lines(theirs)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        assert list(x) == list(y)  # the same fields in the same order
        assert x.pop("timestamp")[:16] == y.pop("timestamp")[:16]
        assert x == y
    assert a[0]["worker"] == 9 and a[0]["obj"] == "<odd>" and a[1]["level"] == "warning"


def test_levels_below_the_configured_one_are_dropped() -> None:
    log = logs.get_logger("t")
    out = io.StringIO()
    logs.configure_logging("json", "warning", stream=out)
    log.debug("d")
    log.info("i")
    log.warning("w", n=1)
    log.error("e")
    assert [(x["event"], x["level"]) for x in _lines(out)] == [("w", "warning"), ("e", "error")]


def test_timestamps_are_utc_iso_with_microseconds() -> None:
    log = logs.get_logger("t")
    out = io.StringIO()
    logs.configure_logging("json", "info", stream=out)
    log.info("x")
    (line,) = _lines(out)
    stamp = line["timestamp"]
    assert len(stamp) == len("2026-12-03T10:36:55.421862Z") and stamp.endswith("Z")
    assert stamp[10] == "T" and stamp[19] == "."


def test_console_lines_go_through_structlog() -> None:
    log = logs.get_logger("t")
    out = io.StringIO()
    logs.configure_logging("console", "info", stream=out)
    log.info("console_event", k="v")
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.getvalue())  # (colours)
    assert "console_event" in text and "k=v" in text and not text.startswith("{")
