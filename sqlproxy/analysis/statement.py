"""What the profiler keeps per session and per statement text, read on every execution.

Both classes are compiled with mypyc (see setup.py) so that the per-execution chain — the
profiler's lookup, the statistics entry, the pattern detector — reads their fields as native
struct members. The scanner's ``Normalized`` and the classifier's ``Shape`` are plain Python
objects (they are built once per text or shape); the fields the hot path needs are copied out
of them once, when a ``Statement`` is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from sqlproxy.analysis.cache import literal_values
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

    ``values`` are the literal values of this execution: ``normalized.values`` for a text seen
    before, the literals cut out of ``raw`` on demand for a text that only shares a skeleton
    with one seen before. ``key`` tells this execution's literal values apart from others of
    the same fingerprint (the pattern detector counts distinct values): the hash of the values,
    or, for a skeleton-matched text, the text itself (the skeleton being the same, different
    texts have different literals), whose hash Python caches.
    """

    __slots__ = ("entry", "fingerprint", "has_limit", "has_offset", "ignored", "key", "kind",
                 "literals", "normalized", "offset", "raw", "shape", "values")

    normalized: Normalized
    shape: Shape
    entry: StatEntry | None
    raw: str
    values: tuple[str, ...] | None
    literals: bool
    key: object
    fingerprint: str
    kind: int
    ignored: bool
    has_limit: bool
    has_offset: bool
    offset: int

    def __init__(self, normalized: Normalized, shape: Shape, entry: StatEntry | None,
                 base: Statement | None = None) -> None:
        self.normalized = normalized
        self.shape = shape
        self.entry = entry
        if base is not None:  # a copy of ``base`` (see with_text, with_offset)
            self.raw = base.raw
            self.values = base.values
            self.literals = base.literals
            self.key = base.key
            self.fingerprint = base.fingerprint
            self.kind = base.kind
            self.ignored = base.ignored
            self.has_limit = base.has_limit
            self.has_offset = base.has_offset
            self.offset = base.offset
            return
        self.raw = ""
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

    def with_text(self, raw: str) -> Statement:
        """This statement as executed with the literals of ``raw`` (same skeleton)."""
        s = Statement(self.normalized, self.shape, self.entry, self)
        s.raw = raw
        s.values = None
        s.literals = True
        s.key = raw
        return s

    def with_offset(self, normalized: Normalized, offset: int) -> Statement:
        """This statement with the value bound to its ``OFFSET $n``."""
        s = Statement(normalized, self.shape, self.entry, self)
        s.offset = offset
        return s

    def literal_values(self) -> tuple[str, ...]:
        values = self.values
        if values is None:
            values = self.values = literal_values(self.raw)
        return values


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
        self.detector: ConnectionDetector | None = None
        self.conv: Any = None
