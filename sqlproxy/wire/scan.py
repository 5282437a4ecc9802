"""Reading PostgreSQL messages in place: the byte-level helpers of the conversation tracker
(``conversation.py``) and the pooled fast path, sans I/O.

Each reads the received ``bytes`` where they lie (no slices, no struct tuples): a message
length, a string's end, a CommandComplete tag's row count, an ErrorResponse's SQLSTATE, a
statement text decoded up to its NUL, a whole answer read at once. Several have a C twin in
``_sockio.c``, used when built (always, with the package); the definition here is what the
tests hold the C to. Compiled with mypyc (setup.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from mypy_extensions import i64

from sqlproxy.errors import ProtocolViolation

try:
    from sqlproxy.proxy import _sockio
except ImportError:  # pragma: no cover - built with the package
    _sockio = None  # type: ignore[assignment]

__all__ = ["BE_TABLE", "FE_TABLE", "answer_scan", "answer_scan_at", "command_tag_rows",
           "cstring", "cstring_at", "decode_text", "error_fields", "find_nul", "length_at",
           "same_at", "same_at_py", "same_name", "text_at"]

# Per message type (the byte value): 0 = invalid, 1 = valid and ignored, 2 = valid, body needed.
_FE_BODY_NEEDED: Final = b"QPBESCFXcf"
_FE_VALID_ONLY: Final = b"dDHp"
_BE_BODY_NEEDED: Final = b"CIEsZSGHW"


def _table(needed: bytes, valid: bytes) -> bytes:
    t = bytearray(256)
    for c in valid:
        t[c] = 1
    for c in needed:
        t[c] = 2
    return bytes(t)


FE_TABLE: Final = _table(_FE_BODY_NEEDED, _FE_VALID_ONLY)
BE_TABLE: Final = _table(_BE_BODY_NEEDED, b"")


def command_tag_rows(tag: bytes, start: i64 = 0, end: i64 = -1) -> i64:
    """The row count a CommandComplete tag carries ("INSERT 0 5" -> 5, "SELECT 3" -> 3), else 0.
    The tag is ``tag[start:end]`` (``end`` -1: to the end), read in place."""
    n: i64 = len(tag) if end < 0 else end
    i: i64 = n
    while i > start and 48 <= tag[i - 1] <= 57:
        i -= 1
    if i in (n, start) or tag[i - 1] != 32:
        return 0
    value: i64 = 0
    while i < n:
        value = value * 10 + (tag[i] - 48)
        i += 1
    return value


def length_at(data: bytes, pos: i64) -> i64:
    """The big-endian int32 at ``data[pos:pos + 4]`` (a message length; never negative as
    read here). Each byte goes to a machine integer first: shifting the ``int`` that
    ``data[i]`` gives would be tagged-integer arithmetic with overflow checks."""
    a: i64 = data[pos]
    b: i64 = data[pos + 1]
    c: i64 = data[pos + 2]
    d: i64 = data[pos + 3]
    return (a << 24) | (b << 16) | (c << 8) | d


def same_name(data: bytes, start: i64, end: i64, name: bytes) -> bool:
    """Whether ``data[start:end]`` equals ``name`` (compared in place: no slice)."""
    n: i64 = end - start
    if n != len(name):
        return False
    i: i64 = 0
    while i < n:
        if data[start + i] != name[i]:
            return False
        i += 1
    return True


def text_at(data: bytes, start: i64, end: i64) -> str:
    """``data[start:end]`` up to its first NUL, decoded from UTF-8 (invalid bytes replaced): a
    statement's text as the server reads it (up to the NUL, which it then refuses)."""
    sql = data[start:end].decode("utf-8", "replace")
    if "\x00" in sql:
        sql = sql[: sql.index("\x00")]
    return sql


# The same in C (tested to agree): no copy of the bytes, no lookup of the codec by name.
decode_text: Final[Callable[[bytes, int, int], str]] = (
    _sockio.text if _sockio is not None else text_at)

def cstring_at(data: bytes, start: i64, end: i64) -> str | None:
    """The string at ``data[start:]`` up to its NUL (before ``end``), decoded as
    ``decode_text`` does; None when no NUL ends it."""
    i = data.find(0, start, end)
    if i < 0:
        return None
    return text_at(data, start, i)


