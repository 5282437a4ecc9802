"""The conversation listeners of plain, routed and pooled sessions, profiled or not.

The conversation tracker calls its listener once per completed statement. Were that listener
the session itself (an ``asyncio.Protocol``, interpreted), every statement would cross from
compiled code into a Python method and back into the compiled profiler. These small classes
are compiled with mypyc together with the tracker and the profiler (see setup.py) and derive
from the tracker's ``NativeListener``, so the tracker calls them directly and the whole
per-statement chain — attribution, statistics, pattern detection — stays in native code. The
recorder also keeps the session's transaction-block figures (duration, statements, idle time).
"""

from __future__ import annotations

from typing import Any, Final

from sqlproxy.analysis.profiler import Profiler
from sqlproxy.analysis.statement import (
    KIND_READ,
    KIND_TRANSACTION,
    KIND_WRITE,
    SessionInfo,
    Statement,
)
from sqlproxy.proxy.pinscan import may_forget
from sqlproxy.wire.requests import NativeListener, Pending

__all__ = ["PooledListener", "PooledRecorder", "RoutedRecorder", "SessionListener",
           "SessionRecorder"]

_IDLE: Final = 73  # ReadyForQuery status 'I'
_FAILED: Final = 69  # 'E'
_ROLLBACKS: Final = ("rollback", "rollback_to")  # they drop the block's settings


class SessionRecorder(NativeListener):
    def __init__(self, profiler: Profiler, session: Any, info: SessionInfo,
                 route: str = "primary") -> None:
        self.profiler = profiler
        self.session = session  # the ClientSession
        self.info = info  # what the profiler knows of it
        self.route = route
        self.in_block = False
        self.tx_start = 0.0
        self.tx_statements = 0
        self.tx_idle = 0.0  # client think time inside the block
        self.tx_last = 0.0
        self.last_started = 0.0

    def statement_done(self, pending: Pending, index: int, tag: bytes | None, rows: int,
                       sqlstate: str | None, started: float, ended: float) -> None:
        stmt = self.profiler.record_pending(self.info, pending, index, rows, sqlstate, started,
                                            ended, self.route)
        self._block(stmt, pending, started, ended)

    def _block(self, stmt: Statement | None, pending: Pending, started: float,
               ended: float) -> None:
        """The transaction block's figures, after each statement."""
        self.last_started = started
        if self.in_block and stmt is not None:
            if stmt.kind != KIND_TRANSACTION:
                self.tx_statements += 1
            if pending.sent > self.tx_last:
                self.tx_idle += pending.sent - self.tx_last
            self.tx_last = ended

    def parameter_status(self, name: str, value: str) -> None:
        self.session.parameter_status(name, value)

    def transaction_status(self, previous: int, current: int, now: float) -> None:
        self.in_block = current != _IDLE
        if previous == _IDLE:  # a transaction block begins
            self.tx_start = self.last_started or now
            self.tx_statements = 0
            self.tx_idle = 0.0
            self.tx_last = now
        elif current == _IDLE:
            self.profiler.transaction_done(self.info, now - self.tx_start,
                                           self.tx_statements, self.tx_idle,
                                           previous == _FAILED)


class RoutedRecorder(SessionRecorder):
    """The recorder of one backend connection (link) of a routed session: statements are
    recorded with the link's name as their route, and the few that change what the session
    must replay elsewhere — SET, RESET, DISCARD, DEALLOCATE, ROLLBACK, any error — are passed
    to the session (``statement_event``); reads and writes never leave native code."""

    def statement_done(self, pending: Pending, index: int, tag: bytes | None, rows: int,
                       sqlstate: str | None, started: float, ended: float) -> None:
        stmt = self.profiler.record_pending(self.info, pending, index, rows, sqlstate, started,
                                            ended, self.route)
        self._block(stmt, pending, started, ended)
        if sqlstate is None and stmt is not None:
            kind = stmt.kind
            if kind in (KIND_READ, KIND_WRITE):
                return
            if kind == KIND_TRANSACTION and stmt.shape.transaction_op not in _ROLLBACKS:
                return  # BEGIN, COMMIT, SAVEPOINT: nothing to replay
        pending.kept = True
        self.session.statement_event(self.route, pending, index, stmt, sqlstate)


class SessionListener(NativeListener):
    """The listener of a session that is not profiled: it only hears of parameter changes
    (application_name), and completed statements cost it nothing."""

    def __init__(self, session: Any) -> None:
        self.session = session

    def parameter_status(self, name: str, value: str) -> None:
        self.session.parameter_status(name, value)


class PooledRecorder(SessionRecorder):
    """The client conversation's listener of a profiled pooled session: records each
    statement natively; DEALLOCATE / DISCARD also go to the session (``statement_event``)."""

    def __init__(self, profiler: Profiler, session: Any, info: SessionInfo,
                 route: str = "primary") -> None:
        super().__init__(profiler, session, info, route)

    def statement_done(self, pending: Pending, index: int, tag: bytes | None, rows: int,
                       sqlstate: str | None, started: float, ended: float) -> None:
        stmt = self.profiler.record_pending(self.info, pending, index, rows, sqlstate, started,
                                            ended, self.route)
        self._block(stmt, pending, started, ended)
        if sqlstate is None:
            if stmt is None:
                if may_forget(pending.sql):
                    pending.kept = True
                    self.session.statement_event(pending, index)
            elif stmt.kind != KIND_READ and stmt.kind != KIND_WRITE \
                    and stmt.shape.command in ("deallocate", "discard"):
                pending.kept = True
                self.session.statement_event(pending, index)


class PooledListener(NativeListener):
    """The listener of a pooled session that is not profiled."""

    def __init__(self, session: Any) -> None:
        self.session = session

    def statement_done(self, pending: Pending, index: int, tag: bytes | None, rows: int,
                       sqlstate: str | None, started: float, ended: float) -> None:
        if sqlstate is None and may_forget(pending.sql):
            pending.kept = True
            self.session.statement_event(pending, index)

    def parameter_status(self, name: str, value: str) -> None:
        self.session.parameter_status(name, value)
