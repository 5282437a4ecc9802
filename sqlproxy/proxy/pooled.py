"""Transaction pooling: a client session that borrows a server connection per transaction.

Only used with ``pool.mode = "transaction"`` (the server picks the session class once at
startup): session mode keeps the plain ``ClientSession`` and its direct relay untouched.

How it works (docs/pooling.md has the guarantees and their tests)
-----------------------------------------------------------------
*Pools.* One ``Pool`` (``sqlproxy.pool.state``, the pure lending rules) per (database, user)
pair, with at most ``pool.size`` server connections (``ServerConn``), opened as that user.

*Login.* A client authenticates against the server itself, on a fresh connection that takes a
pool slot (the pool closes an idle server to make room when full, so the total never exceeds
``pool.size``); once the server says ReadyForQuery, that connection joins the pool. When the
pool has learnt that the server trusts this user (the login needed no password), later
clients of the pair are answered by the proxy itself: AuthenticationOk, the server's
ParameterStatus, a proxy BackendKeyData and ReadyForQuery, without any server connection.
New pool connections are opened the same way (``routing.replica_login``: trust, the client's
recovered SCRAM keys or ``routing.passwords``).

*Lending.* The client's messages are cut into units (``routing.units``: one Query, or up to
Sync). A unit needs a server: the held one, else one checked out of the pool (waiting at most
``pool.max_wait_ms``, then SQLSTATE 53300 and the session stays usable). The server goes back
when nothing is owed (the client's ``Conversation`` has nothing pending, no unit is open past
a Flush), and ReadyForQuery said idle: transactions never span two servers.

*Prepared statements* (as PgBouncer >= 1.21): the client's named statements are kept per
client (``routing.replay.Replay``) and per server (``BackendReplay``, bounded by
``pool.max_prepared_per_server``, least recently used closed first); a unit that binds or
describes one the server lacks, or holds under that name with another text, gets the client's
Parse first as an injected unit whose answers are swallowed (``routing.answers``).

*Startup parameters* the client asked for (client_encoding, DateStyle, TimeZone,
application_name, extra_float_digits...) are SET on the server before the client's first
unit there, when the server holds others.

*Pinning.* Session state a pooled server cannot carry from one client to the next (LISTEN,
temporary tables, session advisory locks, WITH HOLD cursors, SQL PREPARE, SET or set_config
outside a transaction) pins the client to its server for the rest of its session; the server
is closed when the client leaves. The reason and the statement are reported.

*Never dirty.* A server left inside a transaction by a departed client is rolled back first
(reused only if the ROLLBACK ends idle without error); one left busy, pinned, or in an unknown
state is closed; one with a cancel request on its way goes back once the cancel has been
processed.

*Fast path.* Once ready, the session's common units and their answers are served in
compiled code (``fastpool.py``): this class is the general path, and owns what the fast path
reads (``held``, ``waiting``, ``pinned``... are the fast path's fields, through properties).

*Replicas.* With a router, a unit starting outside a transaction may borrow a server of a
replica pool instead (``poolroute.py``): the routed session's policy and read-your-writes.

*Analysis* stays per client: the client's own ``Conversation`` sees its units and the answers
delivered to it (never the injected ones), so statistics and findings are the same as in
session mode.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from sqlproxy.analysis.cache import StatementCache
from sqlproxy.errors import ConnectionFailure, ProtocolViolation, ProxyError
from sqlproxy.logs import get_logger
from sqlproxy.pool.auth import LoginServer
from sqlproxy.pool.report import PoolReporter
from sqlproxy.pool.state import OPEN, Handoff, Limits, Pool
from sqlproxy.proxy import poolroute
from sqlproxy.proxy.authquery import AuthQuery
from sqlproxy.proxy.connect import connect_backend
from sqlproxy.proxy.fastpool import (
    PooledClientPump,
    PooledListener,
    PooledRecorder,
    PooledServerPump,
    PoolFast,
    may_pin,
)
from sqlproxy.proxy.pooled_login import client_auth_message, proxy_login, session_ended
from sqlproxy.proxy.session import BackendConnection, ClientSession, SessionState
from sqlproxy.routing.answers import Answers, Kind
from sqlproxy.routing.policy import RoutedStatement, pin_reason
from sqlproxy.routing.replay import BackendReplay, Replay
from sqlproxy.routing.replica_login import ReplicaLogin
from sqlproxy.routing.scram import ScramKeys
from sqlproxy.routing.session_routing import SessionRouting
from sqlproxy.routing.units import Unit, UnitCutter
from sqlproxy.wire.conversation import Conversation, Pending
from sqlproxy.wire.frames import MAX_SERVER_MESSAGE, Frames, frame_end
from sqlproxy.wire.messages import (
    B_ERROR_RESPONSE,
    B_PARAMETER_STATUS,
    B_READY_FOR_QUERY,
    F_COPY_DATA,
    F_COPY_DONE,
    F_COPY_FAIL,
    F_FLUSH,
    F_TERMINATE,
    SYNC,
    TERMINATE,
    StartupMessage,
    backend_key_data,
    build,
    cstr,
    error_response,
    error_summary,
    ready_for_query,
    startup_message,
)

if TYPE_CHECKING:
    from sqlproxy.config import PoolSection
    from sqlproxy.proxy.server import ProxyServer
    from sqlproxy.routing.health import ReplicaState, Router

__all__ = ["PoolManager", "PooledSession", "ServerConn"]

log = get_logger("sqlproxy.pool")
_perf = time.perf_counter
_IDLE = 73  # 'I'
_COPY_MESSAGES = frozenset({F_COPY_DATA, F_COPY_DONE, F_COPY_FAIL})
#: Startup parameters that are not settings (or cannot be SET later).
_NOT_SETTINGS = frozenset({"user", "database", "replication", "options"})
#: Pooled sessions get PIDs from here up: above any Linux PID (at most 2**22), so a proxy PID
#: never names a real backend (see docs/reliability.md).
PROXY_PID_BASE = 1 << 30
_DEALLOCATE_RE = re.compile(r"(?i)\bdeallocate\s+(?:prepare\s+)?(?!all\b)(\"[^\"]+\"|\w+)")
_AUTH_OK = build(b"R", b"\x00\x00\x00\x00")
PARSE_COMPLETE = build(b"1", b"")
_ROLLBACK = build(b"Q", b"ROLLBACK\x00")


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _settings_sql(have: dict[str, str], want: dict[str, str]) -> str:
    """SET/RESET statements that turn a server's startup settings ``have`` into ``want``."""
    parts = [f"SET {k} = {_quote(v)}" for k, v in want.items() if have.get(k) != v]
    parts += [f"RESET {k}" for k in have if k not in want]
    return "; ".join(parts)


