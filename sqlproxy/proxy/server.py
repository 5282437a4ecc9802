"""The listener: accepts clients, owns the cancel-key map and connection limits."""

from __future__ import annotations

import asyncio
import os
import resource
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlproxy.analysis.profiler import Profiler
from sqlproxy.cache.manager import ResultCache
from sqlproxy.config import Config, parse_hostport
from sqlproxy.errors import ProxyError, TooManyConnections
from sqlproxy.logs import get_logger
from sqlproxy.proxy.cached import CachedSession
from sqlproxy.proxy.listener import Listener
from sqlproxy.proxy.pooled import PooledSession
from sqlproxy.proxy.poolservers import PoolManager
from sqlproxy.proxy.routed import RoutedSession
from sqlproxy.proxy.session import ClientSession, SessionState
from sqlproxy.proxy.tls import client_context, server_context
from sqlproxy.routing.health import Router
from sqlproxy.wire.messages import TX_IDLE, cancel_request
from sqlproxy.workers.keys import secret_for, worker_of

if TYPE_CHECKING:
    from sqlproxy.workers.limits import SharedLimits

log = get_logger("sqlproxy.server")

# Passes a cancel request owned by another worker to it: (worker, pid, secret) -> the task.
ForeignCancel = Callable[[int, int, bytes], "asyncio.Task[None] | None"]


