"""The scans of the pooled fast path (``fastpool.py``), sans I/O: whether a statement's text
may hold a word of a statement that pins a pooled client (or a DEALLOCATE / DISCARD), whether
a simple Query differs from one scanned before only in a number, and where the messages of an
extended-protocol unit are (``frame_unit``). Each scan that runs per message is in C
(``_sockio.c``), tested to agree with its definition here; compiled with mypyc (see setup.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from mypy_extensions import i64

from sqlproxy.analysis.cache import digits_key
from sqlproxy.wire.scan import find_nul, length_at

try:
    from sqlproxy.proxy import _sockio
except ImportError:  # pragma: no cover - built with the package
    _sockio = None  # type: ignore[assignment]

__all__ = [
    "UnitFrame",
    "digit_run",
    "digit_run_at",
    "frame_unit",
    "in_name",
    "may_forget",
    "may_pin",
    "may_pin_at",
    "same_but_digits",
    "same_but_digits_at",
    "scan_pin",
    "unit_layout",
    "unit_layout_at",
]

_PARSE: Final = 80  # 'P'
_BIND: Final = 66  # 'B'
_DESCRIBE: Final = 68  # 'D'
_EXECUTE: Final = 69  # 'E'
_SYNC: Final = 83  # 'S'
_PORTAL: Final = 80  # 'P' (Describe of a portal)


def may_pin(text: str) -> bool:
    """Whether ``text`` holds one of the words of a statement that pins a pooled client (see
    ``poolpins._pin_text``). Conservative: a word in a literal or a comment only costs
    the full check. A lower-cased copy searched word by word: a case-insensitive regex
    alternation costs tens of thousands of instructions on a one-line SELECT."""
    low = text.lower()
    return ("set" in low or "into" in low or "temp" in low or "listen" in low
            or "prepare" in low or "declare" in low or "advisory" in low or "dblink" in low
            or "lo_open" in low)


def _word_at(data: bytes, i: i64, end: i64, word: bytes) -> bool:
    """``word`` (lower-case ASCII) at ``data[i]``, whatever the case of its letters."""
    n: i64 = len(word)
    if end - i < n:
        return False
    j: i64 = 1  # (the first letter matched already)
    while j < n:
        a: i64 = data[i + j]
        b: i64 = word[j]
        if (a | 32) != (b | 32):
            return False
        j += 1
    return True


def may_pin_at(data: bytes, start: i64, end: i64, forget: bool) -> bool:
    """``may_pin`` on the bytes of a statement text (``data[start:end]``), without decoding
    it: one pass that looks further only at the first letters of the words; with
    ``forget``, DEALLOCATE and DISCARD count too (``may_forget``)."""
    i: i64 = start
    while i < end:
        c: i64 = data[i] | 32
        if c == 115:  # s
            if _word_at(data, i, end, b"set"):
                return True
        elif c == 105:  # i
            if _word_at(data, i, end, b"into"):
                return True
        elif c == 116:  # t
            if _word_at(data, i, end, b"temp"):
                return True
        elif c == 108:  # l
            if _word_at(data, i, end, b"listen") or _word_at(data, i, end, b"lo_open"):
                return True
        elif c == 112:  # p
            if _word_at(data, i, end, b"prepare"):
                return True
        elif c == 97:  # a
            if _word_at(data, i, end, b"advisory"):
                return True
        elif c == 100 and (_word_at(data, i, end, b"declare")  # d
                           or _word_at(data, i, end, b"dblink")
                           or (forget and (_word_at(data, i, end, b"dealloc")
                                           or _word_at(data, i, end, b"discard")))):
            return True
        i += 1
    return False


# The scan the fast path runs on every statement text: ``may_pin_at`` in C (``_sockio.c``),
# an eighth of its cost compiled from Python (tested to agree with it).
scan_pin: Final[Callable[[bytes, int, int, bool], bool]] = (
    _sockio.pin_words if _sockio is not None else may_pin_at)


def _is_digit(c: i64) -> bool:
    return 48 <= c <= 57


def digit_run_at(data: bytes, start: i64, end: i64) -> tuple[int, int]:
    """The bounds of the last run of ASCII digits in ``data[start:end]``, (-1, -1) if none."""
    j: i64 = end
    while j > start and not _is_digit(data[j - 1]):
        j -= 1
    if j == start:
        return -1, -1
    i: i64 = j - 1
    while i > start and _is_digit(data[i - 1]):
        i -= 1
    return i, j


def same_but_digits_at(data: bytes, start: i64, end: i64, prefix: bytes, suffix: bytes
                       ) -> int | str | None:
    """When ``data[start:end]`` is ``prefix``, one or more ASCII digits, ``suffix``: the
    digits' value key as ``cache.skeleton_literal`` gives it (``cache.digits_key``); else
    None."""
    a: i64 = start + len(prefix)
    b: i64 = end - len(suffix)
    if b <= a or data[start:a] != prefix or data[b:end] != suffix:
        return None
    i: i64 = a
    while i < b:
        if not _is_digit(data[i]):
            return None
        i += 1
    return digits_key(data[a:b].decode("ascii"))


# The same in C (tested to agree): the simple protocol's common case is the last statement
# again with another number, whose text need not be scanned again.
digit_run: Final[Callable[[bytes, int, int], tuple[int, int]]] = (
    _sockio.digit_run if _sockio is not None else digit_run_at)
same_but_digits: Final[Callable[[bytes, int, int, bytes, bytes], int | str | None]] = (
    _sockio.same_but_digits if _sockio is not None else same_but_digits_at)


def _message_end(data: bytes, pos: i64, kind: i64, max_message: i64) -> i64:
    """The end of the message of type ``kind`` at ``pos`` (whole within ``data``, its length
    4 to ``max_message``), else -1."""
    n: i64 = len(data)
    if n - pos < 5 or data[pos] != kind:
        return -1
    size: i64 = (data[pos + 1] << 24) | (data[pos + 2] << 16) | (data[pos + 3] << 8) \
        | data[pos + 4]
    if size < 4 or size > max_message or pos + 1 + size > n:
        return -1
    return pos + 1 + size


def _nul_at(data: bytes, start: i64, end: i64) -> i64:
    i: i64 = start
    while i < end:
        if data[i] == 0:
            return i
        i += 1
    return -1


def unit_layout_at(data: bytes, max_message: i64) -> i64:
    """The common extended-protocol unit's messages, framed at once: when ``data`` is exactly
    [Parse of the unnamed statement] Bind [Describe] Execute Sync of the unnamed portal, each
    whole (its length 4 to ``max_message``; the Sync's 4, the Describe's and the Execute's
    those of the unnamed portal's), where each part fits its field, packed: the Parse's end
    (bits 0-11; 0: no Parse), the Bind's size (12-21), the length of the statement name it
    binds (22-28), whether a Describe follows it (29). A value below 2**30: one digit of a
    Python int, read at once by compiled code. Else -1: the fast path's loop frames it (or
    declines it)."""
    n: i64 = len(data)
    pos: i64 = 0
    pend: i64 = 0
    if n > 0 and data[0] == 80:  # 'P'
        pend = _message_end(data, 0, 80, max_message)
        if pend < 8 or pend >= 1 << 12 or data[5] != 0:
            return -1  # (a length of at least 7: a name, a text and a count of types)
        pos = pend
    bend = _message_end(data, pos, 66, max_message)  # 'B'
    if bend - pos < 7 or bend - pos >= 1 << 10 or data[pos + 5] != 0:  # (two names at least)
        return -1
    stmt_end = _nul_at(data, pos + 6, bend)
    stmt: i64 = stmt_end - pos - 6
    if stmt_end < 0 or stmt >= 1 << 7:
        return -1
    epos = bend
    describe: i64 = 0
    if n - bend > 5 and data[bend] == 68:  # 'D'
        epos = _message_end(data, bend, 68, max_message)
        if epos - bend != 7 or data[bend + 5] != 80 or data[bend + 6] != 0:
            return -1  # (not the unnamed portal's)
        describe = 1
    eend = _message_end(data, epos, 69, max_message)  # 'E'
    if eend - epos != 10 or data[epos + 5] != 0 \
            or _message_end(data, eend, 83, max_message) != n or n - eend != 5:  # 'S', last
        return -1
    return pend | ((bend - pos) << 12) | (stmt << 22) | (describe << 29)


# The same in C (tested to agree): one call per unit instead of a loop per message.
unit_layout: Final[Callable[[bytes, int], int]] = (
    _sockio.unit_layout if _sockio is not None else unit_layout_at)


class UnitFrame:
    """Where the messages of one extended-protocol unit are (``frame_unit``): its unnamed Parse
    (``pstart`` -1: none), its Bind, where the Bind's statement name starts and ends (the
    unnamed one: empty), its Execute after the Bind (``epos`` -1: none; -2: another, or one
    before it). One per fast path, filled anew for each unit."""

    def __init__(self) -> None:
        self.pstart: i64 = -1
        self.pend: i64 = -1
        self.bpos: i64 = -1
        self.bend: i64 = -1
        self.bstart: i64 = -1
        self.bstop: i64 = -1
        self.epos: i64 = -1
        self.eend: i64 = -1


def frame_unit(data: bytes, max_message: i64, max_obj: Any, f: UnitFrame) -> bool:
    """Frame ``data`` into ``f`` when it is one whole unit the fast path may serve: at most
    one Parse (of the unnamed statement) and one Bind, Describes of a portal, Executes, a
    Sync last, each message of at most ``max_message`` bytes (``max_obj``: the same, boxed);
    else False. The common layout is framed by one C call (``unit_layout``)."""
    lay: i64 = unit_layout(data, max_obj)
    if lay >= 0:
        parse_end: i64 = lay & 0xFFF
        f.pstart = 0 if parse_end else -1
        f.pend = parse_end
        f.bpos = parse_end
        f.bend = parse_end + ((lay >> 12) & 0x3FF)
        f.bstart = parse_end + 6  # (the unnamed portal)
        f.bstop = f.bstart + ((lay >> 22) & 0x7F)
        f.epos = f.bend + 7 * (lay >> 29)  # (after the Describe, if any)
        f.eend = f.epos + 10
        return True
    n: i64 = len(data)
    pos: i64 = 0
    bstart: i64 = -1
    bstop: i64 = -1
    pstart: i64 = -1
    pend: i64 = -1
    bpos: i64 = -1
    bend: i64 = -1
    epos: i64 = -1
    eend: i64 = -1
    last: i64 = 0
    while pos < n:
        if n - pos < 5:
            return False
        last = data[pos]
        length = length_at(data, pos + 1)
        end = pos + 1 + length
        if length < 4 or end > n or length > max_message:
            return False
        if last == _PARSE:
            if pstart >= 0 or bstart >= 0 or length < 7 or data[pos + 5] != 0:
                return False  # a second Parse, or a named one
            pstart = pos
            pend = end
        elif last == _BIND:
            if bstart >= 0:
                return False
            bstart = find_nul(data, pos + 5, end) + 1  # past the portal's name
            bstop = find_nul(data, bstart, end)
            bpos = pos
            bend = end
        elif last == _EXECUTE:
            if epos == -1 and bstart >= 0:
                epos = pos
                eend = end
            else:
                epos = -2
        elif last == _SYNC:
            if end != n:
                return False
        elif not (last == _DESCRIBE and length > 4 and data[pos + 5] == _PORTAL):
            return False
        pos = end
    if last != _SYNC or bstart < 0:
        return False
    f.pstart = pstart
    f.pend = pend
    f.bpos = bpos
    f.bend = bend
    f.bstart = bstart
    f.bstop = bstop
    f.epos = epos
    f.eend = eend
    return True


def in_name(c: i64) -> bool:
    """Whether byte ``c`` next to a number may make it part of a name (a letter, digit,
    "_", "$", a quoted identifier's '"', a non-ASCII letter) or of a longer number ("."):
    then the number is no literal of its own."""
    return (97 <= (c | 32) <= 122) or 48 <= c <= 57 or c == 95 or c == 36 or c == 46 \
        or c == 34 or c >= 128


def may_forget(text: str) -> bool:
    """Whether ``text`` may hold a DEALLOCATE or DISCARD (a completed statement's tag does not
    reach a native listener): the session then checks it statement by statement."""
    low = text.lower()
    return "dealloc" in low or "discard" in low
