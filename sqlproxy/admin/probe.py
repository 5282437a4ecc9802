"""Is the primary reachable? A small asyncpg probe for ``/healthz`` and ``/api/backends``.

It keeps one connection (the proxy's own credentials from ``proxy.primary``) and runs
``SELECT 1`` on it; a failed check drops the connection and the next one reconnects. A server
that answers but refuses the probe's login (wrong password, no such role or database) *is*
reachable: the check passes and says why it could not log in. ``pg_isready`` reasons the same
way.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import asyncpg

from sqlproxy.analysis.timefmt import iso

# The server answered: it is up, it just did not let the probe in.
_LOGIN_REFUSED: tuple[type[BaseException], ...] = (
    asyncpg.InvalidPasswordError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
)


@dataclass(slots=True)
class ProbeStatus:
    healthy: bool | None = None  # None: not checked yet
    error: str | None = None
    checked_at: float | None = None
    latency_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy,
            "error": self.error,
            "checked_at": iso(self.checked_at) if self.checked_at is not None else None,
            "probe_ms": self.latency_ms,
        }


class PrimaryProbe:
    def __init__(self, dsn: str, timeout: float = 3.0, interval: float = 5.0) -> None:
        self.dsn = dsn
        self.timeout = timeout
        self.interval = interval
        self.status = ProbeStatus()
        self._conn: Any = None
        self._lock = asyncio.Lock()

    async def check(self, max_age: float = 0.0) -> ProbeStatus:
        """Check now, unless the last check is younger than ``max_age`` seconds."""
        async with self._lock:
            st = self.status
            if st.checked_at is not None and time.time() - st.checked_at < max_age:
                return st
            started = time.perf_counter()
            healthy, error = await self._check()
            self.status = ProbeStatus(healthy, error, time.time(),
                                      (time.perf_counter() - started) * 1000)
            return self.status

    async def _check(self) -> tuple[bool, str | None]:
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await asyncpg.connect(
                    self.dsn, timeout=self.timeout, statement_cache_size=0,
                    server_settings={"application_name": "sqlproxy-admin-probe"})
            await self._conn.fetchval("SELECT 1", timeout=self.timeout)
            return True, None
        except _LOGIN_REFUSED as exc:
            await self._drop()
            return True, f"reachable, but the probe could not log in: {exc}"
        except (OSError, TimeoutError, asyncpg.PostgresError,
                asyncpg.InterfaceError) as exc:
            await self._drop()
            return False, f"{type(exc).__name__}: {exc}"

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def run(self) -> None:
        """Check every ``interval`` seconds until cancelled."""
        while True:
            await self.check()
            await asyncio.sleep(self.interval)

    async def close(self) -> None:
        async with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), timeout=self.timeout)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                conn.terminate()
