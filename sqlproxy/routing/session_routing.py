"""What one routed session knows for routing (sans-IO): pins, pending writes, its
read-your-writes horizon, and the replicas it cannot use for now.

``routing.policy.decide`` judges one unit; this keeps what follows from the decisions over the
session's life:

* a *pin* (a statement left state only the primary has) keeps the session there for good;
* a unit that may write makes the session *dirty*: when it completes on the primary outside a
  transaction block, the session's reads wait for a replica past the primary's position after
  it (its *horizon*, see ``routing.health``), and with ``read_your_writes = "table"`` the tables
  it wrote are published to every session (``routing.tables``);
* a replica this session failed to connect to is skipped, backing off 0.25 s .. 30 s; one it
  cannot authenticate to at all makes the session's reads stay on the primary.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlproxy.analysis.classify import StatementKind
from sqlproxy.routing.policy import (
    Decision,
    FunctionPolicy,
    RoutedStatement,
    SessionView,
    Target,
    decide,
)
from sqlproxy.routing.tables import ALL, written_tables

__all__ = ["SessionRouting"]

_BACKOFF_FIRST = 0.25
_BACKOFF_MAX = 30.0


class SessionRouting:
    __slots__ = ("dirty", "failed_replicas", "horizon", "no_replica", "pinned", "table_mode",
                 "written")

    def __init__(self, table_mode: bool) -> None:
        self.table_mode = table_mode
        self.pinned = False
        self.dirty = False  # a unit that may write is in flight on the primary
        self.horizon = 0  # read-your-writes: cycle whose primary LSN replicas must pass
        self.written: set[str] = set()  # tables written by the dirty unit(s) ("table" mode)
        self.no_replica = False  # authentication to replicas impossible for this session
        # Replicas this session could not connect to: name -> (retry after, failures).
        self.failed_replicas: dict[str, tuple[float, int]] = {}

    def decide(self, stmts: Sequence[RoutedStatement] | None, *, in_transaction: bool,
               transaction_on_replica: bool, functions: FunctionPolicy) -> Decision | None:
        """The decision for a unit's statements (None: statements unknown — an Execute of a
        portal from earlier, a FunctionCall — or nothing worth a replica). Notes pins and
        writes; ``Decision.pin`` with ``pinned`` newly set tells the caller to report it."""
        if stmts is None:
            self.may_have_written()
            return None
        view = SessionView(pinned=self.pinned, in_transaction=in_transaction,
                           transaction_on_replica=transaction_on_replica,
                           replicas_usable=not self.no_replica)
        decision = decide(stmts, view, functions)
        if decision.pin:
            self.pinned = True
        if decision.writes:
            self.dirty = True
            if self.table_mode:
                self.written |= written_tables(stmts, functions)
        if not stmts:
            return None
        if decision.target is Target.REPLICA and all(
            st.shape.kind is StatementKind.TRANSACTION and not st.shape.read_only_txn
            for st in stmts
        ):
            return None  # a lone COMMIT outside a block: nothing to gain
        return decision

    def may_have_written(self) -> None:
        """A unit of unknown effect ran (or a replica's refusal proved one wrote)."""
        self.dirty = True
        if self.table_mode:
            self.written.add(ALL)

    def primary_idle(self, horizon: int) -> set[str] | None:
        """The primary finished outside a transaction block: if the session wrote, its reads
        now wait for ``horizon``; returns the tables written (to publish), or None."""
        if not self.dirty:
            return None
        self.dirty = False
        self.horizon = horizon
        written, self.written = self.written, set()
        return written

    # ------------------------------------------------------------------ replica failures
    def connect_failed(self, name: str, now: float) -> None:
        _, failures = self.failed_replicas.get(name, (0.0, 0))
        self.failed_replicas[name] = (
            now + min(_BACKOFF_MAX, _BACKOFF_FIRST * 2**failures), failures + 1)

    def connected(self, name: str) -> None:
        self.failed_replicas.pop(name, None)

    def excluded(self, now: float) -> frozenset[str]:
        failed = self.failed_replicas
        if not failed:
            return frozenset()
        return frozenset(name for name, (until, _) in failed.items() if now < until)