def limits_of(cfg: PoolSection) -> Limits:
    return Limits(size=cfg.size, min_idle=cfg.min_idle, max_wait_s=cfg.max_wait_ms / 1000.0,
                  idle_timeout_s=cfg.server_idle_timeout_s, lifetime_s=cfg.server_lifetime_s)


class ServerConn(asyncio.Protocol):
    """One pooled server connection: lent to one client at a time."""

    def __init__(self, pool: PoolIO, address: tuple[str, int]) -> None:
        self.pool = pool
        self.address = address
        # The transport's protocol once logged in: the holder's fast path first (fastpool).
        # It also keeps the fields the fast path reads on every unit (transport, answers,
        # replay, settings, closed, cancels, holder) as native attributes: the properties
        # below are the interpreted code's view of them.
        self.pump = PooledServerPump(self, Answers(replica=pool.replica is not None),
                                     BackendReplay())
        self.key: tuple[int, bytes] | None = None
        self.login: ReplicaLogin | None = None
        self.frames: Frames | None = None
        self.waiter: asyncio.Future[str | None] | None = None
        self.return_pending: PooledSession | None = None
        self.resetting: PooledSession | None = None  # rolling back for this departed client
        self._reset_buf = bytearray()
        self._reset_failed = False
        self.login_parameters: list[tuple[str, str]] = []
        self.id = pool.next_server_id()

    def __repr__(self) -> str:
        return f"ServerConn({self.id})"

    @property
    def holder(self) -> PooledSession | None:
        """The session this connection is lent to (its fast path hears the answers)."""
        holder: PooledSession | None = self.pump.holder
        return holder

    @holder.setter
    def holder(self, session: PooledSession | None) -> None:
        pump = self.pump
        pump.holder = session
        pump.fast = session.fast if session is not None else None

    @property
    def transport(self) -> asyncio.Transport | None:
        transport: asyncio.Transport | None = self.pump.transport
        return transport

    @transport.setter
    def transport(self, transport: asyncio.Transport | None) -> None:
        pump = self.pump
        pump.transport = transport
        pump.write = transport.write if transport is not None else None

    @property
    def answers(self) -> Answers:
        return self.pump.answers

    @property
    def replay(self) -> BackendReplay:
        replay: BackendReplay = self.pump.replay
        return replay

    @property
    def settings(self) -> dict[str, str]:
        """Startup parameters in force (never changed in place: replaced)."""
        return self.pump.settings

    @settings.setter
    def settings(self, settings: dict[str, str]) -> None:
        self.pump.settings = settings

    @property
    def closed(self) -> bool:
        return self.pump.closed

    @closed.setter
    def closed(self, closed: bool) -> None:
        self.pump.closed = closed

    @property
    def cancels(self) -> int:
        """Cancel requests on their way: not lent meanwhile."""
        return self.pump.cancels

    @cancels.setter
    def cancels(self, cancels: int) -> None:
        self.pump.cancels = cancels

    def go_hot(self) -> None:
        """Logged in: the fast path's pump reads the connection from now on."""
        t = self.transport
        if t is not None and not t.is_closing():
            t.set_protocol(self.pump)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        login = self.login
        if login is not None and not login.done:
            self._login_data(login, data)
            return
        holder = self.holder
        if holder is not None:
            holder.server_data(self, data)
            return
        if self.resetting is not None:
            self._reset_data(data)
            return
        # An idle server speaking: a shutdown FATAL, a notice. It is not anyone's; one that
        # sends an error is closing (or in a state we do not know): never lend it again.
        pos = 0
        while (end := frame_end(data, pos, MAX_SERVER_MESSAGE, "server message")) >= 0:
            if data[pos] == B_ERROR_RESPONSE:
                self.pool.discard(self, "server_error_while_idle")
                return
            pos = end

    def reset(self, session: PooledSession) -> None:
        """Roll back the transaction a departed client left open, then go back to the pool
        (see ``_reset_data``); lent to nobody meanwhile."""
        assert self.transport is not None
        self.resetting = session
        self._reset_buf = bytearray()
        self.transport.write(_ROLLBACK)

    def _reset_data(self, data: bytes) -> None:
        buf = self._reset_buf
        buf += data
        pos = 0
        while (end := frame_end(buf, pos, MAX_SERVER_MESSAGE, "server message")) >= 0:
            t = buf[pos]
            if t == B_ERROR_RESPONSE:
                self._reset_failed = True
            elif t == B_READY_FOR_QUERY:
                session = self.resetting
                assert session is not None
                self.resetting = None
                clean = buf[pos + 5] == _IDLE and not self._reset_failed
                del buf[:]
                self.pool.reset_done(session, self, clean)
                return
            pos = end
        del buf[:pos]

    def _login_data(self, login: ReplicaLogin, data: bytes) -> None:
        assert self.frames is not None
        try:
            messages = self.frames.feed(data)
        except ProtocolViolation as exc:
            self._login_done(str(exc))
            return
        for t, msg in messages:
            if t == B_PARAMETER_STATUS and not self.pool.parameters:
                k, _, v = msg[5:-1].partition(b"\x00")
                self.login_parameters.append((k.decode(), v.decode("utf-8", "replace")))
            reply = login.receive(t, msg)
            if reply and self.transport is not None:
                self.transport.write(reply)
            if login.problem is not None:
                self._login_done(login.problem)
                return
            if login.done:
                self.key = login.key
                if not self.pool.parameters:  # what the proxy tells clients it logs in
                    self.pool.parameters = self.login_parameters
                self._login_done(None)
                return

    def _login_done(self, problem: str | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(problem)

    def pause_writing(self) -> None:
        holder = self.holder
        if holder is not None and holder.client_transport is not None:
            holder.client_transport.pause_reading()

    def resume_writing(self) -> None:
        holder = self.holder
        t = holder.client_transport if holder is not None else None
        if t is not None and not t.is_closing():
            t.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._login_done(f"connection lost: {exc}" if exc else "connection closed")
        holder = self.holder
        owner = holder or self.resetting or self.return_pending
        self.holder = self.resetting = self.return_pending = None
        was_closed = self.closed
        self.closed = True
        if not was_closed or owner is not None:
            self.pool.lost(self, owner)
        if holder is not None:
            holder.server_lost(self, exc)

    # ------------------------------------------------------------------ helpers
    @property
    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        self.closed = True
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(TERMINATE)
            t.close()


class PoolIO:
    """One pool's I/O side: opens, lends (through ``Pool``) and closes its server
    connections."""

    def __init__(self, manager: PoolManager, database: str, user: str,
                 replica: ReplicaState | None = None) -> None:
        self.manager = manager
        self.server = manager.server
        self.database = database
        self.user = user
        self.replica = replica  # a replica's pool (poolroute.py), else the primary's
        self.state: Pool[ServerConn, PooledSession] = Pool(
            limits_of(manager.server.config.pool), time.monotonic())
        self.trusted = False  # a login needed no password: the proxy may answer logins
        self.parameters: list[tuple[str, str]] = []  # the server's ParameterStatus at login
        self.password: str | None = None
        # What a login checked by the proxy proved (pool.auth_user, see pooled_login.py):
        # how the proxy logs in as this user.
        self.scram_keys: ScramKeys | None = None
        self.md5_hash: str | None = None
        self.priming: asyncio.Task[str | None] | None = None
        self.pinned: dict[int, dict[str, Any]] = {}  # session id -> why
        self.clients = 0  # client sessions of this pair now
        self.clients_total = 0
        self.max_clients = 0
        self.max_clients_by_app: dict[str, int] = {}
        self._clients_by_app: dict[str, int] = {}
        self.errors_53300 = 0
        self.rolled_back = 0  # servers a departed client left in a transaction, rolled back
        self.fast_units = 0  # units the compiled fast path sent, of the clients gone
        # Parse messages that a server of this pool accepted: a client preparing one of these
        # outside a transaction is answered without a server (see PooledSession._prepare).
        self.known_parses: set[bytes] = set()
        # Kept up to date here (the fast path queues clients without asking).
        self.state.may_open = self.can_open

    @property
    def can_open(self) -> bool:
        """Whether the proxy can open a server connection as this user on its own (trust
        or a configured password); otherwise the pool grows only by its clients' logins."""
        return self.replica is not None or self.trusted or bool(
            self.password or self.scram_keys or self.md5_hash
            or self.server.config.routing.passwords.get(self.user))

    def next_server_id(self) -> int:
        self.manager.server_ids += 1
        return self.manager.server_ids

    # ------------------------------------------------------------------ clients
    def client_joined(self, app: str) -> None:
        self.clients += 1
        self.clients_total += 1
        self.max_clients = max(self.max_clients, self.clients)
        n = self._clients_by_app.get(app, 0) + 1
        self._clients_by_app[app] = n
        if n > self.max_clients_by_app.get(app, 0):
            self.max_clients_by_app[app] = n

    def client_left(self, app: str) -> None:
        self.clients -= 1
        n = self._clients_by_app.get(app, 1) - 1
        if n > 0:
            self._clients_by_app[app] = n
        else:
            self._clients_by_app.pop(app, None)

    # ------------------------------------------------------------------ lending
    def checkout(self, session: PooledSession) -> ServerConn | None:
        """A server for ``session`` now, or None: ``session.granted`` follows (or
        ``session.wait_timed_out``)."""
        if not self.state.idle:
            self.state.may_open = self.can_open
        got = self.state.checkout(session, time.monotonic(), session.application_name)
        if got is OPEN:
            session.waiting = True
            self._open_for(session)
            return None
        if got is None:
            session.waiting = True
            self.manager.ensure_ticking()
            return None
        assert isinstance(got, ServerConn)
        return got

    def checkin(self, session: PooledSession, server: ServerConn, clean: bool,
                reason: str = "dirty") -> None:
        server.holder = None
        if clean and server.cancels:
            server.return_pending = session  # back once the cancel has been processed
            return
        if clean and not server.usable:
            clean, reason = False, "server_closed"
        handoffs, close = self.state.checkin(server, time.monotonic(), session, clean=clean,
                                             reason=reason)
        if close:
            server.close()
        self.carry_out(handoffs)

    def reset_done(self, session: PooledSession, server: ServerConn, clean: bool) -> None:
        if clean:
            self.rolled_back += 1
        self.checkin(session, server, clean=clean, reason="rollback_failed")

    def cancel_done(self, server: ServerConn) -> None:
        server.cancels -= 1
        session = server.return_pending
        if server.cancels == 0 and session is not None:
            server.return_pending = None
            self.checkin(session, server, clean=True)

    def discard(self, server: ServerConn, reason: str) -> None:
        """Close ``server`` (idle or lent) for ``reason``."""
        if not server.closed:
            server.close()
            self.carry_out(self.state.remove(server, time.monotonic(), reason))

    def lost(self, server: ServerConn, owner: PooledSession | None) -> None:
        """The connection ``server`` is gone (closed by the server, or by us while lent):
        back to the pool's books, from ``owner`` if it was lent."""
        now = time.monotonic()
        if owner is None:
            self.carry_out(self.state.remove(server, now, "server_closed"))
            return
        handoffs, _ = self.state.checkin(server, now, owner, clean=False, reason="server_closed")
        self.carry_out(handoffs)

    def carry_out(self, handoffs: list[Handoff[ServerConn, PooledSession]]) -> None:
        for h in handoffs:
            if h.evict is not None:
                h.evict.close()
            session = h.client
            if session.state is SessionState.CLOSED:
                # Gone while waiting: give back what it was given.
                if h.server is OPEN:
                    self.carry_out(self.state.open_failed(session, time.monotonic()))
                else:
                    assert isinstance(h.server, ServerConn)
                    self.checkin(session, h.server, clean=True)
                continue
            session.waiting = False
            if h.server is OPEN:
                if session.login_waiting:
                    session.login_slot_granted()
                else:
                    self._open_for(session)
            else:
                assert isinstance(h.server, ServerConn)
                session.granted(h.server)

    # ------------------------------------------------------------------ opening
    def _open_for(self, session: PooledSession) -> None:
        self.server.track(asyncio.get_running_loop().create_task(self._open(session)))

    async def _open(self, session: PooledSession | None) -> None:
        cfg = self.server.config
        url = cfg.proxy.primary_url if self.replica is None else self.replica.url
        address = (url.host, url.port)
        conn = ServerConn(self, address)
        settings = session.settings if session is not None else {}
        params = {"user": self.user, "database": self.database, **settings}
        password = self.password or cfg.routing.passwords.get(self.user)
        keys = session.scram_keys if session is not None else None
        if password is None:
            keys = self.scram_keys or keys  # the latest proven (the password may change)
        conn.login = ReplicaLogin(self.user, password, keys,
                                  self.md5_hash if password is None and keys is None else None)
        conn.frames = Frames(MAX_SERVER_MESSAGE, "server message")
        conn.waiter = asyncio.get_running_loop().create_future()
        problem: str | None
        try:
            transport, _ = await connect_backend(self.server, url, lambda: conn,
                                                 cfg.proxy.connect_timeout)
            transport.write(startup_message(params))
            problem = await asyncio.wait_for(conn.waiter, cfg.proxy.connect_timeout)
        except (OSError, TimeoutError, ProxyError) as exc:
            problem = f"connection failed: {exc}"
        conn.login = None
        conn.frames = None
        now = time.monotonic()
        if problem is not None:
            conn.closed = True
            if conn.transport is not None:
                conn.transport.close()
            log.warning("pool_connect_failed", database=self.database, user=self.user,
                        reason=problem)
            if keys is not None and keys is self.scram_keys:
                self.scram_keys = None  # the password changed: the next login proves anew
            if self.md5_hash is not None and keys is None and password is None:
                self.md5_hash = None
            if session is None:
                self.carry_out(self.state.spare_failed(now))
                return
            self.carry_out(self.state.open_failed(session, now))
            if session.state is not SessionState.CLOSED:
                if self.replica is not None:
                    session.replica_open_failed(self, problem)
                else:
                    session.open_failed(problem)
            return
        conn.settings = settings
        conn.go_hot()
        if session is None:
            self.carry_out(self.state.spare_opened(conn, now))
            return
        self.state.opened(conn, now)
        if session.state is SessionState.CLOSED:
            self.checkin(session, conn, clean=True)
            return
        session.granted(conn)

    def adopt_login(self, session: PooledSession, backend: BackendConnection) -> ServerConn:
        """The connection ``session`` logged in on joins the pool (its slot was the login's)."""
        conn = ServerConn(self, backend.address)
        conn.transport = backend.transport
        conn.key = backend.key
        conn.settings = session.settings
        if backend.transport is not None:
            backend.transport.set_protocol(conn)
            conn.go_hot()
        self.state.opened(conn, time.monotonic())
        return conn

    # ------------------------------------------------------------------ time
    def tick(self, now: float) -> None:
        late, to_close = self.state.expire(now)
        for server in to_close:
            server.close()
        for session in late:
            session.wait_timed_out()
        for _ in range(self.state.spares_wanted()):
            if not self.can_open:
                break
            self.state.open_spare()
            self.server.track(asyncio.get_running_loop().create_task(self._open(None)))

    def close_all(self) -> None:
        for server in list(self.state.servers):
            server.close()

    # ------------------------------------------------------------------ figures
    def describe(self, now: float) -> dict[str, Any]:
        st = self.state
        stats = st.stats
        p50, p99 = st.wait_percentiles([0.5, 0.99])
        return {
            "database": self.database,
            "user": self.user,
            "backend": "primary" if self.replica is None else self.replica.name,
            "size": st.limits.size,
            "min_idle": st.limits.min_idle,
            "servers": len(st.servers),
            "opening": st.opening,
            "active": st.active,
            "idle": len(st.idle),
            "clients": self.clients,
            "clients_waiting": len(st.waiters),
            "max_clients": self.max_clients,
            "checkouts": stats.checkouts,
            "waits": stats.waits,
            "wait_timeouts": stats.wait_timeouts,
            "wait_total_ms": stats.wait_total_s * 1000,
            "max_waiting": stats.max_waiting,
            "wait_ms": {"max": stats.max_wait_s * 1000,
                        "p50": p50 * 1000, "p99": p99 * 1000},
            "max_active": stats.max_active,
            "all_busy_share": st.busy_share(now),
            "servers_opened": stats.opened,
            "open_failures": stats.open_failures,
            "servers_closed": dict(stats.closed),
            "rolled_back": self.rolled_back,
            "fast_units": self.fast_units + sum(
                s.fast.fast_units for s in self.server.sessions.values()
                if isinstance(s, PooledSession) and s.pool is self),
            "pinned_clients": list(self.pinned.values()),
            "max_active_by_application": dict(stats.max_active_by_app),
            "max_clients_by_application": dict(self.max_clients_by_app),
            "uptime_s": now - st.started,
        }


class PoolManager:
    """The pools of a server, by (database, user)."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.pools: dict[tuple[str, ...], PoolIO] = {}
        self.server_ids = 0
        self.pids = 0
        self.cache = StatementCache()  # statement shapes when the profiler is off
        # Statement texts known not to pin (the check costs a scan per unit otherwise).
        self.clean_texts: set[str] = set()
        # Clients' startup settings, one dict per distinct set (never changed in place): the
        # fast path finds a server's settings the client's own by identity, not by comparing.
        self._settings: dict[frozenset[tuple[str, str]], dict[str, str]] = {}
        self.clean_shapes: set[str] = set()  # normalized statements that pin nothing
        self._ticker: asyncio.Task[None] | None = None
        self.reporter = PoolReporter()  # the pools' findings into the profiler's store
        self.auth = AuthQuery(server)  # pool.auth_user: the verifiers, for proxy logins
        self._report_at = 0.0

    def shared_settings(self, settings: dict[str, str]) -> dict[str, str]:
        """``settings``, or the equal dict of an earlier client (bounded: past 1024 distinct
        sets, new ones are not shared)."""
        key = frozenset(settings.items())
        known = self._settings.get(key)
        if known is not None:
            return known
        if len(self._settings) < 1024:
            self._settings[key] = settings
        return settings

    def report_findings(self) -> None:
        """``pool_saturated`` / ``connection_churn`` into the findings (sqlproxy.pool.report)."""
        profiler = self.server.profiler
        if profiler is not None and self.pools:
            self.reporter.report(profiler.detector.findings, self.describe(), time.time())

    def pool(self, database: str, user: str) -> PoolIO:
        key = (database, user)
        p = self.pools.get(key)
        if p is None:
            p = self.pools[key] = PoolIO(self, database, user)
            self.ensure_ticking()
        return p

    def replica_pool(self, database: str, user: str, replica: ReplicaState) -> PoolIO:
        """The pool of ``replica``'s server connections for (database, user)."""
        key = (database, user, replica.name)
        p = self.pools.get(key)
        if p is None:
            p = self.pools[key] = PoolIO(self, database, user, replica)
            self.ensure_ticking()
        return p

    def next_pid(self) -> int:
        self.pids = (self.pids + 1) % ((1 << 31) - PROXY_PID_BASE)
        return PROXY_PID_BASE + self.pids

    def reconfigure(self, cfg: PoolSection) -> None:
        """A reloaded ``[pool]``: new limits apply to the next checkouts (servers beyond a
        smaller size close as they come back idle and time out)."""
        for p in self.pools.values():
            p.state.limits = limits_of(cfg)
            p.state.may_open = p.can_open  # (routing.passwords may have changed)

    def ensure_ticking(self) -> None:
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick_loop())

    async def _tick_loop(self) -> None:
        while True:
            cfg = self.server.config.pool
            await asyncio.sleep(max(0.01, min(0.25, cfg.max_wait_ms / 4000.0)))
            now = time.monotonic()
            for p in list(self.pools.values()):
                p.tick(now)
            if now >= self._report_at:
                self._report_at = now + 1.0
                self.report_findings()

    def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        for p in self.pools.values():
            p.close_all()
        self.auth.terminate()

    def describe(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [p.describe(now) for p in self.pools.values()]


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
        self.frames = Frames(self.config.proxy.max_message_bytes)
        self.cutter = UnitCutter()
        self.units: deque[Unit] = deque()
        self.replay = Replay()
        self.settings: dict[str, str] = {}
        self.scram_keys: ScramKeys | None = None
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
        self.replica_unit: Unit | None = None
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

    async def _connect_backend(self, msg: StartupMessage) -> None:
        pool = self.pool = self.manager.pool(msg.database, msg.user)
        self.settings = self.manager.shared_settings(
            {k: v for k, v in msg.parameters.items() if k not in _NOT_SETTINGS})
        pool.client_joined(msg.application_name)
        self._joined = True
        if "options" in msg.parameters or "replication" in msg.parameters:
            self.pinned = "startup options"  # cannot be SET later: keeps its login server
        if pool.trusted and self.pinned is None:
            self._local_login(pool)
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
            self._local_login(pool)
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

    def _client_auth_message(self, body: bytes) -> None:
        if self.login_server is not None:
            client_auth_message(self, body)

    _asked_password = False

    def _local_login(self, pool: PoolIO) -> None:
        """Answer the login ourselves: the server trusts this user (learnt from a login)."""
        out = bytearray(_AUTH_OK)
        app = self.settings.get("application_name", "")
        for k, v in pool.parameters:
            if k == "application_name":
                v = app
            elif k in self.settings and k in ("client_encoding", "DateStyle", "TimeZone"):
                v = self.settings[k]
            out += build(b"S", cstr(k) + cstr(v))
            self.parameters[k] = v
        self.proxy_key = self.server.register_cancel_key(self, self.manager.next_pid(), 4)
        out += backend_key_data(self.proxy_key[0], self.proxy_key[1])
        out += ready_for_query()
        t = self.client_transport
        if t is not None:
            t.write(bytes(out))
        self._start(b"")

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
        self._start(rest)

    def _start(self, rest: bytes) -> None:
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
            t.set_protocol(PooledClientPump(self, self.fast))  # type: ignore[arg-type]
            if self.router is not None:
                self.fast.enabled = False  # every unit is routed by the general path
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
        if pool is None or conv is None or conv.tx_status != _IDLE or conv.busy \
                or not unit.parses or unit.binds or unit.describes or unit.closes \
                or unit.queries or unit.unknown or unit.open or unit.describe_only:
            return False
        known = pool.known_parses
        if any(not name or msg not in known for name, _, msg in unit.parses):
            return False
        if len(unit.data) != sum(len(m) for _, _, m in unit.parses) + len(SYNC):
            return False  # something else in it
        for name, sql, msg in unit.parses:
            self.replay.statements[name] = (sql, msg)
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
        if not self.fast.send_parked(server):
            self.unpark()
            return
        self._pump()
        self._after()

    def unpark(self) -> None:
        """The unit the fast path parked while waiting needs the general path (settings or
        statements to replay on the server it got): it goes first, as a unit of its own."""
        data = self.fast.take_parked()
        cutter = UnitCutter()
        try:
            for t, msg in Frames(self.config.proxy.max_message_bytes).feed(data):
                unit = cutter.add(t, msg)
                if unit is not None:
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
            self._check_pin(unit)
        pre = b""
        injected = 0
        sql = "" if server.settings == self.settings else _settings_sql(server.settings,
                                                                          self.settings)
        if sql:
            pre = build(b"Q", cstr(sql))
            injected = 1
            server.settings = self.settings
        if unit.queries and self.replay.statements:
            self._deallocated(unit)
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
            unit.in_tx = self.conv is not None and self.conv.tx_status != _IDLE
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
        stmts = self._statements_nr(pending.sql) if pending.sql else []
        if server is not None and index < len(stmts):
            text = stmts[index][0].text
            if text.startswith(("deallocate", "discard")):
                # Gone from this server (the client's and maybe another's of that name).
                self.replay.forget_statements(text, server.replay, [server.replay])

    def _deallocated(self, unit: Unit) -> None:
        """A SQL DEALLOCATE of a statement the client prepared by protocol on another
        server: prepare it here first, so that the DEALLOCATE finds it."""
        for text in unit.queries:
            for m in _DEALLOCATE_RE.finditer(text):
                name = m.group(1).strip('"').encode()
                if name in self.replay.statements and name not in unit.describes:
                    unit.describes.append(name)

    # ------------------------------------------------------------------ pinning
    def _check_pin(self, unit: Unit) -> None:
        texts = list(unit.queries) + [sql for _, sql, _ in unit.parses]
        if not texts:
            return
        in_tx = self.conv is not None and self.conv.tx_status != _IDLE
        clean = self.manager.clean_texts
        for text in texts:
            if text in clean:  # seen before: pins nothing, in or out of a transaction
                continue
            if self._pin_text(text, in_tx):
                return
            if len(clean) >= 10_000:
                clean.clear()
            clean.add(text)

    def _pin_text(self, text: str, in_tx: bool) -> bool:
        """Pin the session if ``text`` holds a statement that pins (True if it did)."""
        if not may_pin(text):
            return False
        clean = self.manager.clean_shapes
        for n, shape in self._statements_nr(text):
            if n.text in clean:
                if shape.command == "begin":
                    in_tx = True
                continue
            st = RoutedStatement(n.text, shape, n.hints)
            reason = pin_reason(st)
            if reason is None and shape.kind.value == "set" \
                    and not n.text.startswith(("set local ", "set transaction ")):
                # A SET in a transaction block outlives its COMMIT too.
                reason = ("set in a transaction (kept after commit)" if in_tx
                          else "set outside a transaction")
            if reason is None and shape.command == "begin":
                in_tx = True
            if reason is not None:
                self._pin(reason, text)
                return True
            if len(clean) >= 10_000:
                clean.clear()
            clean.add(n.text)
        return False

    def statements_nr(self, sql: str) -> list[tuple[Any, Any]]:
        """The normalized statements of ``sql`` and their shapes."""
        return self._statements_nr(sql)

    def _statements_nr(self, sql: str) -> list[tuple[Any, Any]]:
        profiler = self.profiler
        if profiler is not None:
            return [(s.normalized, s.shape) for s in profiler.statements(self.info, sql)]
        cache = self.manager.cache
        return [(n, cache.shape(n)) for n in cache.scan(sql)]

    def _pin(self, reason: str, text: str) -> None:
        self.pinned = reason
        pool = self.pool
        if pool is not None:
            pool.pinned[self.id] = {"session": self.id, "client": self.peer,
                                    "application_name": self.application_name,
                                    "reason": reason, "statement": text[:1000],
                                    "since": time.time()}
        log.info("session_pinned", session=self.id, reason=reason, statement=text[:200])
        profiler = self.profiler
        if profiler is not None:
            note = getattr(profiler, "note_pool_pin", None)
            if note is not None:
                note(self.info, reason, text)

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
                known.update(self._parses_sent)
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
        if conv is None or conv.busy or conv.tx_status != _IDLE or server.answers.busy \
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
        if conv.busy or conv.tx_status != _IDLE or server.answers.busy or self._open_unit:
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
    def _give_back(self, leaving: str) -> None:
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
                if server.key is not None:
                    self.server.send_cancel(server.address, server.key)
                own.checkin(self, server, clean=False, reason=leaving)
            elif self.pinned is not None:
                own.checkin(self, server, clean=False, reason="pinned_client_left")
            elif conv is not None and not conv.busy and conv.tx_status != _IDLE \
                    and not self._open_unit and not server.answers.busy and server.usable \
                    and not server.cancels:
                # Gone inside a transaction, nothing running: roll it back, then reuse.
                server.holder = None
                server.reset(self)
            elif conv is None or conv.busy or conv.tx_status != _IDLE or self._open_unit \
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
        self._give_back("client_gone_in_transaction")
        super().connection_lost(exc)
        session_ended(self)  # a login the proxy was checking ends here

    def fail(self, exc: ProxyError, *, quiet: bool = False) -> None:
        if not self._closing:
            self._give_back("session_error")
        super().fail(exc, quiet=quiet)
        session_ended(self)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["backends"] = ["primary"] if self.held is not None else []
        out["pool"] = {"holds_server": self.held is not None, "waiting": self.waiting,
                       "pinned": self.pinned, "fast_units": self.fast.fast_units}
        return out
