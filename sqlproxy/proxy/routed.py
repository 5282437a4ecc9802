"""A client session whose read-only units may run on read replicas.

Only used when ``routing.enabled`` and replicas are configured (the server picks the session
class once at startup): the plain ``ClientSession`` hot path stays untouched.

How it works
------------
Startup and authentication are the plain session's: the client authenticates against the
primary. After that, the client's bytes are cut into *units* (``routing.units``) and each unit
is routed as a whole by ``routing.policy.decide`` when nothing is in flight. Units pipelined
behind a unit running on the primary follow it there; a unit on a replica runs alone, so its
responses can be held back and, if the replica proves it could not run it (read-only
transaction, recovery conflict, shutdown, lost connection), thrown away and the unit retried on
the primary before the client has seen any of it.

Each backend (a *link*) has its own ``Conversation`` for statistics and transaction status.
Before a unit is sent to a link, what the session built elsewhere is replayed there as extra
units whose responses are swallowed (``routing.replay``); what comes back is sorted into the
client's, the swallowed and the held by ``routing.answers``.

Replica connections are opened lazily as the client's user and database and logged in by
``routing.replica_login`` (SCRAM keys recovered from the client's exchange with the primary,
observed during startup only, see ``routing.scram``; otherwise ``routing.passwords``). When
none works, the session's reads stay on the primary (warned once).

This module is the orchestration: the parts it uses are sans-IO and tested on their own.

Read-your-writes: after a unit that may write completes on the primary (outside a transaction
block), the session's reads stay on the primary until a replica has replayed past the primary's
WAL position read after the write (see ``routing.health``). With ``read_your_writes = "table"``
the tables written are noted in the router too, and any session's read of such a table waits
for a replica that has replayed past it (see ``routing.tables``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Any, cast

from sqlproxy.analysis.classify import Shape, StatementKind
from sqlproxy.analysis.normalize import Normalized
from sqlproxy.analysis.statement import Statement
from sqlproxy.errors import ConnectionFailure, ProtocolViolation, ProxyError
from sqlproxy.logs import get_logger
from sqlproxy.proxy.fastroute import (
    NEUTRAL,
    REPLICA_READ,
    WRITES,
    FastRoutes,
    RoutedClientPump,
    RoutedLinkPump,
)
from sqlproxy.proxy.links import Link, open_replica
from sqlproxy.proxy.recorder import RoutedRecorder
from sqlproxy.proxy.session import (
    BackendConnection,
    ClientSession,
    SessionState,
)
from sqlproxy.routing.answers import (
    DROP_CONNECTION,
    REPLICA_DOWN,
    Event,
    Kind,
    should_retry,
)
from sqlproxy.routing.health import ReplicaState, Router
from sqlproxy.routing.policy import Decision, RoutedStatement, Target
from sqlproxy.routing.replay import SESSION_TAGS, Replay
from sqlproxy.routing.replica_login import ReplicaLogin
from sqlproxy.routing.scram import ScramKeys, ScramWatch
from sqlproxy.routing.session_routing import SessionRouting
from sqlproxy.routing.units import Unit, UnitCutter
from sqlproxy.wire.conversation import Conversation, ConversationListener, Pending
from sqlproxy.wire.frames import Frames
from sqlproxy.wire.messages import (
    F_COPY_DATA,
    F_COPY_DONE,
    F_COPY_FAIL,
    F_FLUSH,
    F_SYNC,
    F_TERMINATE,
    SYNC,
    TERMINATE,
    error_summary,
)

if TYPE_CHECKING:
    from sqlproxy.proxy.server import ProxyServer

log = get_logger("sqlproxy.routing")
_perf = time.perf_counter

_IDLE = 73  # 'I'
#: A replica login that failed for one of these reasons will not work for this session.
_AUTH_PROBLEMS = ("password", "authentication", "28P01", "28000")
_COPY_MESSAGES = frozenset({F_COPY_DATA, F_COPY_DONE, F_COPY_FAIL})


class RoutedSession(ClientSession):
    """A ClientSession that routes units between the primary and the replicas."""

    def __init__(self, server: ProxyServer) -> None:
        super().__init__(server)
        router = server.router
        assert router is not None
        self.router: Router = router
        self.primary_link: Link | None = None
        self.links: dict[str, Link] = {}  # replica name -> link
        self.frames = Frames(self.config.proxy.max_message_bytes)
        self.cutter = UnitCutter()
        self.units: deque[Unit] = deque()
        self.open_link: Link | None = None  # a unit ended by Flush continues there
        self.tx_link: Link | None = None  # where the last unit ran (its transaction)
        self.replay = Replay()  # settings and named statements, replayed on other links
        self.routing = SessionRouting(router.table_mode)  # pins, writes, horizon
        self.unit_failed = False  # a statement of the transaction in progress failed
        self.connecting: str | None = None
        self._current = "primary"
        # The fast path (fastroute.py): profiled sessions, read_your_writes = "session".
        self.fast: FastRoutes | None = None
        self._fast_functions: object = None
        self.scram = ScramWatch()  # the client's exchange with the primary, for replicas

    # ------------------------------------------------------------------ authentication
    def _server_auth_message(self, code: int, body: bytes) -> None:
        self.scram.server_message(code, body)

    def _client_auth_message(self, body: bytes) -> None:
        self.scram.client_message(body)

    async def _replica_keys(self) -> ScramKeys | None:
        """The client's SCRAM keys, recovered once per session from its exchange."""
        capture = self.scram.complete
        if self.scram.keys is None and capture is not None:
            self.scram.recovered(await self.router.scram_keys(self.user, capture))
        return self.scram.keys

    # ------------------------------------------------------------------ startup hand-over
    def _go_hot(self, backend: BackendConnection, rest: bytes) -> None:
        # Like the plain session, except that the primary's bytes keep coming through
        # backend_startup_data (the backend is never put on its own hot path).
        self._cancel_startup_timer()
        self.ready_at = _perf()
        conv = self._conversation("primary")
        self.conv = self.info.conv = conv
        link = Link("primary", conv, None)
        link.transport = backend.transport
        link.address = backend.address
        link.key = backend.key
        self.primary_link = link
        self.state = SessionState.READY
        self._buf.clear()
        self.router.functions(self.database)
        client = self.client_transport
        if self.profiler is not None and not self.router.table_mode and client is not None:
            fast = self.fast = FastRoutes(self, self.profiler, self.info,
                                          self.config.proxy.max_message_bytes)
            fast.write_client = client.write
            # Duck-typed protocols: asyncio and uvloop call their methods by name.
            client.set_protocol(cast(Any, RoutedClientPump(self, fast)))
            if backend.transport is not None:
                link.pump = RoutedLinkPump(backend, fast, link)
                backend.transport.set_protocol(cast(Any, link.pump))
        if rest:
            self.link_data(link, rest)

    def _conversation(self, route: str) -> Conversation:
        """A backend link's tracker. Profiled, its listener is a compiled recorder that
        records with the link's name as route and calls ``statement_event`` only for what
        changes the replay (SET, ROLLBACK, errors, ...); else the session listens."""
        profiler = self.profiler
        listener: ConversationListener = (
            self if profiler is None else RoutedRecorder(profiler, self, self.info, route))
        return Conversation(listener, self.config.proxy.max_message_bytes)

    def backend_startup_data(self, backend: BackendConnection, data: bytes) -> None:
        if self.primary_link is not None:
            self.link_data(self.primary_link, data)
        else:
            super().backend_startup_data(backend, data)

    # ------------------------------------------------------------------ client side
    def data_received(self, data: bytes) -> None:
        if self.state is not SessionState.READY:
            super().data_received(data)
            return
        try:
            for t, msg in self.frames.feed(data):
                self._client_message(t, msg)
        except ProtocolViolation as exc:
            self.fail(exc)
            return
        self._pump()

    def _learn(self, unit: Unit, decision: Decision, neutral_view: bool) -> None:
        """Remember what a lone statement does, for the fast path (``fastroute.py``): a read
        a replica may serve (decided from an idle, unpinned session's view), a statement
        with no effect on routing, or a write. Pins are never remembered."""
        fast = self.fast
        if fast is None or decision.pin or unit.closes or unit.unknown or unit.describe_only:
            return
        if unit.has_query:
            if len(unit.queries) != 1 or unit.parses or unit.binds:
                return
            sql = unit.queries[0]
        else:  # one statement bound (maybe parsed in the same unit)
            if len(unit.binds) != 1 or len(unit.parses) > 1 or not unit.binds[0]:
                return
            if unit.parses:
                name, sql, _ = unit.parses[0]
                if name != unit.binds[0]:
                    return
            else:
                known = self.replay.statements.get(unit.binds[0])
                if known is None:
                    return
                sql = known[0]
        functions = self.router.functions(self.database)
        if functions is not self._fast_functions:  # a reloaded catalog: decide again
            fast.routes.clear()
            self._fast_functions = functions
        key = fast.key(sql)
        if key is None:
            return
        if decision.writes:
            what = WRITES
        elif neutral_view and decision.target is Target.REPLICA \
                and not decision.read_only_transaction:
            what = REPLICA_READ
        else:
            what = NEUTRAL
        fast.remember(key, what)

    def _refresh_fast(self) -> None:
        """Let the fast path take the next unit when nothing the general path keeps could
        change where it goes or what must precede it (see ``fastroute.py``)."""
        fast = self.fast
        if fast is None:
            return
        fast.ready = False
        fast.inflight = b""
        fast.primary_inflight = False
        if self.state is not SessionState.READY or self.units or self.open_link is not None \
                or self.connecting is not None or len(self.frames) or not self.cutter.empty \
                or self.unit_failed or self.replay.pending_settings or not fast.routes:
            return
        router = self.router
        routing = self.routing
        primary = self.primary_link
        if primary is None or primary.busy or not primary.usable or primary.pump is None \
                or router.functions(self.database) is not self._fast_functions:
            return
        tx = self.tx_link
        if tx is not None and tx is not primary and tx.conv.tx_status != _IDLE:
            return  # a read-only transaction on a replica: the general path's
        if any(lk.busy for lk in self.links.values()):
            return
        replay = self.replay
        if b"" in replay.statements or b"" in primary.replay.prepared:
            return
        fast.primary = primary
        fast.primary_conv = primary.conv
        fast.primary_answers = primary.answers
        fast.write_primary = primary.transport.write  # type: ignore[union-attr]
        fast.routing = routing
        fast.router = router
        fast.primary_prepared = self._prepared_on(primary, fast)
        replica_ok = self._fast_replica(fast)
        if replica_ok is None:
            return  # a read would go to a replica not connected yet: the general path
        fast.replica_ok = replica_ok
        fast.touched = False
        fast.ready = True

    def _prepared_on(self, link: Link, fast: FastRoutes) -> dict[bytes, int]:
        """Named statements ``link`` holds as the client defined them -> what they do."""
        out: dict[bytes, int] = {}
        statements = self.replay.statements
        for name, msg in link.replay.prepared.items():
            known = statements.get(name)
            if name and known is not None and known[1] == msg:
                key = fast.key(known[0])
                what = fast.routes.get(key, 0) if key is not None else 0
                if what:
                    out[name] = what
        return out

    def _fast_replica(self, fast: FastRoutes) -> bool | None:
        """Point the fast path at a replica if reads may go to one now (None: one may serve
        them, but this session has no connection to it yet, or the connection lacks a
        setting or statement — the general path opens it or replays them)."""
        routing = self.routing
        if routing.pinned or routing.no_replica or routing.dirty:
            return False
        min_lsn = None
        if routing.horizon:
            min_lsn = self.router.lsn_after(routing.horizon)
            if min_lsn is None:
                return False
        rep = self.router.choose(min_lsn, routing.excluded(time.monotonic()))
        if rep is None:
            return False
        link = self.links.get(rep.name)
        if link is None or link.closed:
            return None
        if link.transport is None or link.pump is None:
            return False
        backend, replay = link.replay, self.replay
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
        prepared = self._prepared_on(link, fast)
        fast.prepared_ok = {name: True for name, what in prepared.items()
                            if what == REPLICA_READ}
        return True

    def _client_message(self, t: int, msg: bytes) -> None:
        link = self.open_link
        if link is not None:
            self._forward(link, msg)
            if t == F_SYNC:  # Sync ends the open unit
                self.open_link = None
            return
        if t in _COPY_MESSAGES:  # to the COPY (on the primary)
            target = self.primary_link
            if self.tx_link is not None and self.tx_link.conv.copy_mode:
                target = self.tx_link
            if target is not None:
                self._forward(target, msg)
            return
        if t == F_TERMINATE:
            for lk in self._all_links():
                if lk.usable:
                    lk.conv.feed_frontend(msg, _perf())
                    lk.transport.write(msg)  # type: ignore[union-attr]
            return
        if t == F_FLUSH and self.cutter.empty:  # a bare Flush: to whoever owes answers
            for lk in self._all_links():
                if lk.busy:
                    self._forward(lk, msg)
                    break
            return
        unit = self.cutter.add(t, msg)
        if unit is not None:
            self.units.append(unit)

    def _forward(self, link: Link, msg: bytes) -> None:
        if not link.usable:
            return
        if link.replica is None or link.answers.hold is None:
            self._current = link.name
            link.conv.feed_frontend(msg, _perf())
        elif link.unit is not None:
            link.unit.data += msg
        link.transport.write(msg)  # type: ignore[union-attr]

    # ------------------------------------------------------------------ dispatch
    def _all_links(self) -> list[Link]:
        links = list(self.links.values())
        if self.primary_link is not None:
            links.insert(0, self.primary_link)
        return links

    def _link_named(self, name: str) -> Link | None:
        return self.primary_link if name == "primary" else self.links.get(name)

    def _pump(self) -> None:
        primary = self.primary_link
        if primary is None or self.state is not SessionState.READY:
            return
        while self.units and self.open_link is None and self.connecting is None:
            unit = self.units[0]
            if any(lk.busy for lk in self.links.values()):
                return  # a replica unit runs alone
            if primary.busy:
                # Pipelined behind the primary: follow it there (always correct), unless
                # the primary first needs a replay (its answers would interleave).
                if self.replay.preamble(primary.replay, unit, dry_run=True)[0]:
                    return
                self._decide(unit)
                self.units.popleft()
                self._send(primary, unit)
                continue
            link = self._route(unit)
            if link is None:
                return  # connecting to a replica; pumped again when done
            self.units.popleft()
            self._send(link, unit)

    def _unit_statements(self, unit: Unit) -> list[RoutedStatement] | None:
        out: list[RoutedStatement] = []
        for sql in unit.queries:
            out.extend(self._statements(sql))
        parsed = set()
        for name, sql, _ in unit.parses:
            parsed.add(name)
            out.extend(self._statements(sql))
        for name in unit.binds:
            if name in parsed:
                continue
            known = self.replay.statements.get(name)
            if known is None:
                return None
            out.extend(self._statements(known[0]))
        return out

    def _statements(self, sql: str) -> list[RoutedStatement]:
        return [RoutedStatement(n.text, shape, n.hints) for n, shape in self._statements_nr(sql)]

    def _in_tx(self) -> Link | None:
        tx = self.tx_link
        if tx is not None and tx.conv.tx_status != _IDLE and not tx.closed:
            return tx
        return None

    def _decide(self, unit: Unit) -> Decision | None:
        """The policy's decision for ``unit`` (None: unknown statements), noting pins and
        writes for the session."""
        tx = self._in_tx()
        stmts = None if unit.unknown else self._unit_statements(unit)
        routing = self.routing
        was_pinned = routing.pinned
        functions = self.router.functions(self.database)
        decision = routing.decide(stmts, in_transaction=tx is not None,
                                  transaction_on_replica=tx is not None and tx.replica is not None,
                                  functions=functions)
        if decision is None:
            return None
        self._learn(unit, decision, neutral_view=tx is None and not was_pinned
                    and not routing.no_replica)
        if routing.pinned and not was_pinned:
            self.router.note_pinned()
            log.info("session_pinned", session=self.id, reason=decision.reason)
        if routing.table_mode and not decision.writes and decision.target is Target.REPLICA:
            unit.tables = frozenset(t for st in stmts or () for t in st.shape.tables)
        if decision.target is Target.PRIMARY and "volatile function" in decision.reason:
            self.router.load_functions(self.database)  # maybe a function we do not know yet
        return decision

    def _route(self, unit: Unit) -> Link | None:
        primary = self.primary_link
        assert primary is not None
        tx = self._in_tx()
        decision = self._decide(unit)
        unit.in_tx = tx is not None
        if tx is not None:
            return tx  # transactions stay on one backend, whatever the statement
        if unit.describe_only:
            return primary
        if decision is None or decision.target is Target.PRIMARY:
            return primary
        min_lsn = None
        horizon = self.routing.horizon
        if unit.tables:
            horizon = max(horizon, self.router.table_horizon(self.database, unit.tables))
        if horizon:
            min_lsn = self.router.lsn_after(horizon)
            if min_lsn is None:
                self.router.note_fallback()
                return primary
        rep = self.router.choose(min_lsn, self.routing.excluded(time.monotonic()))
        if rep is None:
            self.router.note_fallback()
            return primary
        link = self.links.get(rep.name)
        if link is None or link.closed:
            self._connect_replica(rep)
            return None
        return link

    def _connect_replica(self, rep: ReplicaState) -> None:
        self.connecting = rep.name
        self.server.track(asyncio.get_running_loop().create_task(self._open_replica(rep)))

    async def _open_replica(self, rep: ReplicaState) -> None:
        link = Link(rep.name, self._conversation(rep.name), rep)
        password = self.router.routing.passwords.get(self.user)
        try:
            login = ReplicaLogin(self.user, password, await self._replica_keys())
            assert self.startup is not None
            problem = await open_replica(self, link, login, self.startup.raw,
                                         self.config.proxy.connect_timeout)
        except (OSError, TimeoutError, ProxyError) as exc:
            problem = f"connection failed: {exc}"
            self.router.mark_down(rep, problem)
        self.connecting = None
        if self.state is not SessionState.READY or problem is not None:
            link.closed = True
            if link.transport is not None:
                link.transport.close()
        if self.state is not SessionState.READY:
            return
        if problem is None:
            self.links[rep.name] = link
            self.routing.connected(rep.name)
            if self.fast is not None and link.transport is not None \
                    and link.protocol is not None:
                link.pump = RoutedLinkPump(link.protocol, self.fast, link)
                link.transport.set_protocol(cast(Any, link.pump))
        elif any(word in problem for word in _AUTH_PROBLEMS):
            self.routing.no_replica = True
            self.router.warn_once(
                f"auth:{self.user}", "replica_authentication_impossible", user=self.user,
                replica=rep.name, reason=problem,
                consequence="this user's reads stay on the primary")
        else:  # try again later (it may be restarting), backing off
            self.routing.connect_failed(rep.name, time.monotonic())
        self._pump()

    def _send(self, link: Link, unit: Unit) -> None:
        transport = link.transport
        if transport is None or transport.is_closing():
            if link.replica is not None:
                self._retry_on_primary(link, unit, "connection closed")
                return
            self.fail(ConnectionFailure("server closed the connection unexpectedly"))
            return
        pre, injected, prepared = self.replay.preamble(link.replay, unit)
        link.answers.swallow += injected
        for name, sql in prepared.items():
            link.conv.statements[name] = sql
        now = _perf()
        unit.sent = now
        data = bytes(unit.data)
        if unit.describe_only and link.replica is None and not unit.in_tx:
            # Parse/Describe answered by the primary, closed with a Sync of our own (its
            # ReadyForQuery kept from the client), so that the Bind/Execute the client sends
            # next is a unit of its own, routed — and retried — like any other. The Sync also
            # ends the implicit transaction, so the primary holds no locks meanwhile.
            data += SYNC
            link.answers.strip += 1
        elif unit.describe_only:
            unit.open = True
        rep = link.replica
        if rep is None:
            self._current = "primary"
            link.conv.feed_frontend(data, now)
            self.router.note_primary_unit()
        else:
            link.unit = unit
            rep.unit_started()
            link.answers.start_unit(hold=not unit.open)
            if unit.open:
                link.conv.feed_frontend(data, now)
        transport.write(pre + data if pre else data)
        self.replay.sent(link.replay, unit, [lk.replay for lk in self._all_links()])
        if unit.open:
            self.open_link = link
        self.tx_link = link

    # ------------------------------------------------------------------ backend side
    def link_data(self, link: Link, data: bytes) -> None:
        """Bytes from a backend of this session."""
        answers = link.answers
        try:
            events = answers.feed(data)
        except ProtocolViolation as exc:
            self.fail(ProtocolViolation(f"{exc} from backend {link.name}"))
            return
        for event in events:
            self._answer(link, event)
        if answers.swallow_errors:
            for body in answers.swallow_errors:
                log.info("routing_replay_failed", session=self.id, backend=link.name,
                         error=error_summary(body))
            answers.swallow_errors.clear()
        self._after(link)

    def _answer(self, link: Link, event: Event) -> None:
        kind = event.kind
        if kind is Kind.DELIVER:
            self._deliver(link, event.data)
        elif kind is Kind.TRACK:
            self._current = link.name
            link.conv.feed_backend(event.data, _perf())
        elif kind is Kind.UNIT_DONE:
            self._replica_done(link)
        elif kind is Kind.STREAM_DONE:
            self._finish_replica_unit(link)
        elif kind is Kind.RELEASE:
            self._release(link)
        elif kind is Kind.IDLE_ERROR:
            link.closed = True  # an idle replica connection speaks: a shutdown FATAL

    def _deliver(self, link: Link, data: bytes) -> None:
        t = self.client_transport
        if t is not None and not t.is_closing():
            t.write(data)
        self._current = link.name
        link.conv.feed_backend(data, _perf())

    def _release(self, link: Link) -> None:
        """Stop holding the replica's answer: pass on what is held and stream the rest."""
        unit = link.unit
        if unit is None or link.answers.hold is None:
            return
        held = link.answers.take_hold()
        self._current = link.name
        link.conv.feed_frontend(bytes(unit.data), unit.sent)
        self._deliver(link, held)

    def _replica_done(self, link: Link) -> None:
        """A held replica answer is complete: release it, or retry the unit on the primary
        if the replica proved it could not run it."""
        unit = link.unit
        assert unit is not None
        error = link.answers.error
        replay_failed = link.answers.replay_failed
        if should_retry(error, replay_failed, unit.in_tx):
            reason = f"error {error}" if error else "replay failed"
            self._finish_replica_unit(link)
            if error in REPLICA_DOWN and link.replica is not None:
                self.router.mark_down(link.replica, reason)
            if replay_failed or error in DROP_CONNECTION:
                self._drop_link(link)  # its state is not what we think: start afresh
            self._retry_on_primary(link, unit, reason)
            return
        self._release(link)
        self._finish_replica_unit(link)

    def _finish_replica_unit(self, link: Link) -> None:
        if link.unit is not None and link.replica is not None:
            link.replica.unit_finished()
        link.unit = None
        link.answers.end_unit()

    def _retry_on_primary(self, link: Link, unit: Unit, reason: str) -> None:
        if link.replica is not None:
            link.replica.unit_retried()
        log.info("routing_retry_on_primary", session=self.id, replica=link.name, reason=reason)
        primary = self.primary_link
        if primary is None:
            return
        unit.open = False
        self.routing.may_have_written()  # a write in disguise, maybe: read-your-writes
        self.units.appendleft(unit)
        if not primary.busy:
            self.units.popleft()
            self._send(primary, unit)

    def _after(self, link: Link) -> None:
        """After a backend's bytes: a finished unit frees the session for the next."""
        if link.replica is not None and link.closed and link.unit is None:
            self._drop_link(link)
        if link.busy:
            return
        if link.conv.tx_status == _IDLE:
            self.replay.transaction_ended(link.replay, committed=not self.unit_failed)
            self.unit_failed = False
            if link.replica is None:
                written = self.routing.primary_idle(self.router.horizon())
                if written:
                    self.router.note_writes(self.database, written, self.routing.horizon)
        self._pump()
        self._refresh_fast()

    # ------------------------------------------------------------------ settings
    def statement_done(self, pending: Pending, index: int, tag: bytes | None, rows: int,
                       sqlstate: str | None, started: float, ended: float) -> None:
        self.route = self._current
        super().statement_done(pending, index, tag, rows, sqlstate, started, ended)
        if sqlstate is not None:
            self.unit_failed = True
            return
        if tag == b"ROLLBACK":
            self.replay.rolled_back()
            return
        if not pending.sql or (tag is not None and not tag.startswith(SESSION_TAGS)):
            return  # only SET / RESET / DISCARD / DEALLOCATE change what a replica must replay
        stmts = self._statements_nr(pending.sql)
        current = self._link_named(self._current)
        if index < len(stmts) and current is not None:
            n, shape = stmts[index]
            self.replay.statement_completed(n, shape, current.replay,
                                            [lk.replay for lk in self._all_links()])

    def statement_event(self, route: str, pending: Pending, index: int,
                        stmt: Statement | None, sqlstate: str | None) -> None:
        """From a link's RoutedRecorder: a statement that may change what must be replayed
        elsewhere (or failed). The recorder has recorded it already."""
        fast = self.fast
        if fast is not None:
            fast.ready = False
            fast.touched = True
        if sqlstate is not None:
            self.unit_failed = True
            return
        if stmt is not None:
            n, shape = stmt.normalized, stmt.shape
        else:
            stmts = self._statements_nr(pending.sql) if pending.sql else []
            if index >= len(stmts):
                return
            n, shape = stmts[index]
        if shape.kind is StatementKind.TRANSACTION:
            if shape.transaction_op in ("rollback", "rollback_to"):
                self.replay.rolled_back()
            return
        current = self._link_named(route)
        if current is not None:
            self.replay.statement_completed(n, shape, current.replay,
                                            [lk.replay for lk in self._all_links()])

    def _statements_nr(self, sql: str) -> list[tuple[Normalized, Shape]]:
        profiler = self.profiler
        if profiler is not None:
            return [(s.normalized, s.shape) for s in profiler.statements(self.info, sql)]
        cache = self.router.cache
        return [(n, cache.shape(n)) for n in cache.scan(sql)]

    # ------------------------------------------------------------------ teardown
    def link_lost(self, link: Link, exc: Exception | None) -> None:
        link.transport = None
        link.closed = True
        unit = link.unit
        if unit is not None and link.replica is not None:
            self.router.mark_down(link.replica, f"connection lost: {exc}" if exc else
                                  "connection lost")
            held = link.answers.hold is not None
            self._finish_replica_unit(link)
            self.links.pop(link.name, None)
            if held and self.state is SessionState.READY and not unit.in_tx:
                self._retry_on_primary(link, unit, "connection lost")
                return
            if self.state is SessionState.READY:
                self.fail(ConnectionFailure(
                    "replica connection lost in the middle of a statement",
                    detail=f"replica {link.name}"))
            return
        if self.links.get(link.name) is link:
            del self.links[link.name]
        if self.tx_link is link:
            self.tx_link = None
            if link.conv.tx_status != _IDLE and self.state is SessionState.READY:
                self.fail(ConnectionFailure(
                    "replica connection lost inside a transaction block",
                    detail=f"replica {link.name}"))
                return
        if self.state is SessionState.READY:
            self._pump()

    def _drop_link(self, link: Link) -> None:
        if self.links.get(link.name) is link:
            del self.links[link.name]
        link.closed = True
        if self.tx_link is link and link.unit is None:
            self.tx_link = None
        t = link.transport
        if t is not None and not t.is_closing():
            t.write(TERMINATE)
            t.close()

    def _close_replicas(self) -> None:
        for link in list(self.links.values()):
            self._drop_link(link)

    def connection_lost(self, exc: Exception | None) -> None:
        for link in list(self.links.values()):
            if link.unit is not None and link.key is not None:
                self.server.send_cancel(link.address, link.key)
        self._close_replicas()
        super().connection_lost(exc)

    def fail(self, exc: ProxyError, *, quiet: bool = False) -> None:
        self._close_replicas()
        super().fail(exc, quiet=quiet)

    def cancel_backend_query(self) -> asyncio.Task[None] | None:
        for link in self.links.values():
            if link.unit is not None and link.key is not None:
                return self.server.send_cancel(link.address, link.key)
        return super().cancel_backend_query()

    def pause_writing(self) -> None:
        super().pause_writing()
        for link in self.links.values():
            if link.transport is not None:
                link.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        for link in self.links.values():
            if link.usable:
                link.transport.resume_reading()  # type: ignore[union-attr]

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["backends"] = (["primary"] if self.primary_link is not None else []) + list(
            self.links)
        out["pinned"] = self.routing.pinned
        fast = self.fast
        out["fast_path"] = None if fast is None else {
            "to_replica": fast.to_replicas, "to_primary": fast.to_primary_count}
        return out
