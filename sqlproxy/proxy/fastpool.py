"""The pooled session's hot path, in native code (compiled with mypyc, see setup.py).

A pooled session (``pooled.py``) handles everything in general, correctly, and in Python: it
frames every client message, cuts units, checks what pins, replays settings and prepared
statements on the server it borrows, swallows the answers to what it injected. Most of an
application's traffic is simpler than that, and this module serves it without a Python frame:

* ``PooledClientPump`` (the client transport's protocol) offers each chunk to
  ``PoolFast.client``: one whole simple Query, or one whole extended-protocol unit (an unnamed
  Parse or a Bind of a statement the server holds as the client prepared it, Describe of the
  portal, Execute, Sync), from a session with nothing queued, not waiting, not pinned, whose
  text is known not to pin (or has none of the words that could). It goes, as received, to the
  server the session holds, or to the most recently used idle server of the pool, checked out
  by the pool's compiled rules (``pool/state.py``) — unless that server needs settings or
  statements replayed first, which is the general path's job.
* ``PooledServerPump`` (a pooled server transport's protocol) offers each chunk to its
  holder's ``PoolFast.answer``: with nothing to swallow or strip it goes to the client as
  received, the client's conversation tracks it, and when ReadyForQuery says idle and nothing
  is owed the server goes back to the pool (``checkin``), the next waiter getting it at once.
* ``recorder.PooledRecorder`` / ``PooledListener`` hear the client's conversation: statements
  are recorded in native code; only DEALLOCATE / DISCARD (which change what the servers hold)
  go to the session.
* With replica routing (``routed_unit``, ``replica_answer``): a unit of one statement the
  general path learnt (``poolroute.learn``) to be a read a replica may serve goes, from an
  idle session, to an idle server of the replica pool ``poolroute.choose_for_fast`` chose,
  and its answer, when it comes whole and error-free, to the client as received; statements
  of no effect on routing go to the primary's pool as above. The general path takes over
  anything else, the replica unit in flight included (``PooledSession.replica_unit``).

Anything else is declined (``False``) and goes to the session's general path, which sees
exactly what it would have seen without this module. The fast path keeps the general path's
bookkeeping (which server holds which of the client's statements) as the general path would.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

from mypy_extensions import i64

from sqlproxy.analysis.profiler import Profiler
from sqlproxy.analysis.statement import SessionInfo
from sqlproxy.errors import ProtocolViolation
from sqlproxy.pool.state import Handoff, Pool, ServerInfo, Waiter, _Open
from sqlproxy.proxy.direct import DirectSocket
from sqlproxy.proxy.fastroute import (
    MAX_ROUTES,
    NEUTRAL,
    REPLICA_READ,
    whole_answer,
)
from sqlproxy.proxy.pinscan import (
    UnitFrame,
    digit_run,
    frame_unit,
    in_name,
    may_forget,
    may_pin,
    same_but_digits,
    scan_pin,
)
from sqlproxy.proxy.pump import POLL_CLOCK, Batch
from sqlproxy.routing.answers import Answers
from sqlproxy.routing.units import UnitCutter
from sqlproxy.wire.conversation import Conversation
from sqlproxy.wire.requests import DigitShape
from sqlproxy.wire.scan import decode_text, find_nul, length_at, same_at

try:
    from sqlproxy.proxy import _sockio
except ImportError:  # pragma: no cover - built with the package
    _sockio = None  # type: ignore[assignment]

__all__ = ["PoolFast", "PooledClientPump", "PooledServerPump", "may_forget", "may_pin"]

_QUERY: Final = 81  # 'Q'
_PARSE: Final = 80  # 'P'
_BIND: Final = 66  # 'B'
_IDLE: Final = 73  # 'I'

# Whether the conversation's clock (perf_counter) is the pool's (monotonic), as on Linux: one
# reading then serves both, per chunk.
_ONE_CLOCK: Final = (time.get_clock_info("perf_counter").implementation
                     == time.get_clock_info("monotonic").implementation)


class PoolFast:
    """One pooled session's fast path and the state it shares with the general path: the
    server it holds, whether it waits for one, whether a unit is open past a Flush, why it is
    pinned (``PooledSession`` reads and writes these through properties)."""

    def __init__(self, session: Any, max_message: int, limit: int) -> None:
        self.session = session
        self.max_message = max_message
        self.max_message_obj: Any = max_message  # (passed to C as it is: not boxed anew)
        self.limit = limit  # pool.max_prepared_per_server
        self.held: Any = None  # the ServerConn lent to the session
        self.held_pump: PooledServerPump | None = None  # its pump (set with ``held``)
        self.waiting = False  # queued for a server
        self.open_unit = False  # a unit ended by Flush: the server stays until Sync
        self.pinned: str | None = None
        self.enabled = False  # set once the session is ready
        # Set when the session is ready (``attach``).
        self.pool: Any = None  # PoolIO
        self.state: Pool[Any, Any] | None = None
        self.conv: Conversation | None = None
        self.info: SessionInfo | None = None
        self.units: Any = None  # the session's deque of queued units
        self.cutter: UnitCutter | None = None
        self.frames: Any = None  # its Frames
        self.frames_buf = bytearray()  # their buffer (never replaced): what they hold
        self.statements: dict[bytes, tuple[str, bytes]] = {}  # its Replay.statements
        self.settings: dict[str, str] = {}  # its startup settings
        self.clean_texts: set[str] = set()  # the manager's texts known not to pin
        self.clean_shapes: set[str] = set()  # its normalized statements known not to pin
        self.profiler: Profiler | None = None
        self.client_transport: Any = None
        self.client_pump: PooledClientPump | None = None  # writes to the client (``send``)
        self.parses_sent: list[bytes] = []  # the session's Parse messages awaiting answers
        self.clock: Callable[[], float] = time.perf_counter
        self.monotonic: Callable[[], float] = time.monotonic
        # The last unnamed Parse seen and its text (drivers send the same one again and again).
        self.last_parse = b""
        self.last_text = ""
        # ... and the session's record of it (``statements[b""]``), one tuple while it is sent
        # again and again.
        # (Typed Any: a tuple-typed attribute is kept unboxed, and boxed anew at every read.)
        self.last_entry: Any = ("", b"")
        # The last simple Query scanned clean, around its last number (``client``), and
        # whether DEALLOCATE / DISCARD were looked for too.
        # (Its prefix and suffix, a ``DigitShape``: the profiler is handed it, ``u_shape``.)
        self.q_memo = False
        self.q_shape = DigitShape(b"", b"")
        self.q_forget = False
        self.fast_units = 0  # units the fast path sent (connections view)
        self.to_replicas = 0  # of which to a replica (routed)
        # The unit ``client`` scanned: its first message type, its text, its unnamed Parse,
        # the named statement it binds.
        self.u_kind: i64 = 0
        self.u_text = ""
        # A Query of ``q_shape``, and its digits' value key (``same_but_digits``).
        self.u_shape: DigitShape | None = None
        self.u_value: object = None
        self.u_parse = b""
        self.u_bound = b""
        # ... and where an extended unit's messages are (``unit_sent``).
        self.frame = UnitFrame()
        self.parked = b""  # a unit waiting for a server (``waiting``)
        # Its place in a pool's queue, reused each time it waits there.
        self.waiter: Waiter[Any] = Waiter(session, 0.0, tag=self)
        # Replica routing (``routed``: see ``routed_unit``). What each lone statement does
        # (fastroute's REPLICA_READ / NEUTRAL / WRITES by normalized text, learnt by the
        # general path: ``poolroute.learn``), the routes of the last Query shape and unnamed
        # Parse scanned, the replica unit in flight (its answer awaited: ``r_*``, see
        # ``PooledSession.replica_unit``) and the replica pool reads go to, chosen a moment
        # ago (``c_*``, by ``poolroute.choose_for_fast`` through ``choose``).
        self.routed = False
        self.routing: Any = None  # the session's SessionRouting
        self.router: Any = None
        self.recorder: Any = None  # its PooledRecorder (told the route of what it records)
        self.choose: Callable[[float], None] | None = None
        self.routes: dict[str, int] = {}
        self.functions: Any = None  # the function policy the routes were learnt under
        self.q_route: i64 = 0  # the route of the Query shape ``q_memo`` holds (0: unknown)
        self.q_route_ok = False  # its number is a literal of its own (not part of a name)
        self.p_route: i64 = 0  # the route of ``last_parse``
        self.r_data = b""
        self.r_sent = 0.0
        self.r_rep: Any = None  # the ReplicaState it runs on
        self.c_until = 0.0
        self.c_horizon: i64 = 0
        self.c_decline = True  # reads are the general path's for now (e.g. table mode)
        self.c_pool: Any = None  # the PoolIO of the replica chosen (None: the primary)
        self.c_rep: Any = None

    def attach(self, pool: Any, conv: Conversation, info: SessionInfo, units: Any,
               cutter: UnitCutter, frames: Any, statements: dict[bytes, tuple[str, bytes]],
               settings: dict[str, str], clean_texts: set[str], clean_shapes: set[str],
               profiler: Profiler | None, client_transport: Any,
               parses_sent: list[bytes]) -> None:
        self.pool = pool
        self.state = pool.state
        self.conv = conv
        self.info = info
        self.units = units
        self.cutter = cutter
        self.frames = frames
        self.frames_buf = frames.buf
        self.statements = statements
        self.settings = settings
        self.clean_texts = clean_texts
        self.clean_shapes = clean_shapes
        self.profiler = profiler
        self.client_transport = client_transport
        self.parses_sent = parses_sent
        self.enabled = True

    # ------------------------------------------------------------------ client side
    def _clean(self, text: str) -> bool:
        """``text`` is known not to pin, holds none of the words that could, or (profiled)
        each of its statements is known by its normalized text not to pin; and it is no
        DEALLOCATE of a statement the general path may have to prepare first."""
        if self.statements and may_forget(text):
            return False
        if text in self.clean_texts or not may_pin(text):
            return True
        profiler = self.profiler
        if profiler is None:
            return False
        info = self.info
        assert info is not None
        shapes = self.clean_shapes
        return all(st.normalized.text in shapes for st in profiler.statements(info, text))

    # ------------------------------------------------------------------ routing
    def key(self, text: str) -> str | None:
        """The normalized text of a lone statement (the profiler's per-session memo)."""
        profiler = self.profiler
        info = self.info
        if profiler is None or info is None:
            return None
        stmts = profiler.statements(info, text)
        if len(stmts) != 1:
            return None
        return stmts[0].normalized.text

    def route_of(self, text: str) -> i64:
        """What the lone statement ``text`` does, as the general path learnt it (0: not
        known, or not a lone statement)."""
        key = self.key(text)
        if key is None:
            return 0
        return self.routes.get(key, 0)

    def remember(self, key: str, what: int) -> None:
        routes = self.routes
        if len(routes) >= MAX_ROUTES:
            self.forget_routes()
        elif routes.get(key, what) != what:  # (cannot happen under one function policy)
            self.q_route = 0
            self.p_route = 0
        routes[key] = what

    def forget_routes(self) -> None:
        self.routes.clear()
        self.q_route = 0
        self.p_route = 0

    def routed_unit(self, data: bytes, route: i64, now: float) -> bool:
        """A routed session's unit (``client`` scanned it; ``route``: what its statement
        does): a read a replica may serve goes to an idle server of the replica pool chosen
        (``c_*``), a statement of no effect on routing to the primary's. Anything else — a
        write, an unknown statement, a session inside a transaction or with a write whose
        horizon is not set yet, a replica pool with no idle server — is the general path's
        (``poolroute``), which also learns the routes."""
        routing = self.routing
        if self.held is not None or routing.dirty or routing.pinned:
            return False
        if route == REPLICA_READ:
            session = self.session
            if session.retry_unit is not None or session.scram_pending:
                return False
            rep = self.c_rep
            if now >= self.c_until or routing.horizon != self.c_horizon \
                    or (rep is not None and not rep.healthy):
                choose = self.choose
                assert choose is not None
                choose(now)
            if self.c_decline:
                return False
            pool = self.c_pool
            if pool is not None:
                state: Pool[Any, Any] = pool.state
                idle = state.idle
                if state.waiters or not (idle or state.total < state.limits.size):
                    # Every replica server is lent: not waited for, the primary serves it
                    # (as poolroute.replica_pool_for has it).
                    self.router.note_fallback()
                    return self.to_primary(data, now)
                if not idle:
                    return False  # the general path opens one
                pump: PooledServerPump = idle[len(idle) - 1].pump
                if not self.sendable(pump):
                    return False
                info = self.info
                assert info is not None
                got = state.checkout(self.session, now if _ONE_CLOCK else self.monotonic(),
                                     info.application_name)
                self.hold(got, pump)
                return self.send(pump, data, now, self.c_rep, checked=True)
            self.router.note_fallback()  # no replica (fresh enough): the primary serves it
        elif route != NEUTRAL:
            return False
        return self.to_primary(data, now)

    def client(self, data: bytes, now: float) -> bool:
        """Send ``data`` (a chunk from the client, read at ``now``; -1: read the clock) to a
        server, if it is a unit the fast path serves; False: the general path takes it
        (nothing was done)."""
        if not self.enabled or self.waiting or self.pinned is not None:
            return False
        n: i64 = len(data)
        cutter = self.cutter
        assert cutter is not None
        if n < 6 or len(self.units) or not cutter.empty or len(self.frames_buf):
            return False
        t: i64 = data[0]
        bound = b""  # a named statement the unit binds
        parse = b""  # an unnamed Parse message in the unit
        text = ""
        route: i64 = 0  # (routed) what its statement does, 0: unknown
        if t == _QUERY:
            if length_at(data, 1) != n - 1 or n - 1 > self.max_message or data[n - 1] != 0:
                return False
            forget = len(self.statements) > 0
            memo = True  # the text is of the shape q_memo holds
            value: object = None  # (object: the int or str as made, not unboxed)
            if self.q_memo and (self.q_forget or not forget):
                shape = self.q_shape
                value = same_but_digits(data, 5, n - 1, shape.prefix, shape.suffix)
            if value is not None:
                self.u_shape = self.q_shape
                self.u_value = value
            else:
                self.u_shape = None
                if scan_pin(data, 5, n - 1, forget):
                    text = data[5 : n - 1].decode("utf-8", "replace")
                    if not self._clean(text):
                        return False
                    memo = False
                else:
                    # Clean: the texts that differ from it only in its last number are too
                    # (no word of the scan has a digit in it).
                    i, j = digit_run(data, 5, n - 1)
                    self.q_memo = i >= 0
                    memo = i >= 0
                    if i >= 0:
                        self.q_shape = DigitShape(data[5:i], data[j : n - 1])
                        self.q_forget = forget
                        # Routed the same way too, when the number is a literal of its own
                        # (in "t1" or "$1" it is part of a name or a parameter).
                        self.q_route = 0
                        self.q_route_ok = (i == 5 or not in_name(data[i - 1])) \
                            and (j == n - 1 or not in_name(data[j]))
            if self.routed:
                if memo and self.q_route_ok and self.q_route != 0:
                    route = self.q_route
                else:
                    if not text:
                        text = data[5 : n - 1].decode("utf-8", "replace")
                    route = self.route_of(text)
                    if memo and self.q_route_ok:
                        self.q_route = route
        elif t in (_PARSE, _BIND):
            f = self.frame
            if not frame_unit(data, self.max_message, self.max_message_obj, f):
                return False
            pstart = f.pstart
            pend = f.pend
            bstart = f.bstart
            bstop = f.bstop
            if pstart >= 0:
                if bstop != bstart:
                    return False  # binds a named statement after an unnamed Parse
                parse = self.last_parse
                if len(parse) == pend - pstart and same_at(data, pstart, parse):
                    text = self.last_text  # (compared in place: no slice per unit)
                else:
                    parse = data[pstart:pend]
                    stop = find_nul(data, pstart + 6, pend)
                    text = decode_text(data, pstart + 6, stop)
                    if scan_pin(data, pstart + 6, stop, len(self.statements) > 0) \
                            and not self._clean(text):
                        return False
                    self.last_parse = parse
                    self.last_text = text
                    self.last_entry = (text, parse)
                    self.p_route = 0
                if self.routed:
                    route = self.p_route
                    if route == 0:
                        route = self.p_route = self.route_of(text)
            else:
                if bstop == bstart:
                    return False  # the unnamed statement from an earlier unit
                bound = data[bstart:bstop]
                if bound not in self.statements:
                    return False
                if self.routed:
                    route = self.route_of(self.statements[bound][0])
        else:
            return False
        self.u_kind = t
        self.u_text = text
        self.u_parse = parse
        self.u_bound = bound
        if now < 0.0:
            now = self.clock()
        if self.routed:
            return self.routed_unit(data, route, now)
        return self.to_primary(data, now)

    def to_primary(self, data: bytes, now: float) -> bool:
        """Send the unit ``data`` (scanned by ``client``) to the server held, or to one of
        the session's pool (parked in the queue when all are lent)."""
        server = self.held
        if server is None:
            state = self.state
            assert state is not None
            info = self.info
            assert info is not None
            mono = now if _ONE_CLOCK else self.monotonic()
            if not state.idle or state.waiters:
                if state.total < state.limits.size:
                    return False  # the general path opens a server (or waits)
                # Every server is lent: wait in the pool's queue with the unit parked here;
                # the server comes with a hand-over (``take``, or the session's ``granted``).
                # (``checkout`` would queue it too: no idle server to lend, no slot free.)
                w = self.waiter
                w.since = mono
                w.app = info.application_name
                state.queue(w)
                self.waiting = True
                self.parked = data
                return True
            got = state.checkout(self.session, mono, info.application_name)
            # (An idle server and no waiters: the checkout lends it, never OPEN or a wait.)
            assert got is not None and not isinstance(got, _Open)
            lent = state.lent_info
            assert lent is not None
            p = lent.pump  # (found once per server: an attribute of an interpreted object)
            if p is None:
                p = lent.pump = got.pump
            self.hold(got, p)
        pump = self.held_pump
        assert pump is not None
        return self.send(pump, data, now)

    def sendable(self, pump: PooledServerPump) -> bool:
        """Whether the unit ``client`` scanned (``u_*``) may go to ``pump``'s server as it
        is: nothing to replay there first (settings, statements), nothing owed."""
        if pump.transport is None or pump.closed or len(pump.to_close) or pump.answers.busy \
                or pump.answers.in_unit:
            return False  # the general path replays what is needed on the server it holds
        settings = pump.settings
        if settings is not self.settings:
            if settings != self.settings:
                return False
            pump.settings = self.settings  # equal: the next unit compares identities
        bound = self.u_bound
        if len(bound):
            want = self.statements[bound][1]
            have = pump.prepared.get(bound)
            if have is None or (have is not want and have != want):
                return False  # to be prepared there first
        return True

    def send(self, pump: PooledServerPump, data: bytes, now: float, rep: Any = None,
             checked: bool = False) -> bool:
        """Send the unit ``data`` (scanned by ``client``: ``u_*``, received at ``now``) to the
        server held now (``pump``'s), unless it needs settings or statements replayed there
        first (False; ``checked``: the caller asked ``sendable`` already). ``rep``: the server
        is that replica's (its answer awaited whole: ``answer``; the conversation sees the
        unit then, as ``poolroute._release`` has it)."""
        if not checked and not self.sendable(pump):
            return False
        prepared = pump.prepared
        bound = self.u_bound
        if rep is None:
            conv = self.conv
            assert conv is not None
            # A unit ``client`` read whole (a Query, or framed: one Bind, an Execute after)
            # goes first: the server starts on it while the conversation reads it.
            early = self.u_kind == _QUERY or self.frame.epos >= 0
            if early:
                pump.send(data)
            try:
                if self.u_kind == _QUERY:  # (``client`` checked the message)
                    conv.query_sent(data, now, self.u_shape, self.u_value)
                elif self.frame.epos >= 0:
                    f = self.frame
                    conv.unit_sent(data, now, self.u_text if len(self.u_parse) else None,
                                   f.bpos, f.bend, f.bstart - 1, f.bstop, f.epos, f.eend)
                else:
                    conv.feed_frontend(data, now)
            except ProtocolViolation as exc:
                self.session.fail(exc)
                return True
            if self.routed:
                self.router.note_primary_unit()
            if not early:
                pump.send(data)
        else:
            self.r_data = data
            self.r_sent = now
            self.r_rep = rep
            pump.answers.start_unit(True)
            rep.unit_started()
            self.to_replicas += 1
            pump.send(data)
        self.open_unit = False
        self.fast_units += 1
        # (``in`` and ``del`` rather than ``pop``: a method call costs a lookup by name.)
        if self.u_kind == _QUERY:  # a simple Query drops the unnamed statement
            statements = self.statements
            if statements and b"" in statements:
                del statements[b""]
            if prepared and b"" in prepared:
                del prepared[b""]
        elif len(self.u_parse):  # (the last Parse: ``client``)
            # Set only when not what they hold already (a lookup costs less than a store).
            entry = self.last_entry
            statements = self.statements
            if statements.get(b"") is not entry:
                statements[b""] = entry
            # Another session's equal Parse (the server was theirs a moment ago) stays: a
            # compare of the bytes costs less than a store (the replay compares by value).
            parse = self.u_parse
            have = prepared.get(b"")
            if have is not parse and (have is None or have != parse):
                prepared[b""] = parse
        else:  # most recently used last (BackendReplay.bound)
            msg = prepared[bound]
            del prepared[bound]
            prepared[bound] = msg
            if len(prepared) - len(pump.to_close) > self.limit:
                pump.replay.bound((), self.limit)
        return True

    def send_parked(self, now: float = -1.0) -> bool:
        """The server for the parked unit has come (held now): send it (at ``now``, the
        conversation's clock; -1: read it). False: the general path must (``take_parked``
        gives it the unit)."""
        data = self.parked
        if len(data) == 0:
            return True
        pump = self.held_pump
        if pump is not None and self.send(pump, data, self.clock() if now < 0 else now):
            self.parked = b""
            return True
        return False

    def take_parked(self) -> bytes:
        data = self.parked
        self.parked = b""
        return data

    def hold(self, server: Any, pump: PooledServerPump | None = None) -> None:
        """``server`` (its pump, if at hand) is lent to this session (ServerConn.holder,
        without its setter)."""
        p: PooledServerPump = server.pump if pump is None else pump
        p.holder = self.session
        p.fast = self
        self.held = server
        self.held_pump = p

    def take(self, server: Any, pump: PooledServerPump, now: float) -> None:
        """A hand-over: ``server`` (``pump``'s) is this waiting session's now; its parked unit
        goes (at ``now``, the conversation's clock)."""
        self.waiting = False
        self.hold(server, pump)
        if not self.send_parked(now):
            self.session.unpark()

    # ------------------------------------------------------------------ server side
    def answer(self, pump: PooledServerPump, data: bytes, now: float,
               batch: Batch | None = None) -> bool:
        """A chunk from ``pump``'s server (the one this session holds), read at ``now`` (-1:
        read the clock): to the client as received when nothing of it is to be swallowed or
        stripped; the server goes back when idle. ``batch``: the poller's batch it was read
        in (None: read through the transport), whose end its statement's record waits for."""
        if pump is not self.held_pump or not self.enabled:
            return False
        answers = pump.answers
        if answers.swallow or answers.strip or len(answers.buf) or len(self.parses_sent):
            return False
        if answers.in_unit:
            return self.replica_answer(pump, data, now)
        if self.routed and self.routing.dirty:
            return False  # the general path sets the read-your-writes horizon (after_primary)
        conv = self.conv
        assert conv is not None
        client = self.client_pump
        assert client is not None
        if now < 0.0:
            now = self.clock()
        conv.feed_backend(data, now, True)  # (a SELECT recorded later: ``record_held``)
        # Its record waits for the end of the poller's batch (``batch``), else for this
        # answer to be sent on.
        later = False
        if batch is not None and conv.h_entry is not None:
            batch.held.append(conv)
            later = True
        try:
            if conv.busy or conv.tx_status != _IDLE or self.open_unit \
                    or self.pinned is not None or len(self.units):
                client.send(data)
                return True
            # The server goes back (to the next waiter, whose unit goes at once), and the
            # answer to the client, before the statement is recorded: neither waits for it.
            self.checkin(pump, now if _ONE_CLOCK else self.monotonic())
            client.send(data)
        finally:
            if not later:
                conv.record_held()
        return True

    def replica_answer(self, pump: PooledServerPump, data: bytes, now: float) -> bool:
        """The answer to the replica unit the fast path sent (``r_data``): when ``data`` is
        all of it with no error in it, nothing can make the unit retry on the primary, so the
        conversation sees the unit and its answer (recorded under the replica's name), the
        client gets it as it came, and the server goes back to its pool. Else the general
        path takes it over (``PooledSession.replica_unit``: it needs no more than that)."""
        unit = self.r_data
        answers = pump.answers
        hold = answers.hold
        if not unit or hold is None or len(hold) or not whole_answer(data):
            return False
        answers.end_unit()
        self.r_data = b""
        rep = self.r_rep
        self.r_rep = None
        conv = self.conv
        assert conv is not None
        client = self.client_pump
        assert client is not None
        try:
            conv.feed_frontend(unit, self.r_sent)
        except ProtocolViolation as exc:  # (scanned whole by ``client``: cannot happen)
            rep.unit_finished()
            self.session.fail(exc)
            return True
        client.send(data)
        if now < 0.0:
            now = self.clock()
        recorder = self.recorder
        if recorder is not None:
            recorder.route = rep.name
            conv.feed_backend(data, now)
            recorder.route = "primary"
        else:
            conv.feed_backend(data, now)
        rep.unit_finished()
        if conv.busy or conv.tx_status != _IDLE or self.open_unit:
            return True  # (as PooledSession.replica_done: the general path's from here)
        self.checkin(pump, now if _ONE_CLOCK else self.monotonic())
        return True

    def checkin(self, pump: PooledServerPump, now: float) -> None:
        """Give the server held (``pump``'s) back (clean: idle, nothing owed) at ``now``
        (monotonic); the next waiter gets it."""
        server = self.held
        self.held = None
        self.held_pump = None
        session = self.session
        pump.holder = None  # (ServerConn.holder, without its interpreted setter)
        pump.fast = None
        if pump.paused:  # the client's backpressure: its next borrower must hear it
            session.resume_server()
        pool = pump.pool  # the session's, or a replica's (routing)
        # (A transport closing without ``closed`` yet is lost a moment later: the pool then
        # forgets the server, as it does an idle one the server closes.)
        if pump.cancels or pump.closed or pump.transport is None:
            pool.checkin(session, server, True)  # the general rules (cancel, closed)
            return
        state = pump.pool_state
        info = pump.pool_info  # the pool's record of this server, kept at hand
        if info is None or info.gone:
            info = pump.pool_info = state.servers.get(server)
        w = state.hand_on(server, info, now, session)
        if w is None:
            return  # idle now
        if w is state.slow:
            handoffs, close = state.checkin(server, now, session)
            if close:
                server.close()
            pool.carry_out(handoffs)
            return
        # The common hand-over: a waiting session with a parked unit gets this server.
        tag = w.tag
        fast: PoolFast = tag if isinstance(tag, PoolFast) else w.client.fast
        if fast.enabled and len(fast.parked) and not len(fast.units):
            fast.take(server, pump, now if _ONE_CLOCK else self.clock())
        else:
            pool.carry_out([Handoff(w.client, server, now - w.since)])


class PooledClientPump(DirectSocket):
    """The client transport's protocol of a ready pooled session: the fast path first, else
    the session (``owner``), which also hears of everything else on the connection."""

    def __init__(self, owner: Any, fast: PoolFast, transport: Any) -> None:
        super().__init__(owner)
        self.fast = fast
        self.transport = transport
        # Chunks served through the transport before the socket is read directly (-1:
        # never): a connection that comes for one transaction and goes (pgbench -C, a client
        # without a pool) would pay more to set the direct relay up than it saves.
        self.direct_after: i64 = -1

    def data_received(self, data: bytes) -> None:
        if not self.fast.client(data, -1.0):
            self.owner.data_received(data)
        if self.direct_after > 0:
            self.count_down()

    def received(self, data: bytes, now: float) -> None:
        # Read directly (``direct_after`` is spent): the poller's time is the chunk's.
        if not self.fast.client(data, now if POLL_CLOCK else -1.0):
            self.owner.data_received(data)

    def count_down(self) -> None:
        self.direct_after -= 1
        if self.direct_after:
            return
        t = self.transport
        if t.is_closing() or self.paused:
            return
        if t.get_write_buffer_size():
            self.direct_after = 1  # once the transport has written what it holds
            return
        try:
            self.start_direct(self.owner.loop)
        except Exception as exc:  # e.g. out of descriptors: the transport carries on
            self.owner.direct_relay_failed(exc)


class PooledServerPump(DirectSocket):
    """A pooled server transport's protocol once logged in: its holder's fast path first,
    else the server connection's own protocol (``owner``, a ServerConn). ``fast`` follows the
    holder (set by ``ServerConn.holder``). It keeps, as native attributes, the server
    connection's fields that the fast path reads on every unit (``ServerConn`` exposes them
    as properties): an attribute of an interpreted object costs a dictionary lookup or two
    each time."""

    def __init__(self, owner: Any, answers: Answers, replay: Any) -> None:
        super().__init__(owner)
        self.fast: PoolFast | None = None
        self.holder: Any = None  # the PooledSession the server is lent to
        self.answers = answers
        self.replay: Any = replay  # its BackendReplay, and two of its fields (never replaced)
        self.prepared: dict[bytes, bytes] = replay.prepared
        self.to_close: set[bytes] = replay.to_close
        self.settings: dict[str, str] = {}  # startup parameters in force (replaced, not changed)
        self.pool: Any = owner.pool  # its PoolIO, and the PoolIO's state (never replaced)
        self.pool_state: Pool[Any, Any] = owner.pool.state
        self.pool_info: ServerInfo | None = None  # its ServerInfo there (``checkin``)
        self.closed = False
        self.cancels = 0  # cancel requests on their way

    def data_received(self, data: bytes) -> None:
        fast = self.fast
        if fast is not None and fast.answer(self, data, -1.0):
            return
        self.owner.data_received(data)

    def received(self, data: bytes, now: float) -> None:
        fast = self.fast
        if fast is not None and fast.answer(self, data, now if POLL_CLOCK else -1.0,
                                            self.batch):
            return
        self.owner.data_received(data)
