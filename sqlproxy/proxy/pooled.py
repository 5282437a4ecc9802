"""Transaction pooling: a client session that borrows a server connection per transaction.

Only used with ``pool.mode = "transaction"`` (the server picks the session class once at
startup): session mode keeps the plain ``ClientSession`` and its direct relay untouched.

How it works is ``docs/pooling.md`` (with the guarantees and their tests); the parts are:
the lending rules (``pool/state.py``, pure), the server connections and pools
(``poolservers.py``), logins the proxy answers or checks (``pooled_login.py``), what pins a
client (``poolpins.py``), replica pools (``poolroute.py``), and the compiled fast path
(``fastpool.py``: common units and their answers, and the direct relay). This class is the
general path: it frames every client message, cuts units (``routing.units``), borrows a server
per unit outside a transaction, replays startup settings and the client's prepared statements
on it (answers swallowed, ``routing.answers``), gives it back when ReadyForQuery says idle and
nothing is owed, and rolls back or closes what a departed client left. ``held``, ``waiting``,
``pinned``... are the fast path's fields. Analysis stays per client: the client's own
``Conversation`` sees its units and the answers delivered to it, never the injected ones.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from sqlproxy.analysis.cache import StatementCache
from sqlproxy.errors import ConnectionFailure, ProtocolViolation, ProxyError
from sqlproxy.logs import get_logger
from sqlproxy.pool.auth import LoginServer
from sqlproxy.proxy import deciding, poolpins, poolroute
from sqlproxy.proxy.fastpool import PooledClientPump, PoolFast
from sqlproxy.proxy.pooled_login import (
    answer_login,
    client_auth_message,
    proxy_login,
    recover_scram_keys,
    session_ended,
)
from sqlproxy.proxy.poolservers import PoolIO, PoolManager, ServerConn, settings_sql
from sqlproxy.proxy.recorder import PooledListener, PooledRecorder
from sqlproxy.proxy.session import BackendConnection, ClientSession, SessionState
from sqlproxy.routing.answers import Kind
from sqlproxy.routing.replay import Replay
from sqlproxy.routing.scram import ScramKeys, ScramWatch
from sqlproxy.routing.session_routing import SessionRouting
from sqlproxy.routing.units import Unit, UnitCutter, cut_units
from sqlproxy.wire.conversation import Conversation
from sqlproxy.wire.frames import Frames
from sqlproxy.wire.messages import (
    F_COPY_DATA,
    F_COPY_DONE,
    F_COPY_FAIL,
    F_FLUSH,
    F_TERMINATE,
    SYNC,
    TX_IDLE,
    StartupMessage,
    build,
    cstr,
    error_response,
    error_summary,
    ready_for_query,
)
from sqlproxy.wire.requests import Pending

if TYPE_CHECKING:
    from sqlproxy.proxy.server import ProxyServer
    from sqlproxy.routing.health import Router


__all__ = ["PooledSession"]

log = get_logger("sqlproxy.pool")
# A client's socket is read directly (direct.DirectSocket) from its fifth chunk after login on.
DIRECT_AFTER_CHUNKS = 4
_perf = time.perf_counter
_COPY_MESSAGES = frozenset({F_COPY_DATA, F_COPY_DONE, F_COPY_FAIL})
#: Startup parameters that are not settings (or cannot be SET later).
_NOT_SETTINGS = frozenset({"user", "database", "replication", "options"})
_AUTH_OK = build(b"R", b"\x00\x00\x00\x00")
PARSE_COMPLETE = build(b"1", b"")


class PooledSession(ClientSession):
    """A client session whose server connection is borrowed per transaction."""

    def __init__(self, server: ProxyServer) -> None:
        super().__init__(server)
        manager = server.pools
        assert manager is not None
        self.manager: PoolManager = manager
        self.pool: PoolIO | None = None
        # The compiled fast path (fastpool.py) and the state it shares with this class
        # (held, waiting, _open_unit, pinned: properties below).
        self.fast = PoolFast(self, self.config.proxy.max_message_bytes,
                             self.config.pool.max_prepared_per_server)
        if self.profiler is not None:
            self.recorder = PooledRecorder(self.profiler, self, self.info, self.route)
        self.client_pump: PooledClientPump | None = None  # the client's protocol once ready
        self._paused_server: ServerConn | None = None  # not read while the client is slow
        self.frames = Frames(self.config.proxy.max_message_bytes)
        self.cutter = UnitCutter()
        self.units: deque[Unit] = deque()
        self.replay = Replay()
        self.settings: dict[str, str] = {}
        self.scram_keys: ScramKeys | None = None
        # With routing: the client's SCRAM exchange with the primary, for the replica pools'
        # logins (recovered after the login: ``scram_pending`` meanwhile).
        self.scram: ScramWatch | None = ScramWatch() if server.router is not None else None
        self.scram_pending = False
        self.login_server: LoginServer | None = None  # the proxy checks the login (auth_user)
        self.login_checked: asyncio.Future[None] | None = None
        self.login_waiting = False  # queued for a login slot
        self._login_future: asyncio.Future[None] | None = None
        self._login_slot = False  # holds a login slot not yet adopted
        self._joined = False
        self._parses_sent: list[bytes] = []  # Parse messages awaiting their answers
        # Replica routing (poolroute.py): the router, the session's routing state, the unit
        # running on a replica (its answer held back) and one to retry on the primary.
        self.router: Router | None = server.router
        self.routing = (SessionRouting(server.router.table_mode)
                        if server.router is not None else None)
        self._replica_unit: Unit | None = None
        self.retry_unit: Unit | None = None
        self._errors_at = 0

    @property
    def held(self) -> ServerConn | None:
        """The server connection lent to this session."""
        held: ServerConn | None = self.fast.held
        return held

    @held.setter
    def held(self, server: ServerConn | None) -> None:
        self.fast.held = server
        self.fast.held_pump = server.pump if server is not None else None

    @property
    def replica_unit(self) -> Unit | None:
        """The unit running on the replica server held, its answer held back (poolroute).
        One the fast path sent (``fast.r_data``) becomes a Unit the first time anything
        asks: its answer did not come whole and clean, the replica went away, the client
        left... The general path then carries on as if it had sent it itself."""
        unit = self._replica_unit
        if unit is None and self.fast.r_data:
            unit = self._replica_unit = poolroute.fast_read_unit(self)
        return unit

    @replica_unit.setter
    def replica_unit(self, unit: Unit | None) -> None:
        self._replica_unit = unit

    @property
    def waiting(self) -> bool:
        """Queued for a server."""
        return self.fast.waiting

    @waiting.setter
    def waiting(self, value: bool) -> None:
        self.fast.waiting = value

    @property
    def _open_unit(self) -> bool:
        """A unit ended by Flush: the server stays until Sync."""
        return self.fast.open_unit

    @_open_unit.setter
    def _open_unit(self, value: bool) -> None:
        self.fast.open_unit = value

    @property
    def pinned(self) -> str | None:
        """Why the session keeps its server for good (None: it does not)."""
        return self.fast.pinned

    @pinned.setter
    def pinned(self, reason: str | None) -> None:
        self.fast.pinned = reason

    # ------------------------------------------------------------------ startup
    def _client_pid(self, pid: int) -> int:
        return self.manager.next_pid()

    def _connect_now(self, msg: StartupMessage) -> bool:
        """The common login: the pair's logins need no password (or the proxy has learnt
        so), nothing pins: answered at once, without a task."""
        if "options" in msg.parameters or "replication" in msg.parameters:
            return False
        pool = self.manager.pool(msg.database, msg.user)
        if not pool.trusted:
            return False
        self._join(pool, msg)
        answer_login(self, pool)
        return True

    def _join(self, pool: PoolIO, msg: StartupMessage) -> None:
        self.pool = pool
        self.settings = self.manager.shared_settings(
            {k: v for k, v in msg.parameters.items() if k not in _NOT_SETTINGS})
        pool.client_joined(msg.application_name)
        self._joined = True

    async def _connect_backend(self, msg: StartupMessage) -> None:
        pool = self.manager.pool(msg.database, msg.user)
        self._join(pool, msg)
        if "options" in msg.parameters or "replication" in msg.parameters:
            # Cannot be SET later: keeps its login server.
            self._pin("startup options", poolpins.options_as_sql(msg.parameters))
        if pool.trusted and self.pinned is None:
            answer_login(self, pool)
            return
        if self.pinned is None and self.config.pool.auth_user \
                and await proxy_login(self, pool, msg):
            return  # checked by the proxy (pool.auth_user): logged in, or refused
        granted, victim = pool.state.login(self, time.monotonic())
        if victim is not None:
            victim.close()
        if not granted:
            self.login_waiting = True
            self._login_future = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._login_future,
                                       self.config.pool.max_wait_ms / 1000.0)
            except TimeoutError:
                pool.state.cancel_wait(self)
                self.login_waiting = False
                self.fail(self._too_many(), quiet=True)
                return
        self._login_slot = True
        if self.state is SessionState.CLOSED:
            self._free_login_slot()
            return
        if pool.trusted and self.pinned is None:
            # Learnt while this login waited for its slot (a burst of first logins): answered
            # here, the slot unused, instead of one more server connection opened and closed.
            self._free_login_slot(failed=False)
            answer_login(self, pool)
            return
        await super()._connect_backend(msg)

    def login_slot_granted(self) -> None:
        self.login_waiting = False
        if self._login_future is not None and not self._login_future.done():
            self._login_future.set_result(None)
        else:  # timed out meanwhile: give the slot back
            self._login_slot = True
            self._free_login_slot()

    def _free_login_slot(self, *, failed: bool = True) -> None:
        if self._login_slot and self.pool is not None:
            self._login_slot = False
            self.pool.carry_out(self.pool.state.open_failed(self, time.monotonic(),
                                                            failed=failed))

    def _server_auth_message(self, code: int, body: bytes) -> None:
        if code != 0:
            self._asked_password = True
        if self.scram is not None:
            self.scram.server_message(code, body)

    def _client_auth_message(self, body: bytes) -> None:
        if self.login_server is not None:
            client_auth_message(self, body)
        elif self.scram is not None:
            self.scram.client_message(body)

    _asked_password = False

    def _go_hot(self, backend: BackendConnection, rest: bytes) -> None:
        pool = self.pool
        assert pool is not None
        if not self._asked_password:
            pool.trusted = True
            pool.state.may_open = True
        if not pool.parameters:
            pool.parameters = list(self.parameters.items())
        self._login_slot = False
        conn = pool.adopt_login(self, backend)
        self.backend = None
        conn.holder = self
        self.held = conn
        capture = self.scram.complete if self.scram is not None else None
        if capture is not None and self.scram_keys is None:
            # Its reads wait on the primary until the keys are known (poolroute).
            self.scram_pending = True
            self.server.track(asyncio.get_running_loop().create_task(
                recover_scram_keys(self, capture)))
        self.scram = None
        self.start(rest)

    def start(self, rest: bytes) -> None:
        self._cancel_startup_timer()
        self.ready_at = _perf()
        # The session listens itself (DEALLOCATE / DISCARD change what the servers hold),
        # and hands each statement on to its recorder.
        listener = self.recorder if self.recorder is not None else PooledListener(self)
        self.conv = self.info.conv = Conversation(listener, self.config.proxy.max_message_bytes)
        self.state = SessionState.READY
        self._buf.clear()
        pool = self.pool
        t = self.client_transport
        if pool is not None and t is not None:
            self.fast.attach(pool, self.conv, self.info, self.units, self.cutter, self.frames,
                             self.replay.statements, self.settings, self.manager.clean_texts,
                             self.manager.clean_shapes, self.profiler, t,
                             self._parses_sent)
            pump = self.client_pump = PooledClientPump(self, self.fast, t)
            self.fast.client_pump = pump
            t.set_protocol(pump)  # type: ignore[arg-type]
            if self.router is not None:
                poolroute.attach_fast(self)
            if self.config.proxy.direct_relay and self.tls is None:
                pump.direct_after = DIRECT_AFTER_CHUNKS
        if self._pending_to_backend:  # sent before we answered the login
            early = bytes(self._pending_to_backend)
            self._pending_to_backend.clear()
            self.data_received(early)
        if self.held is not None:
            if rest:
                self.server_data(self.held, rest)
            else:
                self._after()

    # ------------------------------------------------------------------ client side
    def data_received(self, data: bytes) -> None:
        """The general path (the compiled pump offers each chunk to ``fast.client`` first)."""
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

    def _client_message(self, t: int, msg: bytes) -> None:
        if t in _COPY_MESSAGES or (t == F_FLUSH and self.cutter.empty):
            server = self.held
            if server is not None and server.usable:
                self.conv.feed_frontend(msg, _perf())  # type: ignore[union-attr]
                server.transport.write(msg)  # type: ignore[union-attr]
            return
        if t == F_TERMINATE:
            # The client leaves: its server goes back (clean or not, see _give_back) and we
            # close the connection, as the server would (drivers wait for that EOF).
            self.conv.feed_frontend(msg, _perf())  # type: ignore[union-attr]
            self._give_back("client_gone_in_transaction")
            if self.client_transport is not None:
                self.client_transport.close()
            return
        unit = self.cutter.add(t, msg)
        if unit is not None:
            self.units.append(unit)

    def pump(self) -> None:
        """Send what is queued (to the held server, or one checked out)."""
        self._pump()

    def _pump(self) -> None:
        while self.units and self.state is SessionState.READY:
            server = self.held
            if server is None:
                if self.waiting:
                    return
                if self._prepare_only(self.units[0]):
                    self.units.popleft()
                    continue
                pool = self.pool
                if self.router is not None:
                    pool = poolroute.replica_pool_for(self, self.units[0]) or pool
                assert pool is not None
                server = pool.checkout(self)
                if server is None:
                    return  # granted() pumps again
                server.holder = self
                self.held = server
            elif self.routing is not None:
                if self.replica_unit is not None:
                    return  # a replica unit runs alone
                poolroute.note_unit(self, self.units[0], in_transaction=True)
            if not server.usable:
                if server.pool.replica is not None:  # its reads go elsewhere
                    self.held = None
                    server.holder = None
                    server.pool.checkin(self, server, clean=False, reason="server_closed")
                    continue
                self.fail(ConnectionFailure("server closed the connection unexpectedly"))
                return
            self._send(server, self.units.popleft())

    def _prepare_only(self, unit: Unit) -> bool:
        """Answer a unit of nothing but Parse messages and a Sync, outside a transaction,
        without a server, when every statement it prepares was accepted by a server of the
        pool already: the statement is noted for this client and prepared lazily wherever it
        next runs. Clients that prepare synchronously from one thread serving many
        connections (pgbench -M prepared) would otherwise wait for a server held by a
        connection that thread cannot serve meanwhile."""
        pool = self.pool
        conv = self.conv
        if pool is None or conv is None or conv.tx_status != TX_IDLE or conv.busy \
                or not unit.parses or unit.binds or unit.describes or unit.closes \
                or unit.queries or unit.unknown or unit.open or unit.describe_only:
            return False
        known = pool.known_parses
        if any(not name or msg not in known for name, _, msg in unit.parses):
            return False
        if len(unit.data) != sum(len(m) for _, _, m in unit.parses) + len(SYNC):
            return False  # something else in it
        for name, sql, msg in unit.parses:
            self.replay.statements[name] = (sql, known[msg])
        now = _perf()
        conv.feed_frontend(bytes(unit.data), now)
        answer = PARSE_COMPLETE * len(unit.parses) + ready_for_query()
        t = self.client_transport
        if t is not None:
            t.write(answer)
        conv.feed_backend(answer, now)
        return True

    def granted(self, server: ServerConn) -> None:
        """A server for this session (checked out after a wait, or opened for it)."""
        self.waiting = False
        server.holder = self
        self.held = server
        if not self.fast.send_parked():
            self.unpark()
            return
        self._pump()
        self._after()

    def unpark(self) -> None:
        """The unit the fast path parked while waiting needs the general path (settings or
        statements to replay on the server it got): it goes first, as a unit of its own."""
        data = self.fast.take_parked()
        try:
            for unit in cut_units(data, self.config.proxy.max_message_bytes):
                self.units.appendleft(unit)
        except ProtocolViolation as exc:  # (scanned whole by the fast path: cannot happen)
            self.fail(exc)
            return
        self._pump()
        self._after()

    def open_failed(self, problem: str) -> None:
        self.fail(ConnectionFailure(f"could not open a pooled server connection: {problem}"))

    def _too_many(self) -> ProxyError:
        size = self.pool.state.limits.size if self.pool is not None else 0
        return ProxyError(
            f"no server connection available within {self.config.pool.max_wait_ms:g} ms: "
            f"pool.size is {size}", sqlstate="53300",
            detail=f"all {size} server connections of the pool were busy")

    def wait_timed_out(self) -> None:
        """Waited past pool.max_wait_ms: each queued unit fails with 53300; the session
        stays usable (outside a transaction: it held no server)."""
        self.waiting = False
        if self.pool is not None:
            self.pool.errors_53300 += 1
        exc = self._too_many()
        err = error_response(exc.sqlstate, exc.message, severity="ERROR", detail=exc.detail,
                             hint="raise pool.size or pool.max_wait_ms, or shorten the "
                                  "transactions that hold server connections")
        out = bytearray()
        if self.fast.take_parked():
            out += err + ready_for_query()
        for _ in self.units:
            out += err + ready_for_query()
        self.units.clear()
        log.warning("pool_wait_timeout", session=self.id, database=self.database,
                    user=self.user, max_wait_ms=self.config.pool.max_wait_ms)
        t = self.client_transport
        if t is not None and out:
            t.write(bytes(out))

    def _send(self, server: ServerConn, unit: Unit) -> None:
        transport = server.transport
        assert transport is not None
        if self.pinned is None:
            poolpins.check_unit(self, unit)
        pre = b""
        injected = 0
        sql = "" if server.settings == self.settings else settings_sql(server.settings,
                                                                          self.settings)
        if sql:
            pre = build(b"Q", cstr(sql))
            injected = 1
            server.settings = self.settings
        if unit.queries and self.replay.statements:
            self.replay.describe_deallocated(unit)
        rp, n, _ = self.replay.preamble(server.replay, unit)
        if n:
            pre += rp
            injected += n
        server.answers.swallow += injected
        now = _perf()
        unit.sent = now
        data = bytes(unit.data)
        rep = server.pool.replica
        if rep is not None:
            # Held back until complete (retried on the primary if the replica cannot run
            # it): the conversation sees the unit when its answer is released.
            self.replica_unit = unit
            unit.in_tx = self.conv is not None and self.conv.tx_status != TX_IDLE
            rep.unit_started()
            server.answers.start_unit(hold=not unit.open)
            if unit.open:
                self.conv.feed_frontend(data, now)  # type: ignore[union-attr]
        else:
            self.conv.feed_frontend(data, now)  # type: ignore[union-attr]
            if self.router is not None:
                self.router.note_primary_unit()
        transport.write(pre + data if pre else data)
        if unit.parses:
            self._parses_sent.extend(m for name, _, m in unit.parses if name)
            self._errors_at = self.conv.sql_errors  # type: ignore[union-attr]
        self.replay.sent(server.replay, unit, ())
        if unit.binds or unit.parses or unit.describes:
            server.replay.bound((*unit.binds, *unit.describes),
                                self.config.pool.max_prepared_per_server)
        self._open_unit = unit.open or unit.describe_only

    def statement_event(self, pending: Pending, index: int) -> None:
        """A statement that may be a DEALLOCATE or DISCARD completed (from the recorder)."""
        server = self.held
        stmts = deciding.statements_nr(self, pending.sql) if pending.sql else []
        if server is not None and index < len(stmts):
            text = stmts[index][0].text
            if text.startswith(("deallocate", "discard")):
                # Gone from this server (the client's and maybe another's of that name).
                self.replay.forget_statements(text, server.replay, [server.replay])

    # ------------------------------------------------------------------ pinning (poolpins.py)
    def _pin(self, reason: str, text: str) -> None:
        poolpins.pin(self, reason, text)

    @property
    def statement_cache(self) -> StatementCache:
        """Statement shapes when the session is not profiled (deciding.statements_nr)."""
        return self.manager.cache

    # ------------------------------------------------------------------ server side
    def server_data(self, server: ServerConn, data: bytes) -> None:
        answers = server.answers
        if answers.replica:
            try:
                events = answers.feed(data)
            except ProtocolViolation as exc:
                self.fail(ProtocolViolation(f"{exc} from a replica"))
                return
            poolroute.deliver(self, server, events)
            self._server_data_done(server)
            if self.units and self.held is None:
                self._pump()  # (a unit to retry on the primary, or queued behind)
            return
        if not (answers.swallow or answers.strip or answers.buf or self._parses_sent):
            # Nothing to swallow or strip: the chunk goes to the client as received.
            t = self.client_transport
            if t is not None and not t.is_closing():
                t.write(data)
            self.conv.feed_backend(data, _perf())  # type: ignore[union-attr]
            self._after()
            return
        try:
            events = server.answers.feed(data)
        except ProtocolViolation as exc:
            self.fail(ProtocolViolation(f"{exc} from the server"))
            return
        t = self.client_transport
        conv = self.conv
        assert conv is not None
        for ev in events:
            if ev.kind is Kind.DELIVER:
                if t is not None and not t.is_closing():
                    t.write(ev.data)
                conv.feed_backend(ev.data, _perf())
            elif ev.kind is Kind.TRACK:
                conv.feed_backend(ev.data, _perf())
        self._server_data_done(server)

    def _server_data_done(self, server: ServerConn) -> None:
        conv = self.conv
        assert conv is not None
        if self._parses_sent and not conv.busy:
            if conv.sql_errors == self._errors_at and self.pool is not None:
                known = self.pool.known_parses
                if len(known) > 10_000:
                    known.clear()
                for msg in self._parses_sent:
                    if msg not in known:
                        known[msg] = msg
            self._parses_sent.clear()
        if server.answers.swallow_errors:
            for body in server.answers.swallow_errors:
                log.info("pool_replay_failed", session=self.id, error=error_summary(body))
            server.answers.swallow_errors.clear()
        self._after()

    def _after(self) -> None:
        server = self.held
        if server is None or self.pinned is not None:
            return
        conv = self.conv
        if conv is None or conv.busy or conv.tx_status != TX_IDLE or server.answers.busy \
                or server.answers.in_unit or self._open_unit or self.units:
            return
        self.held = None
        if self.routing is not None and server.pool.replica is None:
            poolroute.after_primary(self)
        server.pool.checkin(self, server, clean=True)

    def replica_done(self, server: ServerConn, clean: bool) -> None:
        """A replica unit is over (poolroute): outside a transaction its server goes back
        now, even with units queued (each is routed on its own)."""
        conv = self.conv
        if self.held is not server or conv is None:
            return
        if not clean:
            self.held = None
            server.pool.checkin(self, server, clean=False, reason="replay_failed")
            return
        if conv.busy or conv.tx_status != TX_IDLE or server.answers.busy or self._open_unit:
            return
        self.held = None
        server.pool.checkin(self, server, clean=True)

    def replica_open_failed(self, pool: PoolIO, problem: str) -> None:
        """No server of a replica pool for this session: its unit goes to the primary."""
        self.waiting = False
        poolroute.replica_failed(self, pool, problem)
        if self.units:
            self.retry_unit = self.units[0]
        self._pump()

    def server_lost(self, server: ServerConn, exc: Exception | None) -> None:
        if self.held is server:
            self.held = None
            if server.pool.replica is not None and self.state is SessionState.READY:
                poolroute.replica_lost(self, server, exc)
                return
            if self.state is SessionState.READY:
                conv = self.conv
                if conv is not None and (conv.terminated or conv.fatal):
                    if self.client_transport is not None:
                        self.client_transport.close()
                    return
                self.fail(ConnectionFailure(
                    "server closed the connection unexpectedly",
                    detail=f"backend {server.address[0]}:{server.address[1]}"
                    + (f": {exc}" if exc else "")))

    # ------------------------------------------------------------------ cancel
    def cancel_backend_query(self) -> asyncio.Task[None] | None:
        """The cancel goes to the server this client holds now, and that server is not lent
        to anyone else until the cancel has been processed (see ``PoolIO.cancel_done``)."""
        server = self.held
        if server is None or server.key is None or self.pool is None:
            return None
        server.cancels += 1
        task = self.server.send_cancel(server.address, server.key)
        pool = server.pool
        task.add_done_callback(lambda _: pool.cancel_done(server))
        return task

    # ------------------------------------------------------------------ teardown
    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def direct_relay_failed(self, exc: Exception) -> None:
        log.warning("direct_relay_unavailable", session=self.id,
                    error=f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ backpressure
    def pause_client_reading(self) -> None:
        """The server this session holds cannot take more: stop reading the client."""
        pump = self.client_pump
        if pump is not None:
            pump.pause_reading()
        elif self.client_transport is not None:
            self.client_transport.pause_reading()

    def resume_client_reading(self) -> None:
        pump = self.client_pump
        t = self.client_transport
        if pump is not None:
            pump.resume_reading()
        elif t is not None and not t.is_closing():
            t.resume_reading()

    def pause_writing(self) -> None:
        """The client is slow to read what we write it: stop reading the server it holds
        (the server stays lent until the client has drained its answers)."""
        server = self.held
        if server is None:
            super().pause_writing()  # logging in: the login's server connection
        elif self._paused_server is None and not server.closed:
            self._paused_server = server
            server.pump.pause_reading()

    def resume_writing(self) -> None:
        if self._paused_server is None:
            super().resume_writing()
        self._resume_server()

    def resume_server(self) -> None:
        """The server held back by this client's backpressure goes back to the pool: it is
        read again (by whoever borrows it next), whatever the client still has to drain."""
        self._resume_server()

    def _resume_server(self) -> None:
        server = self._paused_server
        if server is not None:
            self._paused_server = None
            server.pump.resume_reading()

    def _give_back(self, leaving: str) -> None:
        self._resume_server()  # the server must be heard to be rolled back or given back
        self.fast.enabled = False
        self.fast.take_parked()
        pool = self.pool
        if pool is None:
            return
        if self.waiting:
            pool.state.cancel_wait(self)
            self.waiting = False
        if self.login_waiting:
            pool.state.cancel_wait(self)
            self.login_waiting = False
        self._free_login_slot()
        server = self.held
        self.held = None
        if server is not None:
            conv = self.conv
            own = server.pool  # (a replica's pool, with routing)
            if server.answers.in_unit:  # a replica unit's answer on its way: cancel, close
                rep = own.replica
                if rep is not None and self.replica_unit is not None:
                    rep.unit_finished()  # (least-outstanding balancing counts it no more)
                    self.replica_unit = None
                if server.key is not None:
                    self.server.send_cancel(server.address, server.key)
                own.checkin(self, server, clean=False, reason=leaving)
            elif self.pinned is not None:
                own.checkin(self, server, clean=False, reason="pinned_client_left")
            elif conv is not None and not conv.busy and conv.tx_status != TX_IDLE \
                    and not self._open_unit and not server.answers.busy and server.usable \
                    and not server.cancels:
                # Gone inside a transaction, nothing running: roll it back, then reuse.
                server.holder = None
                server.reset(self)
            elif conv is None or conv.busy or conv.tx_status != TX_IDLE or self._open_unit \
                    or server.answers.busy:
                if conv is not None and conv.busy and server.key is not None:
                    self.server.send_cancel(server.address, server.key)
                own.checkin(self, server, clean=False, reason=leaving)
            else:
                own.checkin(self, server, clean=True)
        pool.pinned.pop(self.id, None)
        pool.fast_units += self.fast.fast_units
        self.fast.fast_units = 0
        if self._joined:
            self._joined = False
            pool.client_left(self.application_name)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conv is not None:
            self.conv.record_held()  # (held back for the poller's batch end: pump.Batch)
        self._give_back("client_gone_in_transaction")
        super().connection_lost(exc)
        session_ended(self)  # a login the proxy was checking ends here

    def fail(self, exc: ProxyError, *, quiet: bool = False) -> None:
        if self.conv is not None:
            self.conv.record_held()
        if not self._closing:
            self._give_back("session_error")
        super().fail(exc, quiet=quiet)
        session_ended(self)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["backends"] = ["primary"] if self.held is not None else []
        pump = self.client_pump
        out["direct_relay"] = pump is not None and pump.fd >= 0
        out["pool"] = {"holds_server": self.held is not None, "waiting": self.waiting,
                       "pinned": self.pinned, "fast_units": self.fast.fast_units}
        if self.router is not None:
            fast = self.fast
            out["fast_path"] = None if not fast.routed else {
                "to_replica": fast.to_replicas,
                "to_primary": fast.fast_units - fast.to_replicas}
        return out