# The same in C (tested to agree): one memchr, no copy.
cstring: Final[Callable[[bytes, int, int], str | None]] = (
    _sockio.cstring if _sockio is not None else cstring_at)


def same_at_py(data: bytes, start: i64, other: bytes) -> bool:
    """Whether ``data[start:start + len(other)]`` is ``other``."""
    return start >= 0 and start + len(other) <= len(data) \
        and data[start : start + len(other)] == other


# The same in C (tested to agree): compared in place, no slice.
same_at: Final[Callable[[bytes, int, bytes], bool]] = (
    _sockio.same_at if _sockio is not None else same_at_py)


def answer_scan_at(data: bytes) -> i64:
    """The common answer, read at once: when ``data`` is whole messages that end one
    statement and the request — messages the conversation ignores (DataRows counted, none
    after the statement's end), one CommandComplete, a ReadyForQuery last (its status is the
    last byte) — then packed: ``rows << 2 | from_tag << 1 | select``. ``rows`` is the
    CommandComplete tag's row count (``command_tag_rows``; ``from_tag`` 1) or, when that is 0,
    the DataRows counted (``from_tag`` 0); ``select``: the tag is a SELECT's. Else -1 (the
    general loop reads it; so for a tag ending in more than 18 digits). A SELECT of a few
    rows packs to a small int, which Python does not allocate."""
    n: i64 = len(data)
    pos: i64 = 0
    rows: i64 = 0
    tag_start: i64 = -1
    tag_end: i64 = -1
    while pos < n:
        if n - pos < 5:
            return -1
        t: i64 = data[pos]
        size = length_at(data, pos + 1)
        end = pos + 1 + size
        if size < 4 or end > n:
            return -1
        if t == 68:  # 'D'
            if tag_start >= 0:
                return -1
            rows += 1
        elif t == 67:  # 'C'
            if tag_start >= 0 or size < 5 or data[end - 1] != 0:
                return -1
            tag_start = pos + 5
            tag_end = end - 1
        elif t == 90:  # 'Z'
            if tag_start < 0 or end != n or size != 5:
                return -1
            i: i64 = tag_end
            while i > tag_start and 48 <= data[i - 1] <= 57:
                i -= 1
            if tag_end - i > 18:
                return -1
            select: i64 = 1 if tag_end - tag_start >= 7 \
                and data[tag_start : tag_start + 7] == b"SELECT " else 0
            tag_rows = command_tag_rows(data, tag_start, tag_end)
            if tag_rows:
                return (tag_rows << 2) | 2 | select
            if rows >= 1 << 60:
                return -1
            return (rows << 2) | select
        elif BE_TABLE[t] == 2 or t == 0:
            return -1
        pos = end
    return -1


# The same in C (tested to agree): one call per answer instead of a loop per message.
answer_scan: Final[Callable[[bytes], int]] = (
    _sockio.answer_scan if _sockio is not None else answer_scan_at)


def find_nul(data: bytes, start: i64, end: i64) -> i64:
    """Where the string that starts at ``start`` ends (its NUL), before ``end``.

    Names are short: a loop finds their end. A long text (a statement in Parse) is searched
    by ``bytes.find`` past its first 64 bytes: its call costs as much as the loop over 90
    bytes (argument parsing), and then it is one memchr."""
    i: i64 = start
    stop: i64 = start + 64 if end - start > 64 else end
    while i < stop:
        if data[i] == 0:
            return i
        i += 1
    if i < end:
        i = data.find(0, i, end)
        if i >= 0:
            return i
    raise ProtocolViolation("invalid message format: missing string terminator")


def error_fields(data: bytes, start: int, end: int) -> tuple[str, bool]:
    """The SQLSTATE ('C' field) of an ErrorResponse body, and whether it ends the session."""
    i = start
    sqlstate = "XX000"
    fatal = False
    while i < end and data[i] != 0:
        code = data[i]
        j = find_nul(data, i + 1, end)
        if code == 67:  # 'C'
            sqlstate = data[i + 1 : j].decode("ascii", "replace")
        elif code == 86:  # 'V': severity, never localized
            fatal = data[i + 1 : j] in (b"FATAL", b"PANIC")
        i = j + 1
    return sqlstate, fatal

