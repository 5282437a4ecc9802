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
client's, the swallowed and the held by ``routing.answers`` and carried out by
``proxy.answering`` (release, or retry on the primary).

Replica connections are opened lazily as the client's user and database by
``proxy.links.connect_replica`` and logged in by ``routing.replica_login`` (SCRAM keys
recovered from the client's exchange with the primary, observed during startup only, see
``routing.scram``; otherwise ``routing.passwords``). When none works, the session's reads stay
on the primary (warned once). Where a unit goes is ``proxy.deciding``; what the compiled fast
path may take over, ``proxy.fastplan`` and ``proxy.fastroute``.

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

from sqlproxy.analysis.cache import StatementCache
from sqlproxy.analysis.classify import StatementKind
from sqlproxy.analysis.statement import Statement
from sqlproxy.errors import ConnectionFailure, ProtocolViolation, ProxyError
from sqlproxy.logs import get_logger
from sqlproxy.proxy import answering, deciding, fastplan
from sqlproxy.proxy.fastroute import FastRoutes, RoutedClientPump, RoutedLinkPump
from sqlproxy.proxy.links import Link, connect_replica
from sqlproxy.proxy.recorder import RoutedRecorder
from sqlproxy.proxy.session import (
    BackendConnection,
    ClientSession,
    SessionState,
)
from sqlproxy.routing.health import ReplicaState, Router
from sqlproxy.routing.replay import SESSION_TAGS, Replay
from sqlproxy.routing.scram import ScramWatch
from sqlproxy.routing.session_routing import SessionRouting
from sqlproxy.routing.units import Unit, UnitCutter
from sqlproxy.wire.conversation import Conversation
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
    TX_IDLE,
)
from sqlproxy.wire.requests import ConversationListener, Pending

if TYPE_CHECKING:
    from sqlproxy.proxy.server import ProxyServer

