"""The server side of transaction pooling: a pooled server connection (``ServerConn``), a
pool's IO around its sans-IO state (``PoolIO`` over ``pool.state.Pool``: opening, lending,
check-in, reset, hand-overs) and the pools of a proxy (``PoolManager``). The client side,
``PooledSession``, is ``proxy.pooled``; the compiled common case is ``proxy.fastpool``.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from sqlproxy.analysis.cache import StatementCache
from sqlproxy.errors import ProtocolViolation, ProxyError
from sqlproxy.logs import get_logger
from sqlproxy.pool.report import PoolReporter
from sqlproxy.pool.state import OPEN, Handoff, Limits, Pool
from sqlproxy.proxy.authquery import AuthQuery
from sqlproxy.proxy.connect import connect_backend
from sqlproxy.proxy.fastpool import (
    PooledServerPump,
)
from sqlproxy.proxy.session import BackendConnection, SessionState
from sqlproxy.routing.answers import Answers
from sqlproxy.routing.replay import BackendReplay
from sqlproxy.routing.replica_login import ReplicaLogin
from sqlproxy.routing.scram import ScramKeys
from sqlproxy.wire.frames import MAX_SERVER_MESSAGE, Frames, frame_end
from sqlproxy.wire.messages import (
    B_ERROR_RESPONSE,
    B_PARAMETER_STATUS,
    B_READY_FOR_QUERY,
    TERMINATE,
    TX_IDLE,
    build,
    startup_message,
)

if TYPE_CHECKING:
    from sqlproxy.config import PoolSection
    from sqlproxy.proxy.pooled import PooledSession
    from sqlproxy.proxy.server import ProxyServer
    from sqlproxy.routing.health import ReplicaState


__all__ = ["PoolIO", "PoolManager", "ServerConn", "limits_of", "settings_sql"]

log = get_logger("sqlproxy.pool")
#: Pooled sessions get PIDs from here up: above any Linux PID (at most 2**22), so a proxy PID
#: never names a real backend (see docs/reliability.md).
PROXY_PID_BASE = 1 << 30
_ROLLBACK = build(b"Q", b"ROLLBACK\x00")


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def settings_sql(have: dict[str, str], want: dict[str, str]) -> str:
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
        self.pump.transport = transport

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
            if self.pool.server.config.proxy.direct_relay:
                try:
                    self.pump.start_direct(asyncio.get_running_loop())
                except Exception as exc:  # e.g. out of descriptors: the transport carries on
                    log.warning("direct_relay_unavailable", server=self.id,
                                error=f"{type(exc).__name__}: {exc}")

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
                clean = buf[pos + 5] == TX_IDLE and not self._reset_failed
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
        if holder is not None:
            holder.pause_client_reading()

    def resume_writing(self) -> None:
        holder = self.holder
        if holder is not None:
            holder.resume_client_reading()

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
        # Each maps to its first copy: the clients' statements share it, so the fast path
        # finds a server's statement the same as a client's by identity, not by comparing.
        self.known_parses: dict[bytes, bytes] = {}
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
        if session._paused_server is server:  # its client's backpressure ends with the loan
            session.resume_server()
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
        from sqlproxy.proxy import pooled  # the client side, which imports this module

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
                if isinstance(s, pooled.PooledSession) and s.pool is self),
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
