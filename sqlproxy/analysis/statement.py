"""What the profiler keeps per session and per statement text, read on every execution.

Both classes are compiled with mypyc (see setup.py) so that the per-execution chain — the
profiler's lookup, the statistics entry, the pattern detector — reads their fields as native
struct members. The scanner's ``Normalized`` and the classifier's ``Shape`` are plain Python
objects (they are built once per text or shape); the fields the hot path needs are copied out
of them once, when a ``Statement`` is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from sqlproxy.analysis.classify import Shape, StatementKind
from sqlproxy.analysis.normalize import Normalized

if TYPE_CHECKING:
    from sqlproxy.analysis.detector import ConnectionDetector
    from sqlproxy.analysis.stats import StatEntry

__all__ = ["KIND_OTHER", "KIND_READ", "KIND_TRANSACTION", "KIND_WRITE", "SessionInfo",
           "Statement"]

# What the pattern detector tells apart (Statement.kind).
KIND_OTHER: Final = 0  # DDL, utility, SET, COPY, ...
KIND_READ: Final = 1  # SELECT (also VALUES, TABLE, set operations)
KIND_WRITE: Final = 2  # INSERT, UPDATE, DELETE, MERGE
KIND_TRANSACTION: Final = 3  # BEGIN, COMMIT, ROLLBACK, SAVEPOINT, ...

_KINDS = {
    StatementKind.SELECT: KIND_READ,
    StatementKind.INSERT: KIND_WRITE,
    StatementKind.UPDATE: KIND_WRITE,
    StatementKind.DELETE: KIND_WRITE,
    StatementKind.MERGE: KIND_WRITE,
    StatementKind.TRANSACTION: KIND_TRANSACTION,
}


class Statement:
    """One statement of a memoized text: its shape and where its numbers go.

    ``values`` are its literal values (``normalized.values``); ``key`` tells them apart from
    the values of other texts of the same fingerprint (the pattern detector counts distinct
    values): their hash. A text that only shares a skeleton with one seen before is recorded
    with that text's statement and its own raw text (see ``Profiler.record``).
    """

    __slots__ = ("entry", "fingerprint", "has_limit", "has_offset", "ignored", "key", "kind",
                 "literals", "normalized", "offset", "shape", "values")

    normalized: Normalized
    shape: Shape
    entry: StatEntry | None
    values: tuple[str, ...]
    literals: bool
    key: object
    fingerprint: str
    kind: int
    ignored: bool
    has_limit: bool
    has_offset: bool
    offset: int

    def __init__(self, normalized: Normalized, shape: Shape, entry: StatEntry | None) -> None:
        self.normalized = normalized
        self.shape = shape
        self.entry = entry
        values = normalized.values
        self.values = values
        self.literals = len(values) > 0  # does the text hold literal values at all
        self.key = hash(values)
        self.fingerprint = normalized.fingerprint
        self.kind = _KINDS.get(shape.kind, KIND_OTHER)
        self.ignored = "ignore" in normalized.hints
        self.has_limit = shape.has_limit
        self.has_offset = shape.has_offset
        offset = normalized.offset
        self.offset = -1 if offset is None else offset  # a literal OFFSET's value

    def with_offset(self, normalized: Normalized, offset: int) -> Statement:
        """This statement with the value bound to its ``OFFSET $n``."""
        s = Statement(normalized, self.shape, self.entry)
        s.offset = offset
        return s


class SessionInfo:
    """What the profiler knows of one client session.

    ``memo`` maps the session's statement texts to their statements (bounded by the profiler);
    ``detector`` is the session's pattern detector once it has recorded; ``conv`` its
    conversation tracker, asked whether a write ended a round trip (see detector.py).
    """

    def __init__(self, id: int, peer: str = "", database: str = "", user: str = "",
                 application_name: str = "") -> None:
        self.id = id
        self.peer = peer
        self.database = database
        self.user = user
        self.application_name = application_name
        self.memo: dict[str, list[Statement]] = {}
        # The text found in the memo last and its statements (cleared with it): the same text
        # object again needs no lookup.
        self.memo_text: str | None = None
        self.memo_found: list[Statement] | None = None
        # The text before the first literal of the last skeleton found (cache.skeleton_prefix):
        # the next text that starts with it is scanned from there.
        self.skeleton_prefix = ""
        # The last skeleton found with a single literal, cut in two around it (see
        # cache.same_skeleton): the next text that is ``lit_prefix`` + a literal of the same
        # kind + ``lit_suffix`` is the same statement, found without a scan or a hash.
        self.lit_prefix = ""
        self.lit_suffix = ""
        self.lit_string = False  # the literal is a '...' string (else an integer)
        self.lit_prefix_b = b""  # their UTF-8 (cache.skeleton_literal_bytes)
        self.lit_suffix_b = b""
        # The pooled fast path's DigitShape of the same two, once a text of that shape matched
        # (a text of it then needs no comparison: ``Profiler.record_pending``).
        self.lit_shape: object = None
        self.lit_stmts: list[Statement] | None = None
        self.detector: ConnectionDetector | None = None
        self.conv: Any = None
        # Tagged texts without a trace id (static tags: Rails, a prepared statement's text)
        # repeat: text -> (statements, tags), so that they skip the lookup and the tag reading
        # (bounded by the profiler like the memo). Texts with a traceparent never repeat.
        self.tagged: dict[str, tuple[list[Statement], Any]] = {}