log = get_logger("sqlproxy.routing")
_perf = time.perf_counter

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
        self.current = "primary"
        # The fast path (fastroute.py): profiled sessions, read_your_writes = "session".
        self.fast: FastRoutes | None = None
        self.fast_functions: object = None
        self.scram = ScramWatch()  # the client's exchange with the primary, for replicas

    # ------------------------------------------------------------------ authentication
    def _server_auth_message(self, code: int, body: bytes) -> None:
        self.scram.server_message(code, body)

    def _client_auth_message(self, body: bytes) -> None:
        self.scram.client_message(body)

    # ------------------------------------------------------------------ startup hand-over
    def _go_hot(self, backend: BackendConnection, rest: bytes) -> None:
        # Like the plain session, except that the primary's bytes keep coming through
        # backend_startup_data (the backend is never put on its own hot path).
        self._cancel_startup_timer()
        self.ready_at = _perf()
        conv = self.conversation_for("primary")
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

    def conversation_for(self, route: str) -> Conversation:
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
        self.dispatch()

    def refresh_fast(self) -> None:
        """Hand the next unit to the fast path if nothing kept here could change where it
        goes (``fastplan.refresh``); the fast path asks again while reads wait."""
        if self.fast is not None:
            fastplan.refresh(self, self.fast)

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
            for lk in self.all_links():
                if lk.usable:
                    lk.conv.feed_frontend(msg, _perf())
                    lk.transport.write(msg)  # type: ignore[union-attr]
            return
        if t == F_FLUSH and self.cutter.empty:  # a bare Flush: to whoever owes answers
            for lk in self.all_links():
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
            self.current = link.name
            link.conv.feed_frontend(msg, _perf())
        elif link.unit is not None:
            link.unit.data += msg
        link.transport.write(msg)  # type: ignore[union-attr]

    # ------------------------------------------------------------------ dispatch
    def all_links(self) -> list[Link]:
        links = list(self.links.values())
        if self.primary_link is not None:
            links.insert(0, self.primary_link)
        return links

    def link_named(self, name: str) -> Link | None:
        return self.primary_link if name == "primary" else self.links.get(name)

    def dispatch(self) -> None:
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
                deciding.decide(self, unit)
                self.units.popleft()
                self._send(primary, unit)
                continue
            link = self._route(unit)
            if link is None:
                return  # connecting to a replica; pumped again when done
            self.units.popleft()
            self._send(link, unit)

    @property
    def statement_cache(self) -> StatementCache:
        """Statement shapes when the session is not profiled (deciding.statements_nr)."""
        return self.router.cache

    def in_transaction(self) -> Link | None:
        """The link of the transaction block in progress, if any."""
        tx = self.tx_link
        if tx is not None and tx.conv.tx_status != TX_IDLE and not tx.closed:
            return tx
        return None

    def _route(self, unit: Unit) -> Link | None:
        return deciding.route(self, unit)

    def connect_replica(self, rep: ReplicaState) -> None:
        self.connecting = rep.name
        self.server.track(asyncio.get_running_loop().create_task(connect_replica(self, rep)))

    def replica_connected(self, link: Link) -> None:
        """``links.connect_replica`` logged ``link`` in: the session may use it."""
        self.links[link.name] = link
        self.routing.connected(link.name)
        if self.fast is not None and link.transport is not None and link.protocol is not None:
            link.pump = RoutedLinkPump(link.protocol, self.fast, link)
            link.transport.set_protocol(cast(Any, link.pump))

    def _send(self, link: Link, unit: Unit) -> None:
        transport = link.transport
        if transport is None or transport.is_closing():
            if link.replica is not None:
                self.retry_on_primary(link, unit, "connection closed")
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
            self.current = "primary"
            link.conv.feed_frontend(data, now)
            self.router.note_primary_unit()
        else:
            link.unit = unit
            rep.unit_started()
            link.answers.start_unit(hold=not unit.open)
            if unit.open:
                link.conv.feed_frontend(data, now)
        transport.write(pre + data if pre else data)
        self.replay.sent(link.replay, unit, [lk.replay for lk in self.all_links()])
        if unit.open:
            self.open_link = link
        self.tx_link = link

    # ------------------------------------------------------------------ backend side
    def link_data(self, link: Link, data: bytes) -> None:
        """Bytes from a backend of this session (``answering``)."""
        answering.link_data(self, link, data)

    @property
    def ready(self) -> bool:
        return self.state is SessionState.READY

    def retry_on_primary(self, link: Link, unit: Unit, reason: str) -> None:
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

    def backend_done(self, link: Link) -> None:
        """After a backend's bytes: a finished unit frees the session for the next."""
        if link.replica is not None and link.closed and link.unit is None:
            self.drop_link(link)
        if link.busy:
            return
        if link.conv.tx_status == TX_IDLE:
            self.replay.transaction_ended(link.replay, committed=not self.unit_failed)
            self.unit_failed = False
            if link.replica is None:
                written = self.routing.primary_idle(self.router.horizon())
                if written:
                    self.router.note_writes(self.database, written, self.routing.horizon)
        self.dispatch()
        self.refresh_fast()

    # ------------------------------------------------------------------ settings
    def statement_done(self, pending: Pending, index: int, tag: bytes | None, rows: int,
                       sqlstate: str | None, started: float, ended: float) -> None:
        # Unprofiled sessions only: the links' conversations call the session itself.
        self.route = self.current
        super().statement_done(pending, index, tag, rows, sqlstate, started, ended)
        if sqlstate is None and tag is not None and tag != b"ROLLBACK" \
                and not tag.startswith(SESSION_TAGS):
            return  # only SET / RESET / DISCARD / DEALLOCATE change what a replica must replay
        self.statement_event(self.current, pending, index, None, sqlstate)

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
            stmts = deciding.statements_nr(self, pending.sql) if pending.sql else []
            if index >= len(stmts):
                return
            n, shape = stmts[index]
        if shape.kind is StatementKind.TRANSACTION:
            if shape.transaction_op in ("rollback", "rollback_to"):
                self.replay.rolled_back()
            return
        current = self.link_named(route)
        if current is not None:
            self.replay.statement_completed(n, shape, current.replay,
                                            [lk.replay for lk in self.all_links()])

    # ------------------------------------------------------------------ teardown
    def link_lost(self, link: Link, exc: Exception | None) -> None:
        link.transport = None
        link.closed = True
        unit = link.unit
        if unit is not None and link.replica is not None:
            self.router.mark_down(link.replica, f"connection lost: {exc}" if exc else
                                  "connection lost")
            held = link.answers.hold is not None
            answering.finish_replica_unit(link)
            self.links.pop(link.name, None)
            if held and self.state is SessionState.READY and not unit.in_tx:
                self.retry_on_primary(link, unit, "connection lost")
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
            if link.conv.tx_status != TX_IDLE and self.state is SessionState.READY:
                self.fail(ConnectionFailure(
                    "replica connection lost inside a transaction block",
                    detail=f"replica {link.name}"))
                return
        if self.state is SessionState.READY:
            self.dispatch()

    def drop_link(self, link: Link) -> None:
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
            self.drop_link(link)

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
