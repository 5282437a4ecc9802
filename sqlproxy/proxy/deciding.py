"""Where a routed session's unit goes: the statements the policy judges, the decision with
what it means for the session (pins, writes, what the fast path learns), and the link —
primary, a replica past the session's read-your-writes horizon, or none yet while one is
connected. The decision itself is ``routing.policy``'s (pure); this is the session's side.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol

from sqlproxy.analysis.classify import Shape
from sqlproxy.analysis.normalize import Normalized
from sqlproxy.logs import get_logger
from sqlproxy.proxy import fastplan
from sqlproxy.proxy.links import Link
from sqlproxy.routing.policy import Decision, RoutedStatement, Target
from sqlproxy.routing.units import Unit

if TYPE_CHECKING:
    from sqlproxy.analysis.profiler import Profiler
    from sqlproxy.analysis.statement import SessionInfo
    from sqlproxy.proxy.routed import RoutedSession
    from sqlproxy.routing.replay import Replay

__all__ = ["decide", "route", "statements", "statements_nr", "unit_statements"]

log = get_logger("sqlproxy.routing")


class StatementSource(Protocol):
    """A session whose statements the policy judges: routed (``RoutedSession``) or pooled
    with routing (``PooledSession``)."""

    profiler: Profiler | None
    info: SessionInfo
    replay: Replay

    @property
    def statement_cache(self) -> Any: ...


def unit_statements(session: StatementSource, unit: Unit) -> list[RoutedStatement] | None:
    """The statements of a unit as the policy sees them (None: a Bind of a statement the
    session does not know)."""
    out: list[RoutedStatement] = []
    for sql in unit.queries:
        out.extend(statements(session, sql))
    parsed = set()
    for name, sql, _ in unit.parses:
        parsed.add(name)
        out.extend(statements(session, sql))
    for name in unit.binds:
        if name in parsed:
            continue
        known = session.replay.statements.get(name)
        if known is None:
            return None
        out.extend(statements(session, known[0]))
    return out


def statements(session: StatementSource, sql: str) -> list[RoutedStatement]:
    return [RoutedStatement(n.text, shape, n.hints) for n, shape in statements_nr(session, sql)]


def decide(session: RoutedSession, unit: Unit) -> Decision | None:
    """The policy's decision for ``unit`` (None: unknown statements), noting pins and
    writes for the session."""
    tx = session.in_transaction()
    stmts = None if unit.unknown else unit_statements(session, unit)
    routing = session.routing
    was_pinned = routing.pinned
    functions = session.router.functions(session.database)
    decision = routing.decide(stmts, in_transaction=tx is not None,
                              transaction_on_replica=tx is not None and tx.replica is not None,
                              functions=functions)
    if decision is None:
        return None
    if session.fast is not None:
        fastplan.learn(session, session.fast, unit, decision, neutral_view=tx is None
                       and not was_pinned and not routing.no_replica)
    if routing.pinned and not was_pinned:
        session.router.note_pinned()
        log.info("session_pinned", session=session.id, reason=decision.reason)
    if routing.table_mode and not decision.writes and decision.target is Target.REPLICA:
        unit.tables = frozenset(t for st in stmts or () for t in st.shape.tables)
    if decision.target is Target.PRIMARY and "volatile function" in decision.reason:
        session.router.load_functions(session.database)  # maybe a function we do not know yet
    return decision


def route(session: RoutedSession, unit: Unit) -> Link | None:
    """The link ``unit`` goes to, or None while a replica connection is being opened for it
    (the session is pumped again then)."""
    primary = session.primary_link
    assert primary is not None
    tx = session.in_transaction()
    decision = decide(session, unit)
    unit.in_tx = tx is not None
    if tx is not None:
        return tx  # transactions stay on one backend, whatever the statement
    if unit.describe_only:
        return primary
    if decision is None or decision.target is Target.PRIMARY:
        return primary
    min_lsn = None
    horizon = session.routing.horizon
    if unit.tables:
        horizon = max(horizon, session.router.table_horizon(session.database, unit.tables))
    if horizon:
        min_lsn = session.router.lsn_after(horizon)
        if min_lsn is None:
            session.router.note_fallback()
            return primary
    rep = session.router.choose(min_lsn, session.routing.excluded(time.monotonic()))
    if rep is None:
        session.router.note_fallback()
        return primary
    link = session.links.get(rep.name)
    if link is None or link.closed:
        session.connect_replica(rep)
        return None
    return link


def statements_nr(session: StatementSource, sql: str) -> list[tuple[Normalized, Shape]]:
    """The normalized statements of ``sql`` and their shapes (the profiler's memo, or the
    session's statement cache when it is not profiled)."""
    profiler = session.profiler
    if profiler is not None:
        return [(s.normalized, s.shape) for s in profiler.statements(session.info, sql)]
    cache = session.statement_cache
    return [(n, cache.shape(n)) for n in cache.scan(sql)]
