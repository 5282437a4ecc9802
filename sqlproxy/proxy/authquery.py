"""``pool.auth_user``: the users' password verifiers, read from the server (as PgBouncer's
``auth_query``), for the pooled sessions that check their clients' logins themselves
(``sqlproxy.pool.auth``).

One connection as ``pool.auth_user`` (its password from ``routing.passwords``, or the one in
``proxy.primary`` when it is the same user) to ``pool.auth_dbname`` is kept open and runs
``pool.auth_query`` per login (one at a time): a changed or expired password takes effect at
the next login, and a `-C` workload costs one query per connection, not a server connection.
When the lookup fails (the role may not read ``pg_shadow``, the server is down), it is logged
once and the login goes through to the server as without ``auth_user``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import asyncpg

from sqlproxy.logs import get_logger

if TYPE_CHECKING:
    from sqlproxy.proxy.server import ProxyServer

__all__ = ["AuthQuery"]

log = get_logger("sqlproxy.pool")


class AuthQuery:
    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self._conn: Any = None
        self._key: tuple[Any, ...] = ()
        self._lock = asyncio.Lock()
        self._warned: set[str] = set()
        self.lookups = 0

    async def verifier(self, user: str) -> str | None:
        """``user``'s password verifier (``rolpassword``), or None: no such login role, no
        password, or the lookup failed (logged once per reason)."""
        cfg = self.server.config
        async with self._lock:
            for attempt in range(2):
                try:
                    conn = await self._connection()
                    value = await conn.fetchval(cfg.pool.auth_query, user,
                                                timeout=cfg.proxy.connect_timeout)
                    self.lookups += 1
                    return None if value is None else str(value)
                except (OSError, TimeoutError, ValueError, asyncpg.PostgresError,
                        asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError) as exc:
                    await self.close()
                    if attempt or not isinstance(exc, asyncpg.InterfaceError | OSError):
                        self._warn(type(exc).__name__, user=user,
                                   error=str(exc) or type(exc).__name__)
                        return None
        return None

    async def _connection(self) -> Any:
        cfg = self.server.config
        url = cfg.proxy.primary_url
        auth_user = cfg.pool.auth_user
        password = cfg.routing.passwords.get(auth_user)
        if password is None and auth_user == url.user:
            password = url.password
        database = cfg.pool.auth_dbname or url.database or "postgres"
        key = (url.host, url.port, auth_user, password, database)
        conn = self._conn
        if conn is not None and not conn.is_closed() and key == self._key:
            return conn
        await self.close()  # none yet, or made with settings since reloaded
        self._key = key
        self._conn = await asyncio.wait_for(
            asyncpg.connect(host=url.host, port=url.port, user=auth_user, password=password,
                            database=database, statement_cache_size=0,
                            server_settings={"application_name": "sqlproxy-auth"}),
            timeout=cfg.proxy.connect_timeout)
        return self._conn

    def _warn(self, why: str, **fields: Any) -> None:
        if why not in self._warned:
            self._warned.add(why)
            log.warning("pool_auth_query_failed", reason=why, auth_user=(
                self.server.config.pool.auth_user), consequence="logins go through to the "
                "server", **fields)

    def terminate(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), 5)
            except (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresError):
                conn.terminate()
