"""The requests a conversation tracks (``Pending``: one per Query, Execute, FunctionCall and
Sync awaiting its result) and the listeners that hear of their results. Compiled with mypyc
together with ``conversation.py`` (see setup.py).
"""

from __future__ import annotations

from typing import Final, Protocol

from mypy_extensions import i64

from sqlproxy.wire.scan import decode_text

__all__ = ["EXECUTE", "FUNCTION_CALL", "QUERY", "SYNC", "ConversationListener", "DigitShape",
           "NativeListener", "Pending", "lazy"]

# Kinds of pending requests.
QUERY: Final = 1
EXECUTE: Final = 2
SYNC: Final = 3
FUNCTION_CALL: Final = 4


class DigitShape:
    """A simple Query text's shape as the pooled fast path found it: ``prefix``, a run of
    ASCII digits, ``suffix`` (the UTF-8 bytes of the text up to its closing NUL). Compared by
    identity: a new one is made whenever the fast path sees another shape."""

    def __init__(self, prefix: bytes, suffix: bytes) -> None:
        self.prefix = prefix
        self.suffix = suffix


class Pending:
    """One request awaiting its result. Its text (``sql``) may be kept undecoded
    (``raw[start:stop]``, up to its first NUL: see ``lazy``) until someone asks for it: the
    profiler finds the statement of most texts from their bytes alone
    (``Profiler.record_pending``)."""

    def __init__(self, kind: i64, sql: str, sent: float, statement: bytes = b"",
                 params: bytes = b"", portal: bytes = b"", bind: i64 = 0) -> None:
        self.kind = kind
        self._sql = sql
        self.raw = b""  # the text's message (or chunk), while not decoded
        self.start: i64 = 0
        self.stop: i64 = 0
        # Handed to code that may keep it past the call (an interpreted listener, a session):
        # not reused for the next Query (``Conversation.spare``).
        self.kept = False
        self.sent = sent
        self.statement = statement  # prepared statement name for EXECUTE
        # The Bind message's body from its parameter format codes on: the parameter values,
        # compared whole (the pattern detector tells executions apart by them) and decoded
        # only for the rare statements that need a value, such as OFFSET $n. Empty for the
        # simple protocol.
        self.params = params
        self.index = 0  # next statement of a multi-statement Query
        self.portal = portal
        self.bind = bind  # which Bind created the portal (a portal name is reused)
        # A Query text of this shape (None: not known), and its digits' value key (the int or
        # str ``cache.skeleton_literal`` would give): what ``Profiler.record_pending`` needs
        # when its last one-literal statement is of that shape, without reading the text.
        self.shape: DigitShape | None = None
        self.value: object = None

    def again(self, sql: str, sent: float, statement: bytes = b"", params: bytes = b"",
              portal: bytes = b"", bind: i64 = 0) -> None:
        """Reset to a new request of the same kind, as ``__init__`` would make it (a request
        reused: ``Conversation.spare``)."""
        self._sql = sql
        self.raw = b""
        self.sent = sent
        self.statement = statement
        self.params = params
        self.index = 0
        self.portal = portal
        self.bind = bind
        self.shape = None

    @property
    def sql(self) -> str:
        raw = self.raw
        if len(raw) > 0:
            self._sql = decode_text(raw, self.start, self.stop)
            self.raw = b""
        return self._sql


def lazy(kind: i64, raw: bytes, start: i64, stop: i64, sent: float) -> Pending:
    """A request whose text is ``raw[start:stop]`` (up to its first NUL), decoded from UTF-8
    (invalid bytes replaced) only when ``sql`` is read."""
    p = Pending(kind, "", sent)
    p.raw = raw
    p.start = start
    p.stop = stop
    return p


class ConversationListener(Protocol):
    """What the session wants to hear about. Called synchronously from ``feed_*``."""

    def statement_done(
        self,
        pending: Pending,
        index: int,
        tag: bytes | None,
        rows: int,
        sqlstate: str | None,
        started: float,
        ended: float,
    ) -> None: ...

    def parameter_status(self, name: str, value: str) -> None: ...

    def transaction_status(self, previous: int, current: int, now: float) -> None: ...


class NativeListener:
    """Base class for listeners compiled with this module (the profiler's recorder): the
    tracker calls their methods directly, where a ``ConversationListener`` that is any other
    object is called through Python, its arguments boxed. Subclasses override all three.
    ``statement_done`` gets no command tag (``tag`` None; ``rows`` holds its row count)."""

    def statement_done(self, pending: Pending, index: int, tag: bytes | None, rows: int,
                       sqlstate: str | None, started: float, ended: float) -> None:
        pass

    def parameter_status(self, name: str, value: str) -> None:
        pass

    def transaction_status(self, previous: int, current: int, now: float) -> None:
        pass
