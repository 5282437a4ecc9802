"""Replica routing for pooled sessions (``pool.mode = "transaction"`` with replicas).

A pooled session borrows a server per transaction; with routing on, a unit that starts
outside a transaction — the only moment a pooled session chooses a server — may borrow one
from a *replica pool* instead of the primary's: one pool per (database, user, replica), the
same lending rules, its servers logged in by the proxy (``routing.replica_login``: trust or
``routing.passwords``). The decision is the routed session's (``routing.policy`` through
``SessionRouting``): only units whose statements are provably read-only, never a pinned
session, never a unit ended by Flush; read-your-writes as in the routed session — after a
write, the session's reads wait for a replica that replayed the primary's position after it
(``Router.lsn_after``), and in ``read_your_writes = "table"`` mode every session's reads of
the tables written do. A replica pool that has no idle server and no free slot is not waited
for: the unit goes to the primary.

A replica unit runs alone and its answer is held back until its ReadyForQuery
(``routing.answers``), so that when the replica proves it could not run it (a write in
disguise, a recovery conflict, a shutdown) the unit is retried on the primary before the
client has seen a byte of it; the conversation sees the unit only once it is released. Its
server goes back to the replica pool as soon as the answer is complete.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from sqlproxy.errors import ConnectionFailure
from sqlproxy.logs import get_logger
from sqlproxy.proxy import deciding
from sqlproxy.proxy.fastplan import what_it_does
from sqlproxy.proxy.fastroute import RECHECK_S
from sqlproxy.routing.answers import DROP_CONNECTION, REPLICA_DOWN, Kind, should_retry
from sqlproxy.routing.policy import Decision, RoutedStatement, Target
from sqlproxy.routing.units import Unit, cut_units, lone_statement

if TYPE_CHECKING:
    from sqlproxy.proxy.pooled import PooledSession
    from sqlproxy.proxy.poolservers import PoolIO, ServerConn
    from sqlproxy.routing.answers import Event

__all__ = ["after_primary", "attach_fast", "choose_for_fast", "deliver", "fast_read_unit", "learn",
           "note_unit", "replica_failed", "replica_lost", "replica_pool_for"]

log = get_logger("sqlproxy.routing")
_AUTH_PROBLEMS = ("password", "authentication", "28P01", "28000")


def _statements(session: PooledSession, unit: Unit) -> list[RoutedStatement] | None:
    """The unit's statements as the policy sees them (None: unknown, e.g. a Bind of a
    statement the session does not know)."""
    return None if unit.unknown else deciding.unit_statements(session, unit)


def attach_fast(session: PooledSession) -> None:
    """Let the compiled fast path route the session's common units (``fastpool``:
    ``routed_unit``): profiled sessions with ``read_your_writes = "session"``; the others'
    units all take the general path."""
    fast = session.fast
    routing = session.routing
    if session.profiler is None or routing is None or routing.table_mode:
        fast.enabled = False
        return
    fast.routed = True
    fast.routing = routing
    fast.router = session.router
    fast.recorder = session.recorder
    fast.choose = lambda now: choose_for_fast(session, now)
    fast.functions = session.router.functions(session.database)  # type: ignore[union-attr]


# How long the fast path keeps the replica it chose for a session's reads (it checks the
# replica's health itself on every unit; the general path's units, a new read-your-writes
# horizon and a failed connection make it choose again at once).
KEEP_CHOICE_S = 0.1


def fast_read_unit(session: PooledSession) -> Unit:
    """The replica read the fast path sent (``fast.r_data``), as the general path's Unit
    (``PooledSession.replica_unit``): it takes the read over from here."""
    fast = session.fast
    data = fast.r_data
    fast.r_data = b""
    fast.r_rep = None
    (unit,) = cut_units(data, session.config.proxy.max_message_bytes)  # (scanned whole)
    unit.sent = fast.r_sent
    unit.in_tx = False
    return unit


def choose_for_fast(session: PooledSession, now: float) -> None:
    """Where the fast path's reads go for a while (``fast.c_*``): the replica pool
    ``replica_pool_for`` would choose now (read-your-writes horizon, health, this session's
    failed replicas), kept KEEP_CHOICE_S; or the primary, asked again after RECHECK_S (as
    the routed session's reads held on the primary do). A reloaded function catalog forgets
    what the routes were learnt under."""
    fast = session.fast
    routing = session.routing
    router = session.router
    assert routing is not None and router is not None
    fast.c_until = now + RECHECK_S
    fast.c_horizon = routing.horizon
    fast.c_pool = None
    fast.c_rep = None
    fast.c_decline = False
    functions = router.functions(session.database)
    if functions is not fast.functions:
        fast.forget_routes()
        fast.functions = functions
    if routing.no_replica:
        return
    min_lsn = None
    if routing.horizon:
        min_lsn = router.lsn_after(routing.horizon)
        if min_lsn is None:
            return
    rep = router.choose(min_lsn, routing.excluded(time.monotonic()))
    if rep is None:
        return
    fast.c_rep = rep
    fast.c_pool = session.manager.replica_pool(session.database, session.user, rep)
    fast.c_until = now + KEEP_CHOICE_S


def learn(session: PooledSession, unit: Unit, decision: Decision) -> None:
    """Remember what a lone statement does, from a decision taken outside a transaction
    for an unpinned session (``fastpool``'s routes): a read a replica may serve, a statement
    of no effect on routing, a write. Pins are never remembered."""
    fast = session.fast
    if not fast.routed or decision.pin or unit.closes or unit.unknown or unit.describe_only \
            or unit.open:
        return
    sql = lone_statement(unit, session.replay.statements, unnamed=True)
    if sql is None:
        return
    functions = session.router.functions(session.database)  # type: ignore[union-attr]
    if functions is not fast.functions:  # a reloaded catalog: what was learnt goes
        fast.forget_routes()
        fast.functions = functions
    key = fast.key(sql)
    if key is None:
        return
    fast.remember(key, what_it_does(decision, neutral_view=True))


def note_unit(session: PooledSession, unit: Unit, in_transaction: bool,
              learnable: bool = True) -> Target:
    """The policy's decision for ``unit`` (noting the session's writes and pins): where it
    may run. Outside a transaction, what a lone statement does is learnt for the fast path
    (not from a unit retried on the primary: the fast path would only send it again to
    where it failed)."""
    routing = session.routing
    router = session.router
    assert routing is not None and router is not None
    stmts = _statements(session, unit)
    was_pinned = routing.pinned
    decision = routing.decide(stmts, in_transaction=in_transaction,
                              transaction_on_replica=False,
                              functions=router.functions(session.database))
    if routing.pinned and not was_pinned:
        router.note_pinned()
    session.fast.c_until = 0.0  # the fast path chooses its replica afresh
    if decision is None:
        return Target.PRIMARY
    if learnable and not in_transaction and not was_pinned and session.pinned is None:
        learn(session, unit, decision)
    if decision.target is Target.PRIMARY and "volatile function" in decision.reason:
        router.load_functions(session.database)  # maybe a function we do not know yet
    if decision.target is Target.REPLICA and routing.table_mode and not decision.writes:
        unit.tables = frozenset(t for st in stmts or () for t in st.shape.tables)
    return decision.target


def replica_pool_for(session: PooledSession, unit: Unit) -> PoolIO | None:
    """The replica pool ``unit`` (starting outside a transaction) borrows from, or None: the
    primary's. Only a pool that can lend or open a server now."""
    router = session.router
    routing = session.routing
    assert router is not None and routing is not None
    retry = session.retry_unit
    if retry is unit:
        session.retry_unit = None
        note_unit(session, unit, in_transaction=False, learnable=False)
        return None
    if unit.open or unit.describe_only or session.pinned is not None \
            or session.scram_pending:  # (the keys to log in to the replica: in a moment)
        note_unit(session, unit, in_transaction=False)
        return None
    if note_unit(session, unit, in_transaction=False) is not Target.REPLICA:
        return None
    horizon = routing.horizon
    if unit.tables:
        horizon = max(horizon, router.table_horizon(session.database, unit.tables))
    min_lsn = None
    if horizon:
        min_lsn = router.lsn_after(horizon)
        if min_lsn is None:
            router.note_fallback()
            return None
    rep = router.choose(min_lsn, routing.excluded(time.monotonic()))
    if rep is None:
        router.note_fallback()
        return None
    pool = session.manager.replica_pool(session.database, session.user, rep)
    st = pool.state
    if st.waiters or not (st.idle or st.total < st.limits.size):
        router.note_fallback()
        return None  # every replica server is lent: the primary serves it
    return pool


def after_primary(session: PooledSession) -> None:
    """The primary is idle outside a transaction: a write of the session sets its
    read-your-writes horizon (and, in table mode, publishes the tables it wrote)."""
    routing = session.routing
    router = session.router
    if routing is None or router is None or not routing.dirty:
        return
    written = routing.primary_idle(router.horizon())
    if written:
        router.note_writes(session.database, written, routing.horizon)


def deliver(session: PooledSession, server: ServerConn, events: list[Event]) -> None:
    """A replica server's answers (events of its ``Answers``)."""
    for ev in events:
        kind = ev.kind
        if kind is Kind.DELIVER:
            _to_client(session, server, ev.data)
        elif kind is Kind.RELEASE:
            _release(session, server)
        elif kind is Kind.UNIT_DONE:
            _unit_done(session, server)
        elif kind is Kind.STREAM_DONE:
            _finish(session, server)
        elif kind is Kind.IDLE_ERROR:  # an idle replica server speaking: a shutdown FATAL
            server.pool.discard(server, "server_error_while_idle")


def _to_client(session: PooledSession, server: ServerConn, data: bytes) -> None:
    t = session.client_transport
    if t is not None and not t.is_closing():
        t.write(data)
    conv = session.conv
    assert conv is not None
    recorder = session.recorder
    rep = server.pool.replica
    if recorder is not None and rep is not None:
        recorder.route = rep.name
        conv.feed_backend(data, time.perf_counter())
        recorder.route = "primary"
    else:
        conv.feed_backend(data, time.perf_counter())


def _release(session: PooledSession, server: ServerConn) -> None:
    """The held answer goes to the client (and the conversation sees the unit now)."""
    unit = session.replica_unit
    answers = server.answers
    if unit is None or answers.hold is None:
        return
    held = answers.take_hold()
    conv = session.conv
    assert conv is not None
    conv.feed_frontend(bytes(unit.data), unit.sent)
    _to_client(session, server, held)


def _unit_done(session: PooledSession, server: ServerConn) -> None:
    unit = session.replica_unit
    assert unit is not None
    answers = server.answers
    error = answers.error
    replay_failed = answers.replay_failed
    rep = server.pool.replica
    if should_retry(error, replay_failed, unit.in_tx):
        reason = f"error {error}" if error else "replay failed"
        _finish(session, server, clean=not (replay_failed or error in DROP_CONNECTION))
        router = session.router
        routing = session.routing
        assert router is not None and routing is not None and rep is not None
        if error in REPLICA_DOWN:
            router.mark_down(rep, reason)
        rep.unit_retried()
        log.info("routing_retry_on_primary", session=session.id, replica=rep.name,
                 reason=reason)
        routing.may_have_written()  # a write in disguise, maybe: read-your-writes
        unit.open = False
        session.retry_unit = unit
        session.units.appendleft(unit)
        return
    _release(session, server)
    _finish(session, server)


def _finish(session: PooledSession, server: ServerConn, clean: bool = True) -> None:
    """The replica unit is over: its server goes back to its pool at once when the session
    is outside a transaction (the next unit is routed on its own)."""
    rep = server.pool.replica
    if session.replica_unit is not None and rep is not None:
        rep.unit_finished()
    session.replica_unit = None
    server.answers.end_unit()
    session.replica_done(server, clean)


def replica_failed(session: PooledSession, pool: PoolIO, problem: str) -> None:
    """A replica server could not be opened for ``session``: its reads go to the primary
    (for a while, or for good when the replica refuses the user's login)."""
    routing = session.routing
    router = session.router
    rep = pool.replica
    if routing is None or router is None or rep is None:
        return
    if any(word in problem for word in _AUTH_PROBLEMS):
        routing.no_replica = True
        session.fast.forget_routes()  # its reads are the primary's now: learnt anew
        router.warn_once(f"auth:{session.user}", "replica_authentication_impossible",
                         user=session.user, replica=rep.name, reason=problem,
                         consequence="this user's reads stay on the primary")
    else:
        routing.connect_failed(rep.name, time.monotonic())
        router.mark_down(rep, problem)
    session.fast.c_until = 0.0  # the fast path chooses again


def replica_lost(session: PooledSession, server: ServerConn, exc: Exception | None) -> None:
    """The replica server ``session`` held is gone (the pool has taken it off its books). A
    unit whose answer was still held back is retried on the primary; one already streaming,
    or a transaction on the replica, cannot be: the client gets an error."""
    rep = server.pool.replica
    router = session.router
    routing = session.routing
    assert rep is not None and router is not None and routing is not None
    unit = session.replica_unit
    router.mark_down(rep, f"connection lost: {exc}" if exc else "connection lost")
    conv = session.conv
    if unit is not None:
        held = server.answers.hold is not None
        rep.unit_finished()
        session.replica_unit = None
        server.answers.end_unit()
        if held and not unit.in_tx:
            rep.unit_retried()
            log.info("routing_retry_on_primary", session=session.id, replica=rep.name,
                     reason="connection lost")
            routing.may_have_written()
            unit.open = False
            session.retry_unit = unit
            session.units.appendleft(unit)
            session.pump()
            return
        session.fail(ConnectionFailure("replica connection lost in the middle of a statement",
                                       detail=f"replica {rep.name}"))
        return
    if conv is not None and conv.tx_status != 73:  # 'I': a transaction on the replica
        session.fail(ConnectionFailure("replica connection lost inside a transaction block",
                                       detail=f"replica {rep.name}"))
        return
    session.pump()
