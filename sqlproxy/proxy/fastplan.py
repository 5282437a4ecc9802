"""What the routed fast path may do, decided by the session (interpreted, off the hot path).

``proxy/fastroute.py`` acts; this decides. ``learn`` remembers what a lone statement does each
time the general path decides a unit (a read a replica may serve, a no-op for routing, a
write — never a pin), and ``refresh`` hands the next unit to the fast path when nothing the
session keeps could change where it goes: no unit queued or in flight, no setting to commit
or replay, no read-only transaction on a replica, the replica to use connected and holding
everything the session set up. It runs when the general path finishes a unit, and when reads
held on the primary ask whether a replica may serve them again.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from sqlproxy.proxy.fastroute import NEUTRAL, REPLICA_READ, WRITES, FastRoutes
from sqlproxy.proxy.links import Link
from sqlproxy.proxy.session import SessionState
from sqlproxy.routing.policy import Decision, Target
from sqlproxy.routing.units import Unit, lone_statement
from sqlproxy.wire.messages import TX_IDLE

if TYPE_CHECKING:
    from sqlproxy.proxy.routed import RoutedSession

__all__ = ["learn", "refresh", "what_it_does"]



def learn(session: RoutedSession, fast: FastRoutes, unit: Unit, decision: Decision,
          neutral_view: bool) -> None:
    """Remember what a lone statement does, for the fast path (``fastroute.py``): a read
    a replica may serve (decided from an idle, unpinned session's view), a statement
    with no effect on routing, or a write. Pins are never remembered."""
    if decision.pin or unit.closes or unit.unknown or unit.describe_only:
        return
    sql = lone_statement(unit, session.replay.statements, unnamed=False)
    if sql is None:
        return
    functions = session.router.functions(session.database)
    if functions is not session.fast_functions:  # a reloaded catalog: decide again
        fast.routes.clear()
        session.fast_functions = functions
    key = fast.key(sql)
    if key is None:
        return
    fast.remember(key, what_it_does(decision, neutral_view))


def what_it_does(decision: Decision, neutral_view: bool) -> int:
    """A lone statement's route as the fast paths remember it: a write, a read a replica may
    serve (only from a neutral view: an idle, unpinned session), or neither."""
    if decision.writes:
        return WRITES
    if neutral_view and decision.target is Target.REPLICA \
            and not decision.read_only_transaction:
        return REPLICA_READ
    return NEUTRAL

def refresh(session: RoutedSession, fast: FastRoutes) -> None:
    """Let the fast path take the next unit when nothing the general path keeps could
    change where it goes or what must precede it (see ``fastroute.py``)."""
    fast.ready = False
    fast.inflight = b""
    fast.primary_inflight = False
    if session.state is not SessionState.READY or session.units or session.open_link is not None \
            or session.connecting is not None or len(session.frames) or not session.cutter.empty \
            or session.unit_failed or session.replay.pending_settings or not fast.routes:
        return
    router = session.router
    routing = session.routing
    primary = session.primary_link
    if primary is None or primary.busy or not primary.usable or primary.pump is None \
            or router.functions(session.database) is not session.fast_functions:
        return
    tx = session.tx_link
    if tx is not None and tx is not primary and tx.conv.tx_status != TX_IDLE:
        return  # a read-only transaction on a replica: the general path's
    if any(lk.busy for lk in session.links.values()):
        return
    replay = session.replay
    if b"" in replay.statements or b"" in primary.replay.prepared:
        return
    fast.primary = primary
    fast.primary_conv = primary.conv
    fast.primary_answers = primary.answers
    fast.write_primary = primary.transport.write  # type: ignore[union-attr]
    fast.routing = routing
    fast.router = router
    fast.primary_prepared = _prepared_on(session, primary, fast)
    replica_ok = _replica(session, fast)
    if replica_ok is None:
        return  # a read would go to a replica not connected yet: the general path
    fast.replica_ok = replica_ok
    fast.touched = False
    fast.ready = True

def _prepared_on(session: RoutedSession, link: Link, fast: FastRoutes) -> dict[bytes, int]:
    """Named statements ``link`` holds as the client defined them -> what they do."""
    out: dict[bytes, int] = {}
    statements = session.replay.statements
    for name, msg in link.replay.prepared.items():
        known = statements.get(name)
        if name and known is not None and known[1] == msg:
            key = fast.key(known[0])
            what = fast.routes.get(key, 0) if key is not None else 0
            if what:
                out[name] = what
    return out

def _replica(session: RoutedSession, fast: FastRoutes) -> bool | None:
    """Point the fast path at a replica if reads may go to one now (None: one may serve
    them, but this session has no connection to it yet, or the connection lacks a
    setting or statement — the general path opens it or replays them)."""
    routing = session.routing
    if routing.pinned or routing.no_replica or routing.dirty:
        return False
    min_lsn = None
    if routing.horizon:
        min_lsn = session.router.lsn_after(routing.horizon)
        if min_lsn is None:
            return False
    rep = session.router.choose(min_lsn, routing.excluded(time.monotonic()))
    if rep is None:
        return False
    link = session.links.get(rep.name)
    if link is None or link.closed:
        return None
    if link.transport is None or link.pump is None:
        return False
    backend, replay = link.replay, session.replay
    if backend.settings_gen != replay.settings_gen or backend.to_close \
            or backend.settings_applied != len(replay.settings) \
            or b"" in backend.prepared:
        return None  # the general path replays what the replica lacks
    if fast.link is not link:
        fast.link = link
        fast.replica = rep
        fast.answers = link.answers
        fast.conv = link.conv
        fast.write_replica = link.transport.write
        fast.unit = Unit()
    elif fast.unit is None or fast.unit is link.unit:
        fast.unit = Unit()
    prepared = _prepared_on(session, link, fast)
    fast.prepared_ok = {name: True for name, what in prepared.items()
                        if what == REPLICA_READ}
    return True
