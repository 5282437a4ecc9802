"""The routed session's hot path: a read sent to a replica and its answer, in native code.

Compiled with mypyc (see setup.py), like the plain session's pumps. The routed session
(``routed.py``) handles everything in general, correctly, and slowly: it frames every message,
cuts units, asks the policy, replays state, holds answers. Most of a read-mostly application's
traffic is simpler than that: an idle session sends one Query whose statement it sent before,
the policy sent that statement to a replica then and nothing since could change that, and the
replica answers with a few messages ending in ReadyForQuery and no error. ``FastRoutes`` does
exactly that and nothing else:

* ``RoutedClientPump`` (the client transport's protocol) offers each chunk to ``query``: one
  whole Query, the session *ready* (``RoutedSession.refresh_fast`` decided it: no unit queued
  or in flight, not pinned, no transaction, no write awaiting its read-your-writes horizon, no
  setting or statement to replay on the replica, the replica healthy) and its statement known
  (by normalized text, so inlined literals do not make it new) as one routed to a replica.
  Then the bytes go to that replica as received, with the unit noted on its link as the
  general path would note it.
* ``RoutedLinkPump`` (the replica transport's protocol) offers each chunk to ``answer``: when it
  is the whole answer to that unit with no ErrorResponse in it, nothing can make the session
  retry it elsewhere, so it goes to the client as it came and the conversation records it.

The same statements go to the primary by the same path when the session cannot use a replica
for them right now (inside a transaction block on the primary, pinned, or while its reads wait
for a replica to replay its last write): the session learned what each statement does
(``routes``: a read a replica may serve, a statement with no effect on routing, a write), so a
write only has to mark the session *dirty* — its read-your-writes horizon is then set by the
general path when the primary is idle again — and the rest need no bookkeeping at all.

Anything else goes to the session's general path, which clears ``ready`` first; the session
sets it again when it is idle (``RoutedSession.refresh_fast``). A chunk the fast path declined
leaves no trace: the general path sees exactly what it would have seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

from mypy_extensions import i64

from sqlproxy.analysis.profiler import Profiler
from sqlproxy.analysis.statement import SessionInfo
from sqlproxy.errors import ProtocolViolation
from sqlproxy.proxy.pinscan import UnitFrame, frame_unit
from sqlproxy.proxy.pump import StandIn
from sqlproxy.routing.answers import Answers
from sqlproxy.routing.units import Unit
from sqlproxy.wire.conversation import Conversation
from sqlproxy.wire.scan import length_at

__all__ = ["NEUTRAL", "REPLICA_READ", "WRITES", "FastRoutes", "RoutedClientPump",
           "RoutedLinkPump"]

_QUERY: Final = 81  # 'Q'
_ERROR: Final = 69  # 'E'
_READY: Final = 90  # 'Z'
MAX_ROUTES: Final = 4096  # statements remembered per session


def whole_answer(data: bytes) -> bool:
    """``data`` is whole messages ending with ReadyForQuery, none an ErrorResponse."""
    n: i64 = len(data)
    pos: i64 = 0
    t: i64 = 0
    while pos < n:
        if n - pos < 5:
            return False
        t = data[pos]
        length = length_at(data, pos + 1)
        if t == _ERROR or length < 4:
            return False
        pos += 1 + length
    return pos == n and t == _READY


#: What a statement does, as the session learned it (``FastRoutes.routes``).
REPLICA_READ: Final = 1  # a read a replica may serve (the policy said so)
NEUTRAL: Final = 2  # no effect on routing (BEGIN, COMMIT, a read that must stay primary)
WRITES: Final = 3  # may change data: the session's reads then wait for its horizon
_IDLE: Final = 73  # 'I'
RECHECK_S: Final = 0.01  # how often reads held on the primary ask whether a replica may serve


class FastRoutes:
    """One routed session's fast path (see the module doc). The session owns the decisions:
    it fills ``routes``, and ``fastplan.refresh`` sets ``ready`` with the links to use; this only
    acts on them."""

    def __init__(self, session: Any, profiler: Profiler, info: SessionInfo,
                 max_message: int) -> None:
        self.session = session
        self.profiler = profiler
        self.info = info
        self.max_message = max_message
        self.max_obj: Any = max_message  # (passed to C as it is: not boxed anew)
        self.frame = UnitFrame()  # where ``bound_statement`` found a unit's messages
        self.routes: dict[str, int] = {}  # normalized text -> REPLICA_READ, NEUTRAL, WRITES
        self.ready = False
        self.touched = False  # the general path ran since ready was set
        self.clock: Callable[[], float] = time.perf_counter
        # The primary (always there while ready).
        self.primary: Any = None  # its Link
        self.primary_conv: Conversation | None = None
        self.primary_answers: Answers | None = None
        self.write_primary: Callable[[bytes], object] | None = None
        self.primary_prepared: dict[bytes, int] = {}  # names held there -> what they do
        self.primary_inflight = False
        self.routing: Any = None  # the session's SessionRouting
        self.router: Any = None
        # A replica, when reads may go to one (replica_ok).
        self.replica_ok = False
        self.link: Any = None  # its Link
        self.replica: Any = None  # its ReplicaState
        self.answers: Answers | None = None
        self.unit: Unit | None = None  # a Unit to note on it
        self.conv: Conversation | None = None
        self.write_replica: Callable[[bytes], object] | None = None
        self.prepared_ok: dict[bytes, bool] = {}  # names held there, routed there before
        self.recheck_at = 0.0  # reads held on the primary: when to ask the session again
        self.write_client: Callable[[bytes], object] | None = None
        self.to_replicas = 0  # units the fast path sent (admin connections view)
        self.to_primary_count = 0
        self.inflight = b""  # the unit sent to the replica, until its answer
        self.sent = 0.0

    def remember(self, key: str, what: int) -> None:
        routes = self.routes
        if len(routes) >= MAX_ROUTES:
            routes.clear()
        if routes.get(key, 0) != REPLICA_READ:  # a read seen in a transaction stays one
            routes[key] = what

    def key(self, text: str) -> str | None:
        """The normalized text of a lone statement (the profiler's per-session memo)."""
        stmts = self.profiler.statements(self.info, text)
        if len(stmts) != 1:
            return None
        return stmts[0].normalized.text

    def query(self, data: bytes) -> bool:
        n = len(data)
        if not self.ready or n < 6:
            return False
        bound: bytes | None = None
        if data[0] == _QUERY:
            if length_at(data, 1) != n - 1 or n - 1 > self.max_message:
                return False
            key = self.key(data[5 : n - 1].decode("utf-8", "replace"))
            if key is None:
                return False
            what = self.routes.get(key, 0)
        else:
            bound = self.bound_statement(data)
            if bound is None:
                return False
            what = self.primary_prepared.get(bound, 0)
            if what == 0 and bound in self.prepared_ok:
                what = REPLICA_READ
        if what == 0:
            return False
        if what == REPLICA_READ:
            go = self.replica_go()
            if not self.ready:  # a refresh found the session busy after all
                return False
            if go:
                if bound is not None and bound not in self.prepared_ok:
                    return False  # the general path prepares it on the replica first
                return self.to_replica(data, bound)
        if bound is not None and bound not in self.primary_prepared:
            return False  # prepared on the replica only: the general path replays it
        return self.to_primary(data, what)

    def replica_go(self) -> bool:
        """May this read go to the replica now? (The primary is idle outside a block.)"""
        conv = self.primary_conv
        if conv is None or conv.tx_status != _IDLE:
            return False
        if not self.replica_ok:
            now = self.clock()
            if now < self.recheck_at:
                return False
            self.recheck_at = now + RECHECK_S
            self.session.refresh_fast()  # has a replica caught up with our last write?
            if not self.ready or not self.replica_ok:
                return False
        replica = self.replica
        return self.write_replica is not None and bool(replica.healthy)

    def to_replica(self, data: bytes, bound: bytes | None) -> bool:
        write = self.write_replica
        assert write is not None
        self.ready = False
        now = self.clock()
        unit = self.unit
        answers = self.answers
        assert unit is not None and answers is not None
        unit.data = data
        unit.sent = now
        unit.has_query = bound is None
        unit.binds = [] if bound is None else [bound]
        self.link.unit = unit
        replica = self.replica
        replica.outstanding += 1
        replica.routed += 1
        answers.start_unit(True)
        self.inflight = data
        self.sent = now
        self.to_replicas += 1
        write(data)
        return True

    def to_primary(self, data: bytes, what: int) -> bool:
        write = self.write_primary
        conv = self.primary_conv
        if write is None or conv is None:
            return False
        self.ready = False
        conv.feed_frontend(data, self.clock())
        self.session.tx_link = self.primary
        self.router.primary_routed += 1
        if what == WRITES:
            self.routing.dirty = True  # its horizon is set when the primary is idle again
        self.primary_inflight = True
        self.to_primary_count += 1
        write(data)
        return True

    def bound_statement(self, data: bytes) -> bytes | None:
        """The statement of a whole extended-protocol unit that only binds and executes one
        named statement (Bind, Describe of the portal, Execute, Sync — what a driver sends
        for a prepared statement): a unit ``frame_unit`` frames, without a Parse."""
        f = self.frame
        if not frame_unit(data, self.max_message, self.max_obj, f) or f.pstart >= 0 \
                or f.bstop <= f.bstart:
            return None
        return data[f.bstart : f.bstop]

    def answer(self, data: bytes) -> bool:
        """The replica's answer to the unit sent there."""
        inflight = self.inflight
        if not inflight:
            return False
        answers = self.answers
        assert answers is not None
        hold = answers.hold
        if hold is None or len(hold) or len(answers.buf) or answers.swallow \
                or not whole_answer(data):
            return False
        conv = self.conv
        assert conv is not None
        session = self.session
        conv.feed_frontend(inflight, self.sent)
        write = self.write_client
        if write is not None:
            write(data)
        conv.feed_backend(data, self.clock())
        self.inflight = b""
        self.replica.outstanding -= 1
        self.link.unit = None
        answers.end_unit()
        if self.touched:
            session.backend_done(self.link)  # the general path ran meanwhile: let it go on
        else:
            self.ready = True
        return True

    def primary_answer(self, data: bytes) -> bool:
        """The primary's answer to the unit sent there: it streams (nothing is retried)."""
        if not self.primary_inflight:
            return False
        answers = self.primary_answers
        assert answers is not None
        if answers.swallow or answers.strip or len(answers.buf):
            return False
        conv = self.primary_conv
        assert conv is not None
        session = self.session
        write = self.write_client
        if write is not None:
            write(data)
        conv.feed_backend(data, self.clock())
        if conv.busy:
            return True  # more of the answer to come
        self.primary_inflight = False
        if self.touched or (conv.tx_status == _IDLE and self.routing.dirty):
            session.backend_done(self.primary)  # bookkeeping: the horizon of a write, and more
        else:
            self.ready = True
        return True

    def step_aside(self) -> None:
        """The general path takes over (it saw bytes of either side)."""
        self.ready = False
        self.touched = True
        self.inflight = b""  # an answer still to come is the general path's now
        self.primary_inflight = False


class RoutedClientPump(StandIn):
    """The client transport's protocol of a routed session: the fast path first, else the
    session (``owner``), which also hears of everything else on the connection."""

    def __init__(self, owner: Any, fast: FastRoutes) -> None:
        super().__init__(owner)
        self.fast = fast

    def data_received(self, data: bytes) -> None:
        fast = self.fast
        if fast.ready:
            try:
                if fast.query(data):
                    return
            except ProtocolViolation as exc:
                self.owner.fail(exc)
                return
        fast.step_aside()
        self.owner.data_received(data)


class RoutedLinkPump(StandIn):
    """A backend transport's protocol once ready: its answer to the fast path's unit goes
    straight to the client, anything else to the session (``owner`` is the link's own
    protocol: a replica's ReplicaConnection, the primary's BackendConnection)."""

    def __init__(self, owner: Any, fast: FastRoutes, link: Any) -> None:
        super().__init__(owner)
        self.fast = fast
        self.link = link

    def data_received(self, data: bytes) -> None:
        fast = self.fast
        link = self.link
        if link is fast.primary:
            if fast.primary_answer(data):
                return
            fast.step_aside()
        elif link is fast.link:
            if fast.answer(data):
                return
            fast.step_aside()
        self.owner.data_received(data)
