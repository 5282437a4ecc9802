"""Reading parameter values out of a Bind message body, for the few places that need them.

The proxy never decodes Bind messages on its hot path; it keeps the body (from the parameter
format codes on) and the profiler reads a value only when a statement needs it: the value of a
parameterized ``OFFSET $n`` (deep-pagination detection) and, when ``capture_parameters`` is on,
the values of an example execution (for EXPLAIN with real values).
"""

from __future__ import annotations

import re

__all__ = ["bound_integer", "bound_texts", "offset_parameter"]

_OFFSET_PARAM_RE = re.compile(r"\boffset\s+\$([0-9]+)", re.IGNORECASE)


def _values(body: bytes) -> list[tuple[int, bytes | None]] | None:
    """(format code, raw value or None for NULL) per parameter; None if the body is malformed."""
    try:
        pos = 0
        nformats = int.from_bytes(body[pos : pos + 2], "big")
        pos += 2
        formats = [int.from_bytes(body[pos + 2 * i : pos + 2 * i + 2], "big")
                   for i in range(nformats)]
        pos += 2 * nformats
        nparams = int.from_bytes(body[pos : pos + 2], "big")
        pos += 2
        out: list[tuple[int, bytes | None]] = []
        for i in range(nparams):
            length = int.from_bytes(body[pos : pos + 4], "big", signed=True)
            pos += 4
            fmt = formats[0] if nformats == 1 else (formats[i] if nformats else 0)
            if length < 0:
                out.append((fmt, None))
                continue
            if pos + length > len(body):
                return None
            out.append((fmt, body[pos : pos + length]))
            pos += length
        return out
    except IndexError:
        return None


def offset_parameter(sql: str) -> int | None:
    """The 1-based number of the parameter an ``OFFSET $n`` uses, if the text has one."""
    m = _OFFSET_PARAM_RE.search(sql)
    return int(m.group(1)) if m else None


def bound_integer(body: bytes, number: int) -> int | None:
    """Parameter ``number`` (1-based) as an integer: text format, or binary int2/int4/int8."""
    values = _values(body)
    if values is None or not 1 <= number <= len(values):
        return None
    fmt, raw = values[number - 1]
    if raw is None:
        return None
    if fmt == 0:
        text = raw.decode("ascii", "replace").strip()
        return int(text) if text.lstrip("-").isdigit() else None
    if len(raw) in (2, 4, 8):
        return int.from_bytes(raw, "big", signed=True)
    return None


def bound_texts(body: bytes) -> tuple[str, ...] | None:
    """All parameters as SQL literals (text-format values quoted, NULL as NULL), or None when
    a value is in binary format (its type is not known here)."""
    values = _values(body)
    if values is None:
        return None
    out = []
    for fmt, raw in values:
        if raw is None:
            out.append("NULL")
        elif fmt != 0:
            return None
        else:
            out.append("'" + raw.decode("utf-8", "replace").replace("'", "''") + "'")
    return tuple(out)