def ensure_fd_limit(need: int) -> int:
    """Raise the soft limit on open files towards ``need`` (a session holds up to four: client
    and server sockets, and their duplicates in the direct relay), within the hard limit.
    Returns the soft limit in force; logs once when it stays below ``need``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        want = need if hard == resource.RLIM_INFINITY else min(hard, need)
        if want > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
                soft = want
            except (ValueError, OSError):
                pass
        if soft < need:
            log.warning("fd_limit_low", limit=soft, needed=need,
                        hint="raise the open-files limit (ulimit -n, LimitNOFILE=) or lower "
                             "proxy.max_client_connections")
    return int(soft)


class ProxyServer:
    def __init__(self, config: Config, profiler: Profiler | None = None) -> None:
        self.config = config
        self.profiler = profiler
        self.sessions: dict[int, ClientSession] = {}
        self.cancel_keys: dict[tuple[int, bytes], ClientSession] = {}
        self._random_pool = bytearray()  # random bytes for cancel secrets (_random_bytes)
        self._next_id = 0
        self._server: asyncio.AbstractServer | None = None
        self._listener: Listener | None = None  # instead of _server when client TLS is on
        self.accepting = False
        self.host, self.port = parse_hostport(config.proxy.listen, "proxy.listen")
        self._tasks: set[asyncio.Task[None]] = set()
        # Admitted sessions (startup packet accepted), in total and per user / database:
        # counters, so that admission stays O(1) with thousands of clients.
        self.admitted = 0
        self.per_user: dict[str, int] = {}
        self.per_database: dict[str, int] = {}
        self.rejected = {"max_client_connections": 0, "max_connections_per_user": 0,
                         "max_connections_per_database": 0, "shutting_down": 0}
        self.timeouts = {"idle_client_timeout": 0, "idle_in_transaction_timeout": 0}
        self._sweeper: asyncio.Task[None] | None = None
        # TLS contexts: built once (a bad certificate is a startup error naming the key), and
        # again on reload, so a renewed certificate is picked up without a restart.
        self.tls_context: ssl.SSLContext | None = client_context(config.tls)
        self._backend_tls: dict[str, ssl.SSLContext | None] = {}
        # Read replicas: chosen once here, so that routing off leaves the plain session and
        # its hot path exactly as they are.
        self.router: Router | None = (
            Router(config) if config.routing.enabled and config.replicas else None
        )
        # Set by a worker process (sqlproxy.workers.worker) before start; None/False otherwise,
        # and then nothing below differs from a single process.
        self.worker: int | None = None
        self.reuse_port = False
        self.shared_limits: SharedLimits | None = None
        self.foreign_cancel: ForeignCancel | None = None
        # Transaction pooling: likewise chosen once (pool.mode needs a restart to change).
        self.pools: PoolManager | None = (
            PoolManager(self) if config.pool.mode == "transaction" else None
        )
        # The result cache: likewise chosen once (on when [cache] has a rule or enabled =
        # true; config validation refuses it with routing or transaction pooling).
        self.cache: ResultCache | None = ResultCache(config) if config.cache.active else None

    def backend_tls_context(self, mode: str) -> ssl.SSLContext | None:
        if mode not in self._backend_tls:
            self._backend_tls[mode] = server_context(mode, self.config.tls.ca_file)
        return self._backend_tls[mode]

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded configuration: limits and timeouts apply to new checks at once;
        sessions keep the per-session settings they started with. Raises ConfigError (and
        changes nothing) if the new TLS files cannot be loaded."""
        if config.tls != self.config.tls:
            self.tls_context = client_context(config.tls)
            self._backend_tls = {}
        if self.cache is not None and config.cache.active:
            self.cache.reconfigure(config)
        elif config.cache.active != (self.cache is not None):
            log.warning("config_reload_needs_restart", keys=["cache (turned on or off)"])
            config = config.model_copy(update={"cache": self.config.cache})
        self.config = config
        if self.pools is not None:
            self.pools.reconfigure(config.pool)

    def next_session_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ensure_fd_limit(4 * self.config.proxy.max_client_connections + 256)
        session_class: type[ClientSession] = (
            ClientSession if self.router is None else RoutedSession)
        if self.pools is not None:
            session_class = PooledSession  # (routes to pooled replicas with a router)
        if self.cache is not None:
            session_class = CachedSession
            await self.cache.start()
        if self.router is not None:
            await self.router.start()
        if self.tls_context is None:
            self._server = await loop.create_server(
                lambda: session_class(self), self.host, self.port, backlog=4096,
                reuse_address=True, reuse_port=self.reuse_port or None,
            )
            sock = self._server.sockets[0]
        else:
            # Clients may start TLS directly (sslnegotiation=direct): look at the first byte
            # before asyncio reads it (see listener.py). Without a certificate at start there
            # is no TLS to offer, and the plain server above is kept as it always was.
            self._listener = Listener(self, lambda: session_class(self))
            await self._listener.start(self.host, self.port, backlog=4096,
                                       reuse_port=self.reuse_port)
            sock = self._listener.sockets[0]
        self.port = sock.getsockname()[1]
        self.accepting = True
        self._sweeper = loop.create_task(self._sweep_loop())
        log.info("proxy_listening", listen=f"{self.host}:{self.port}",
                 primary=self.config.proxy.primary_url.address)

    async def stop(self, grace: float = 0.0) -> None:
        """Stop accepting, let sessions finish their transactions for up to ``grace`` seconds
        (idle ones are closed at once), then close whatever is left, with 57P01 like a
        PostgreSQL fast shutdown."""
        self.accepting = False
        if self._server is not None:
            self._server.close()
        if self._listener is not None:
            self._listener.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        drained = 0
        while self.sessions:
            for s in list(self.sessions.values()):
                conv = s.conv
                if s.state is SessionState.READY and conv is not None and not conv.busy \
                        and conv.tx_status == TX_IDLE:
                    drained += 1
                    s.fail(_shutdown_error(), quiet=True)
            if not self.sessions or loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
        forced = len(self.sessions)
        for s in list(self.sessions.values()):
            s.fail(_shutdown_error(), quiet=True)
            if s.client_transport is not None:
                s.client_transport.close()
            if s.backend is not None and s.backend.transport is not None:
                s.backend.transport.close()
        if drained or forced:
            log.info("sessions_drained", closed_idle=drained, closed_busy=forced)
        if self._server is not None:
            await self._server.wait_closed()
        if self._listener is not None:
            await self._listener.wait_closed()
        tasks = list(self._tasks)
        if tasks:  # let cancel requests for interrupted queries reach the server
            await asyncio.wait(tasks, timeout=2.0)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.router is not None:
            await self.router.stop()
        if self.pools is not None:
            self.pools.close()
        if self.cache is not None:
            await self.cache.stop()

    # ------------------------------------------------------------------ idle timeouts
    async def _sweep_loop(self) -> None:
        """A periodic sweep over sessions for the idle timeouts: nothing on the per-message path.

        Each session's idle time is measured from the end of its last statement (kept by the
        conversation anyway), so the sweep's period only bounds how late a timeout fires.
        """
        while True:
            cfg = self.config.proxy
            limits = [t for t in (cfg.idle_client_timeout, cfg.idle_in_transaction_timeout) if t]
            await asyncio.sleep(max(0.05, min([t / 4 for t in limits] + [1.0])))
            if limits:
                self.sweep(time.perf_counter())

    def sweep(self, now: float) -> None:
        cfg = self.config.proxy
        idle_limit = cfg.idle_client_timeout
        tx_limit = cfg.idle_in_transaction_timeout
        for s in list(self.sessions.values()):
            conv = s.conv
            if s.state is not SessionState.READY or conv is None or conv.busy:
                continue
            if conv.receiving:
                continue  # a message is arriving
            idle = now - max(conv.last_end, s.ready_at)
            if conv.tx_status == TX_IDLE:
                if idle_limit and idle >= idle_limit:
                    self._time_out(s, "idle_client_timeout", idle, idle_limit, "57P05",
                                   "idle-session timeout")
            elif tx_limit and idle >= tx_limit:
                self._time_out(s, "idle_in_transaction_timeout", idle, tx_limit, "25P03",
                               "idle-in-transaction timeout")

    def _time_out(self, s: ClientSession, key: str, idle: float, limit: float, sqlstate: str,
                  what: str) -> None:
        """End a session idle past ``proxy.<key>``: count it, log it, tell the client."""
        self.timeouts[key] += 1
        log.warning(key, session=s.id, client=s.peer, user=s.user, database=s.database,
                    idle_s=round(idle, 3))
        s.fail(ProxyError(f"terminating connection due to {what}", sqlstate=sqlstate,
                          detail=f"proxy.{key} is {limit:g} s"), quiet=True)

    # ------------------------------------------------------------------ limits
    def admit(self, session: ClientSession) -> ProxyError | None:
        """Check the connection limits for a session whose startup packet just arrived; count
        it if admitted (``session_closed`` uncounts it)."""
        cfg = self.config.proxy
        st = session.startup
        assert st is not None
        problem: ProxyError | None = None
        key = ""
        if not self.accepting:
            key = "shutting_down"
            problem = ProxyError("the database system is shutting down", sqlstate="57P03",
                                 detail="sqlproxy is draining its sessions")
        elif self.shared_limits is not None:
            key = self.shared_limits.admit(st.user, st.database, cfg.max_client_connections,
                                           cfg.max_connections_per_user,
                                           cfg.max_connections_per_database) or ""
            if key:
                problem = self._limit_error(key, st.user, st.database)
        elif self.admitted >= cfg.max_client_connections:
            key = "max_client_connections"
            problem = TooManyConnections(
                "sorry, too many clients already",
                detail=f"proxy.max_client_connections is {cfg.max_client_connections}",
            )
        elif cfg.max_connections_per_user and \
                self.per_user.get(st.user, 0) >= cfg.max_connections_per_user:
            key = "max_connections_per_user"
            problem = TooManyConnections(
                f'too many connections for role "{st.user}"',
                detail=f"proxy.max_connections_per_user is {cfg.max_connections_per_user}",
            )
        elif cfg.max_connections_per_database and \
                self.per_database.get(st.database, 0) >= cfg.max_connections_per_database:
            key = "max_connections_per_database"
            problem = TooManyConnections(
                f'too many connections for database "{st.database}"',
                detail="proxy.max_connections_per_database is "
                f"{cfg.max_connections_per_database}",
            )
        if problem is not None:
            self.rejected[key] += 1
            log.warning("connection_rejected", limit=key, client=session.peer, user=st.user,
                        database=st.database, sqlstate=problem.sqlstate)
            return problem
        session.admitted = True
        self.admitted += 1
        self.per_user[st.user] = self.per_user.get(st.user, 0) + 1
        self.per_database[st.database] = self.per_database.get(st.database, 0) + 1
        return None

    def _limit_error(self, key: str, user: str, database: str) -> ProxyError:
        """The error for a limit the machine-wide counts refused (as the ones below say)."""
        cfg = self.config.proxy
        if key == "max_connections_per_user":
            return TooManyConnections(
                f'too many connections for role "{user}"',
                detail=f"proxy.max_connections_per_user is {cfg.max_connections_per_user} "
                "(for all workers)")
        if key == "max_connections_per_database":
            return TooManyConnections(
                f'too many connections for database "{database}"',
                detail="proxy.max_connections_per_database is "
                f"{cfg.max_connections_per_database} (for all workers)")
        return TooManyConnections(
            "sorry, too many clients already",
            detail=f"proxy.max_client_connections is {cfg.max_client_connections} "
            "(for all workers)")

    def session_closed(self, session: ClientSession) -> None:
        self.sessions.pop(session.id, None)
        if session.proxy_key is not None:
            self.cancel_keys.pop(session.proxy_key, None)
        if session.admitted:
            session.admitted = False
            self.admitted -= 1
            st = session.startup
            if st is not None:
                _decrement(self.per_user, st.user)
                _decrement(self.per_database, st.database)
                if self.shared_limits is not None:
                    self.shared_limits.release(st.user, st.database)

    # ------------------------------------------------------------------ cancellation
    def _random_bytes(self, n: int) -> bytes:
        """``n`` bytes from the system's random source, drawn 4 KiB at a time (a system call
        per connection shows when clients connect per request)."""
        pool = self._random_pool
        if len(pool) < n:
            pool += os.urandom(4096 + n)
        out = bytes(pool[:n])
        del pool[:n]
        return out

    def register_cancel_key(self, session: ClientSession, pid: int,
                            secret_len: int) -> tuple[int, bytes]:
        """The BackendKeyData a client is given: its server backend's real ``pid`` (so that the
        driver's PID agrees with ``pg_backend_pid()``, ``pg_stat_activity`` and
        NotificationResponse) with a secret of our own, so that its cancel requests come to
        us and are routed by us. The secret is as long as the server's (protocol 3.2 allows
        up to 256 bytes), at least 4. A worker's secrets begin with its index (see
        ``sqlproxy.workers.keys``)."""
        while True:
            key = (pid, self._random_bytes(max(4, secret_len)) if self.worker is None
                   else secret_for(self.worker, secret_len))
            if key not in self.cancel_keys:
                self.cancel_keys[key] = session
                return key

    def forward_cancel(self, pid: int, secret: bytes) -> asyncio.Task[None] | None:
        """Pass a client's CancelRequest on to the server connection its session uses now.
        Returns the task sending it (None if nothing was sent): the caller keeps the client's
        cancel connection open until it is done, as PostgreSQL closes that connection only
        once the cancel is processed. A client that waits for that close before its next
        query (asyncpg does) must not have the next query hit by a late cancel."""
        if self.worker is not None and self.foreign_cancel is not None:
            owner = worker_of(secret)
            if owner is not None and owner != self.worker:
                log.info("cancel_request_foreign", pid=pid, worker=owner)
                return self.foreign_cancel(owner, pid, secret)
        session = self.cancel_keys.get((pid, secret))
        if session is None:
            log.info("cancel_request_unknown_key", pid=pid)
            return None
        log.info("cancel_request", session=session.id)
        return session.cancel_backend_query()

    def send_cancel(self, address: tuple[str, int], key: tuple[int, bytes]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._send_cancel(address, key))
        self.track(task)
        return task

    def track(self, task: asyncio.Task[None]) -> None:
        """Keep a background task of a session's until it ends (shutdown waits for them)."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_cancel(self, address: tuple[str, int], key: tuple[int, bytes]) -> None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(address[0], address[1]),
                timeout=self.config.proxy.connect_timeout,
            )
            writer.write(cancel_request(key[0], key[1]))
            await writer.drain()
            # The server closes the connection once it has processed the request.
            await asyncio.wait_for(reader.read(), timeout=self.config.proxy.connect_timeout)
            writer.close()
        except (TimeoutError, OSError) as exc:
            log.warning("cancel_failed", backend=f"{address[0]}:{address[1]}", error=str(exc))


def _decrement(counts: dict[str, int], key: str) -> None:
    n = counts.get(key, 0) - 1
    if n > 0:
        counts[key] = n
    else:
        counts.pop(key, None)


def _shutdown_error() -> ProxyError:
    return ProxyError("terminating connection due to administrator command", sqlstate="57P01",
                      detail="sqlproxy is shutting down")
