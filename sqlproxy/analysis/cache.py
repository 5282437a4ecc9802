"""Bounded LRU caches in front of the scanner and the classifier.

Two levels, because the hot path sees two kinds of repetition: the same raw text again
(extended-protocol clients re-parsing, ORMs with bound parameters, simple-protocol clients
repeating a query exactly) and the same shape with other literals (simple-protocol clients that
inline them). The first is answered by one dict lookup on the raw text; the second still pays
the scanner, but never sqlglot, which runs once per fingerprint.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from typing import Final, TypeVar

from mypy_extensions import i64

from sqlproxy.analysis.classify import Shape, classify
from sqlproxy.analysis.normalize import Normalized, scan

try:
    from sqlproxy.proxy import _sockio
except ImportError:  # pragma: no cover - built with the package
    _sockio = None  # type: ignore[assignment]

__all__ = [
    "INT_KEY_DIGITS",
    "StatementCache",
    "digits_key",
    "literal_slot",
    "literal_values",
    "same_skeleton",
    "skeleton",
    "skeleton_key",
    "skeleton_prefix",
    "skeleton_scan",
    "strip_edge_comments",
]

# The skeleton of a statement: its text with plain literals — unsigned integers that touch
# no word, and '...' strings without backslashes — cut out. Statements that differ only
# in such literals (pgbench -M simple, ORMs that inline ids) share a skeleton, which one pass
# of compiled code finds (skeleton_scan), several times cheaper than the full scanner; the
# literals themselves are cut out only when needed (verification, captured examples). A
# skeleton is trusted only after the full scanner, run on the first text that has it, found
# exactly these literals and nothing else that depends on their values (see
# StatementCache.template).
# Only integers: a decimal where an integer was (`varchar(0.5)` vs `varchar(5)`) can change
# what the scanner makes of the text around it, so decimals stay in the skeleton.
# _SKELETON_RE defines what is cut and cuts out the literals (literal_values); skeleton_scan
# gives what replacing its strings with \x01 and then its numbers with NUL would give
# (tests/analysis/test_cache.py checks it against these two substitutions).
_SKELETON_RE = re.compile(r"('[^'\\]*+'|[0-9](?<![\w$.][0-9])[0-9]*+(?![\w.]))")
_MARK: Final = "\x00"  # stands for a literal in a skeleton; NUL never occurs in SQL text


_BLANK: Final = " \t\n\r\f\v"
_BLANK_SEMI: Final = _BLANK + ";"
_ASCII_WORD: Final = bytes(
    1 if chr(c).isalnum() or c == 95 else 0 for c in range(128)
)
# The characters below ":" that skeleton_scan looks at: $ " ' - / and the digits.
_SPECIAL_BELOW_58: Final = sum(1 << ord(ch) for ch in "$\"'-/0123456789")
_V = TypeVar("_V")


def strip_edge_comments(sql: str) -> str | None:
    """``sql`` without the comments before and after the statement, or None.

    Tags that frameworks add to every statement (sqlcommenter's ``/*traceparent='...'*/``,
    Rails' query log tags) make each text unique; normalization drops comments anyway, so the
    skeleton may ignore them — unless they hold a ``sqlproxy:`` hint, or a comment is anywhere
    else in the text (then the full scanner decides).
    """
    text = sql.strip(_BLANK_SEMI)
    while text.endswith("*/"):
        # The last opening, outside any string, whose comment ends only at the very end
        # (``/* a */;'*/`` ends a comment and then opens a string).
        start = text.rfind("/*")
        if (start < 0 or text.find("*/", start + 2) != len(text) - 2
                or text.count("'", 0, start) % 2 or "sqlproxy:" in text[start:]):
            return None
        text = text[:start].rstrip(_BLANK_SEMI)
    while text.startswith("/*"):
        end = text.find("*/", 2)
        if end < 0 or "sqlproxy:" in text[:end] or "/*" in text[2:end]:
            return None  # (PostgreSQL's comments nest: "/* /* */" has not ended)
        text = text[end + 2 :].lstrip(_BLANK)
    return None if "/*" in text or "*/" in text else text


def _eligible(sql: str) -> str | None:
    """The text the skeleton is made of (edge comments dropped), or None when the skeleton
    cannot stand for the full scanner: characters whose meaning it cannot see (comments other
    than leading and trailing ones, quoted identifiers, dollar quotes and parameters,
    backslashes)."""
    if "$" in sql or '"' in sql or "\\" in sql or "--" in sql:
        return None
    if "/*" in sql:
        return strip_edge_comments(sql)
    return sql


def skeleton_key(sql: str) -> str | None:
    """The skeleton of a statement, or None (see ``_eligible``; also no literal at all, or
    several statements). Strings and numbers leave different marks: the scanner reads
    `varchar('')` and `varchar(0)` differently.

    One pass over the text (compiled: see ``skeleton_scan``) for the common case; a text with a
    comment takes the longer way through ``_eligible``."""
    key = skeleton_scan(sql)
    if key != "":
        return key
    text = _eligible(sql)  # a comment: only leading and trailing ones may go
    if text is None:
        return None
    key = skeleton_scan(text)
    return key if key != "" else None


def skeleton_scan(text: str, start: i64 = 0) -> str | None:
    """``text`` with its plain literals cut out (``_SKELETON_RE``: strings become \\x01, then
    numbers NUL); None
    when the text is not eligible (a dollar sign, double quote, backslash or ``--`` anywhere),
    has no such literal or holds several statements; "" when it holds a ``/*`` (the caller
    decides: ``skeleton_key`` looks again without the edge comments).

    This runs for every simple-protocol statement whose exact text is new to its session, so
    it is one compiled loop over the characters: ``ord(text[i])`` is a direct read, the ``i64``
    locals are machine integers, and an ordinary character costs two comparisons (every
    character that matters but the backslash is below ``:``; ``_SPECIAL_BELOW_58`` has a bit
    for each).

    ``start``: where to begin, when the caller knows that ``text[:start + 1]`` holds nothing
    this function stops at (see ``skeleton_prefix``), so that skipping it changes nothing.
    """
    n: i64 = len(text)
    parts: list[str] = []
    done: i64 = 0  # text[:done] is in parts
    first_at: i64 = -1  # the first literal, kept out of parts while it is the only one
    first_end: i64 = 0
    first_mark = ""
    prev: i64 = -1  # the character before i, once strings are marks (-1: none)
    i: i64 = start
    if start > 0:
        prev = ord(text[start - 1])
    j: i64 = 0
    c: i64 = 0
    d: i64 = 0
    special: i64 = _SPECIAL_BELOW_58
    semicolon = False  # one was seen: only blanks and semicolons may follow
    while i < n:
        c = ord(text[i])
        if c >= 58:
            if c == 92:
                return None  # backslash
            if c == 59:
                semicolon = True
            elif semicolon:
                return _several(text, i)
            prev = c
            i += 1
            continue
        if semicolon and c != 32 and (c < 9 or c > 13):
            return _several(text, i)
        if (special >> c) & 1 == 0:
            prev = c
            i += 1
            continue
        mark = ""
        if c == 39:  # ' : a string, up to the next quote
            j = i + 1
            while j < n:
                d = ord(text[j])
                if d == 39:
                    break
                if d < 58:
                    if d == 36 or d == 34:
                        return None
                    if d == 45 or d == 47:
                        d = _comment(text, j, n)
                        if d != 0:
                            return None if d == 1 else ""
                elif d == 92:
                    return None
                j += 1
            if j >= n:  # unclosed: no string; what follows is read as it is
                prev = c
                i += 1
                continue
            j += 1
            mark = "\x01"
            prev = 1
        elif c >= 48:  # a digit: a number, unless it touches a word, $ or .
            j = i + 1
            while j < n:
                d = ord(text[j])
                if d < 48 or d > 57:
                    break
                j += 1
            if (prev >= 0 and (prev == 46 or _word(prev))) or (
                j < n and (d == 46 or _word(d))
            ):
                prev = 48  # a digit
                i = j
                continue
            mark = _MARK
            prev = 48
        elif c == 45 or c == 47:  # - / : a comment may start
            d = _comment(text, i, n)
            if d != 0:
                return None if d == 1 else ""
            prev = c
            i += 1
            continue
        else:  # $ "
            return None
        if first_at < 0:
            first_at = i
            first_end = j
            first_mark = mark
        else:
            if len(parts) == 0:
                parts.append(text[:first_at])
                parts.append(first_mark)
                done = first_end
            parts.append(text[done:i])
            parts.append(mark)
            done = j
        i = j
    if first_at < 0:
        return None  # nothing cut out
    if len(parts) > 0:
        parts.append(text[done:])
        return "".join(parts)
    return f"{text[:first_at]}{first_mark}{text[first_end:]}"


def _comment(text: str, i: i64, n: i64) -> i64:
    """1 when ``text[i:]`` starts with ``--``, 2 with ``/*``, else 0."""
    if i + 1 >= n:
        return 0
    c: i64 = ord(text[i])
    d: i64 = ord(text[i + 1])
    if c == 45 and d == 45:
        return 1
    if c == 47 and d == 42:
        return 2
    return 0


def _several(text: str, i: i64) -> str | None:
    """What skeleton_scan answers for a text with something after a semicolon at ``i``: None
    (several statements), unless a comment follows: then "" (without its edge comments and
    semicolons, the text may be one statement after all)."""
    return "" if text.find("/*", i) >= 0 else None


def literal_slot(skel: str) -> i64:
    """Where a skeleton's only literal was cut out, or -1 (none, or several)."""
    number = skel.find(_MARK)
    string = skel.find("\x01")
    if (number >= 0) == (string >= 0):
        return -1
    at: i64 = number if number >= 0 else string
    return -1 if skel.find(skel[at], at + 1) >= 0 else at


def same_skeleton(text: str, prefix: str, suffix: str, string: bool) -> bool:
    """Whether ``text`` has the skeleton ``prefix`` + mark + ``suffix``: it is ``prefix``, then
    one plain literal of the kind the mark stands for (a '...' string when ``string``, else an
    integer), then ``suffix``.

    The prefix and suffix come from a skeleton of one literal whose text held no quote besides
    that literal's (``Profiler._find``), so what lies around the literal reads as it did there;
    the literal itself must be one ``skeleton_scan`` cuts out whole: digits only, or a string
    holding nothing that makes the text ineligible (quote, backslash, dollar sign, double quote,
    the start of a comment). This is the simple protocol's common case — the same statement
    again with another value — answered with two comparisons and a loop over the value."""
    n: i64 = len(text)
    a: i64 = len(prefix)
    b: i64 = n - len(suffix)
    if b <= a or not text.startswith(prefix) or not text.endswith(suffix):
        return False
    c: i64 = 0
    i: i64 = a
    if not string:
        while i < b:
            c = ord(text[i])
            if c < 48 or c > 57:
                return False
            i += 1
        return True
    b -= 1  # the closing quote
    if b <= a or ord(text[a]) != 39 or ord(text[b]) != 39:
        return False
    i += 1
    while i < b:
        c = ord(text[i])
        if c < 58:
            if c == 39 or c == 36 or c == 34:
                return False
            if (c == 45 or c == 47) and _comment(text, i, b) != 0:
                return False
        elif c == 92:
            return False
        i += 1
    return True


# The longest integer literal whose value key is an int (below 10**18: a native 64-bit one).
INT_KEY_DIGITS: Final = 18


def skeleton_literal_at(text: str, prefix: str, suffix: str, string: bool
                        ) -> str | int | None:
    """The literal of ``text`` when it has the skeleton ``prefix`` + mark + ``suffix``
    (``same_skeleton``), else None: as a value key, that is its text, or the integer an
    integer literal of up to ``INT_KEY_DIGITS`` digits stands for (no string made, hashed and
    freed per execution; "007" and "7" are the same value)."""
    if not same_skeleton(text, prefix, suffix, string):
        return None
    literal = text[len(prefix) : len(text) - len(suffix)]
    return literal if string else digits_key(literal)


def digits_key(digits: str) -> int | str:
    """The value key of an integer literal (ASCII digits): its value for up to
    ``INT_KEY_DIGITS`` digits, else its text (``_sockio.c``'s digits_key)."""
    return int(digits) if len(digits) <= INT_KEY_DIGITS else digits


# ``skeleton_literal_at`` in C (``_sockio.c``: the characters compared in place), tested to
# agree with it; a module-level Final, so compiled code calls it without a lookup by name.
skeleton_literal: Final[Callable[[str, str, str, bool], str | int | None]] = (
    _sockio.skeleton_literal if _sockio is not None else skeleton_literal_at)


def skeleton_literal_bytes_at(data: bytes, start: int, stop: int, prefix: bytes, suffix: bytes,
                             string: bool) -> str | int | None:
    """``skeleton_literal_at`` of the text ``data[start:stop]`` (up to its first NUL) decoded
    from UTF-8 (invalid bytes replaced), ``prefix`` and ``suffix`` given in UTF-8."""
    nul = data.find(b"\0", start, stop)
    text = data[start : stop if nul < 0 else nul].decode("utf-8", "replace")
    return skeleton_literal_at(text, prefix.decode("utf-8", "replace"),
                               suffix.decode("utf-8", "replace"), string)


# The same on the text's bytes, in C, before the text is decoded: the profiler finds most
# simple-protocol texts without decoding them. Its None may be a yes of the decoded text's
# (bytes that decode to the prefix only once replaced): then the caller asks the text.
skeleton_literal_bytes: Final[Callable[[bytes, int, int, bytes, bytes, bool],
                                        str | int | None]] = (
    _sockio.skeleton_literal_bytes if _sockio is not None else skeleton_literal_bytes_at)


def skeleton_prefix(skel: str) -> str:
    """The text before the first literal of a skeleton, when a text that starts with it may
    be scanned from its last character on (``skeleton_scan(text, len(prefix) - 1)``); else "".

    Such a prefix holds no literal and nothing the scan stops at (it was scanned), and no quote
    (in another text, a quote left unclosed here may find its end). Its last character is
    scanned again, for what comes after it may differ: ``-`` then ``-``, a digit's look-behind.
    A simple-protocol client repeats the same statement with other values, the literal often
    near the end (pgbench: 51 of 57 characters come before it), so its texts are scanned from
    there.
    """
    cut = skel.find(_MARK)
    string = skel.find("\x01")
    if cut < 0 or 0 <= string < cut:
        cut = string
    if cut < 2:
        return ""
    prefix = skel[:cut]
    return "" if "'" in prefix else prefix


def _word(c: i64) -> bool:
    """Whether the character ``c`` matches ``\\w`` in a str pattern."""
    if c < 128:
        return _ASCII_WORD[c] != 0
    return chr(c).isalnum()


def literal_values(sql: str) -> tuple[str, ...]:
    """The literals ``skeleton_key`` cut out of ``sql``, in order (the rare path: verification,
    captured examples)."""
    text = _eligible(sql)
    return () if text is None else tuple(_SKELETON_RE.split(text)[1::2])


def skeleton(sql: str) -> tuple[str, tuple[str, ...]] | None:
    """(skeleton, literals) of a statement, or None."""
    key = skeleton_key(sql)
    return None if key is None else (key, literal_values(sql))


def _remember(cache: OrderedDict[str, _V], key: str, value: _V, limit: int) -> None:
    """Insert into an LRU, dropping the least recently used entry beyond ``limit``."""
    cache[key] = value
    if len(cache) > limit:
        cache.popitem(last=False)


class StatementCache:
    """Raw text -> statements (LRU), and fingerprint -> shape (LRU).

    ``max_text_length`` keeps very long texts (bulk INSERTs that will not repeat) out of the
    raw-text cache: they are scanned every time, and do not evict the useful entries.
    Not thread-safe; meant for the single event loop.
    """

    __slots__ = (
        "_raw",
        "_shapes",
        "_skeletons",
        "max_raw",
        "max_shapes",
        "max_text_length",
        "raw_hits",
        "raw_misses",
        "shape_hits",
        "shape_misses",
    )

    def __init__(
        self, max_raw: int = 10000, max_shapes: int = 5000, max_text_length: int = 16384
    ) -> None:
        if max_raw < 1 or max_shapes < 1:
            raise ValueError("cache sizes must be at least 1")
        self.max_raw = max_raw
        self.max_shapes = max_shapes
        self.max_text_length = max_text_length
        self._raw: OrderedDict[str, list[Normalized]] = OrderedDict()
        self._shapes: OrderedDict[str, Shape] = OrderedDict()
        # skeleton -> its statement's normalized form (values from the first text), or None
        # when the skeleton cannot stand for the full scan.
        self._skeletons: OrderedDict[str, Normalized | None] = OrderedDict()
        self.raw_hits = 0
        self.raw_misses = 0
        self.shape_hits = 0
        self.shape_misses = 0

    def scan(self, sql: str) -> list[Normalized]:
        """`normalize.scan`, cached by raw text. The list is shared: do not mutate it."""
        raw = self._raw
        hit = raw.get(sql)
        if hit is not None:
            raw.move_to_end(sql)
            self.raw_hits += 1
            return hit
        self.raw_misses += 1
        statements = scan(sql)
        if len(sql) <= self.max_text_length:
            _remember(raw, sql, statements, self.max_raw)
        return statements

    def template(self, skel: str, literals: tuple[str, ...], sql: str) -> Normalized | None:
        """The normalized statement every text with skeleton ``skel`` has, or None.

        The first text of a skeleton goes through the full scanner. The skeleton stands for it
        when the scanner found one statement whose literals are exactly the skeleton's (in
        order), with no literal OFFSET and no hints: then the scanner's output depends only on
        the text around the literals, which all texts of the skeleton share. Otherwise (a
        boolean, a signed number, a type modifier, a literal OFFSET, E'' strings, ...) the
        skeleton is remembered as unusable and its texts take the full path.
        """
        cache = self._skeletons
        if skel in cache:
            cache.move_to_end(skel)
            return cache[skel]
        found = self.scan(sql)
        n: Normalized | None = None
        # OFFSET's value matters (deep-OFFSET detection): such statements take the full path.
        if len(found) == 1 and "offset" not in skel.lower():
            first = found[0]
            if first.values == literals and first.offset is None and not first.hints:
                n = first
        _remember(cache, skel, n, self.max_shapes)
        return n

    def shape(self, n: Normalized) -> Shape:
        """`classify.classify` of the statement's normalized text, cached by fingerprint."""
        shapes = self._shapes
        fp = n.fingerprint
        hit = shapes.get(fp)
        if hit is not None:
            shapes.move_to_end(fp)
            self.shape_hits += 1
            return hit
        self.shape_misses += 1
        shape = classify(n.text)
        _remember(shapes, fp, shape, self.max_shapes)
        return shape

    def clear(self) -> None:
        self._raw.clear()
        self._shapes.clear()
        self._skeletons.clear()

    def __len__(self) -> int:
        return len(self._raw)

    @property
    def shape_count(self) -> int:
        return len(self._shapes)
