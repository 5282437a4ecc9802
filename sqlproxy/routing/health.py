"""Replica health, lag and the read-your-writes horizon, probed in the background with asyncpg.

Every ``routing.health_interval_ms`` one *cycle* runs: it reads the primary's WAL insert
position, then each replica's replay position. A cycle number is taken when the cycle starts,
so a session that finished a write while cycle ``c`` was the latest started needs the primary
position of a cycle ``> c``: that one was read after the write, so it is at or past the write's
commit record. The session may read from a replica once that replica's replay position has
passed it (``lsn_after`` / ``choose``).

Lag in milliseconds is measured against the history of primary positions: a replica whose
replay position is behind has been behind at least since the first sample the primary had
past it. A replica that fails its probe, or lags more than ``max_replica_lag_ms``, leaves the
rotation and comes back by itself when a probe succeeds within the limit.

The function catalog (``pg_proc`` volatility, per database) is loaded here too, with the
proxy's own credentials from ``proxy.primary``.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from sqlproxy.analysis.cache import StatementCache
from sqlproxy.config import BackendURL, Config
from sqlproxy.logs import get_logger
from sqlproxy.routing.policy import FunctionPolicy
from sqlproxy.routing.scram import (
    ScramCapture,
    ScramError,
    ScramKeys,
    ScramVerifier,
    derive_keys,
)
from sqlproxy.routing.tables import TableHorizons, view_closure

__all__ = ["ReplicaState", "Router", "caught_up"]

log = get_logger("sqlproxy.routing")

_WAL_PAGE = 8192
_LONG_PAGE_HEADER = 40
_VOLATILITY_RANK = {"i": 0, "s": 1, "v": 2}
_LSN_SQL = "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint"
_REPLICA_SQL = (
    "SELECT pg_is_in_recovery(), (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint"
)
_AUTHID_SQL = "SELECT rolpassword FROM pg_catalog.pg_authid WHERE rolname = $1"
_RELATIONS_SQL = (
    "SELECT relname FROM pg_catalog.pg_class WHERE relkind IN ('r', 'p', 'v', 'm', 'f')"
)
#: (view, relation it reads) pairs from the views' rewrite rules.
_VIEW_DEPS_SQL = (
    "SELECT DISTINCT v.relname, t.relname FROM pg_catalog.pg_rewrite r "
    "JOIN pg_catalog.pg_class v ON v.oid = r.ev_class "
    "JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::regclass "
    "AND d.objid = r.oid AND d.refclassid = 'pg_catalog.pg_class'::regclass "
    "JOIN pg_catalog.pg_class t ON t.oid = d.refobjid "
    "WHERE t.oid <> v.oid AND v.relkind IN ('v', 'm')"
)
_CYCLE_HISTORY = 2048
_PROC_SQL = (
    "SELECT p.proname, n.nspname, p.provolatile FROM pg_catalog.pg_proc p "
    "JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace"
)


def caught_up(replay: int, target: int) -> bool:
    """Has a replica replayed everything up to ``target`` (a primary insert position)?

    The insert position right after a page header points past it, while replay stops at the
    end of the last record, before the header: count that as caught up.
    """
    if replay >= target:
        return True
    in_page = target % _WAL_PAGE
    return in_page <= _LONG_PAGE_HEADER and replay >= target - in_page


@dataclass
class ReplicaState:
    """One replica as the router sees it; also what the admin API shows."""

    name: str
    url: BackendURL
    healthy: bool = False  # in rotation; False until the first successful probe
    up: bool = False
    in_recovery: bool = False
    replay_lsn: int = 0
    lag_ms: float | None = None
    outstanding: int = 0  # units in flight on this replica, over all sessions
    routed: int = 0
    retried: int = 0
    failures: int = 0
    last_error: str | None = None
    last_probe: float = 0.0
    conn: Any = field(default=None, repr=False)

    def unit_started(self) -> None:
        """A session sent a unit here (least-outstanding balancing counts these)."""
        self.outstanding += 1
        self.routed += 1

    def unit_finished(self) -> None:
        self.outstanding -= 1

    def unit_retried(self) -> None:
        """A unit sent here was retried on the primary."""
        self.retried += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": "replica",
            "address": self.url.address,
            "healthy": self.healthy,
            "up": self.up,
            "in_recovery": self.in_recovery,
            "replay_lsn": _lsn_text(self.replay_lsn),
            "lag_ms": None if self.lag_ms is None else round(self.lag_ms, 1),
            "outstanding": self.outstanding,
            "routed": self.routed,
            "retried": self.retried,
            "failures": self.failures,
            "last_error": self.last_error,
            "last_probe": self.last_probe or None,
        }


def _lsn_text(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


class Router:
    """Shared routing state of one proxy: replicas, probes, function catalogs, counters."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.routing = config.routing
        self.primary_url = config.proxy.primary_url
        self.replicas = [
            ReplicaState(config.replica_name(i), BackendURL.parse(r.url))
            for i, r in enumerate(config.replicas)
        ]
        self.cache = StatementCache()  # when the profiler is off
        self.cycle_started = 0
        self.primary_cycle = 0
        self.primary_lsn = 0
        # The primary's position per cycle (ascending), for lsn_after.
        self._cycles: list[int] = []
        self._cycle_lsns: list[int] = []
        self.table_mode = config.routing.read_your_writes == "table"
        self._tables: dict[str, TableHorizons] = {}  # database -> table horizons
        self.primary_up = False
        self.primary_error: str | None = None
        self._history: deque[tuple[float, int]] = deque(maxlen=4096)
        self._primary_conn: Any = None
        self._task: asyncio.Task[None] | None = None
        self._rr = itertools.count()
        self._catalogs: dict[str, dict[str, str]] = {}
        self._policies: dict[str, FunctionPolicy] = {}
        self._loading: dict[str, float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.primary_routed = 0
        self.pinned_sessions = 0
        self.fallbacks = 0  # reads kept on the primary for want of a usable replica
        self._warned: set[str] = set()
        self._verifiers: dict[str, ScramVerifier] = {}  # user -> verifier on the primary
        self._verifier_reads: dict[str, asyncio.Task[ScramVerifier | None]] = {}

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        self.load_functions(self.primary_url.database or self.primary_url.user or "postgres")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for conn in (self._primary_conn, *(r.conn for r in self.replicas)):
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.terminate()

    async def _run(self) -> None:
        interval = self.routing.health_interval_ms / 1000
        while True:
            started = time.monotonic()
            try:
                await self.probe()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let the poller die
                log.warning("routing_probe_failed", error=str(exc))
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    def _timeout(self) -> float:
        return max(1.0, min(5.0, self.routing.health_interval_ms / 1000 * 5))

    async def _connect(self, url: BackendURL) -> Any:
        return await asyncio.wait_for(
            asyncpg.connect(url.dsn(), statement_cache_size=0, server_settings={
                "application_name": "sqlproxy-health"}),
            timeout=self.config.proxy.connect_timeout,
        )

    async def probe(self) -> None:
        """One cycle: the primary's position, then every replica's."""
        self.cycle_started += 1
        cycle = self.cycle_started
        try:
            if self._primary_conn is None or self._primary_conn.is_closed():
                self._primary_conn = await self._connect(self.primary_url)
            lsn = await self._primary_conn.fetchval(_LSN_SQL, timeout=self._timeout())
            self.primary_lsn = int(lsn)
            self.primary_cycle = cycle
            self.primary_up = True
            self.primary_error = None
            self._history.append((time.monotonic(), self.primary_lsn))
            self._cycles.append(cycle)
            self._cycle_lsns.append(self.primary_lsn)
            if len(self._cycles) > _CYCLE_HISTORY:
                del self._cycles[: _CYCLE_HISTORY // 2]
                del self._cycle_lsns[: _CYCLE_HISTORY // 2]
        except (OSError, asyncpg.PostgresError, TimeoutError, asyncpg.InterfaceError) as exc:
            self.primary_up = False
            self.primary_error = str(exc) or type(exc).__name__
            await self._drop(self._primary_conn)
            self._primary_conn = None
        await asyncio.gather(*(self._probe_replica(r) for r in self.replicas))
        if self._tables:
            for horizons in self._tables.values():
                horizons.prune(self._replayed_everywhere)

    def _replayed_everywhere(self, cycle: int) -> bool:
        lsn = self.lsn_after(cycle)
        return lsn is not None and all(caught_up(r.replay_lsn, lsn) for r in self.replicas)

    async def _probe_replica(self, rep: ReplicaState) -> None:
        rep.last_probe = time.time()
        try:
            if rep.conn is None or rep.conn.is_closed():
                rep.conn = await self._connect(rep.url)
            row = await rep.conn.fetchrow(_REPLICA_SQL, timeout=self._timeout())
        except (OSError, asyncpg.PostgresError, TimeoutError, asyncpg.InterfaceError) as exc:
            self.mark_down(rep, str(exc) or type(exc).__name__)
            await self._drop(rep.conn)
            rep.conn = None
            return
        assert row is not None
        rep.up = True
        rep.in_recovery = bool(row[0])
        rep.replay_lsn = int(row[1]) if row[1] is not None else 0
        rep.lag_ms = self._lag_ms(rep.replay_lsn)
        healthy = rep.in_recovery and rep.lag_ms <= self.routing.max_replica_lag_ms
        if healthy != rep.healthy:
            log.info("replica_rotation", replica=rep.name,
                     state="in" if healthy else "out", lag_ms=round(rep.lag_ms, 1),
                     in_recovery=rep.in_recovery)
        rep.healthy = healthy
        rep.last_error = None if rep.in_recovery else "not in recovery (promoted?)"

    def _lag_ms(self, replay: int) -> float:
        history = self._history
        if not history or caught_up(replay, history[-1][1]):
            return 0.0
        now = time.monotonic()
        behind_since = history[0][0]
        for t, lsn in reversed(history):
            if caught_up(replay, lsn):
                break
            behind_since = t
        return (now - behind_since) * 1000

    @staticmethod
    async def _drop(conn: Any) -> None:
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.terminate()

    def note_primary_unit(self) -> None:
        """A session sent a unit to the primary."""
        self.primary_routed += 1

    def note_fallback(self) -> None:
        """A read stayed on the primary for want of a usable (or fresh enough) replica."""
        self.fallbacks += 1

    def note_pinned(self) -> None:
        """A session was pinned to the primary for good."""
        self.pinned_sessions += 1

    def mark_down(self, rep: ReplicaState, error: str) -> None:
        """Out of rotation until a probe succeeds (a probe or a session saw it fail)."""
        if rep.healthy:
            log.warning("replica_rotation", replica=rep.name, state="out", error=error)
        rep.healthy = False
        rep.up = False
        rep.failures += 1
        rep.last_error = error

    # ------------------------------------------------------------------ decisions
    def horizon(self) -> int:
        """What a session that just finished a write must wait for (see ``lsn_after``)."""
        return self.cycle_started + 1

    def lsn_after(self, cycle: int) -> int | None:
        """The primary's position read in the first cycle >= ``cycle``; None if none yet."""
        if self.primary_cycle < cycle:
            return None
        i = bisect.bisect_left(self._cycles, cycle)
        return self._cycle_lsns[i] if i < len(self._cycles) else self.primary_lsn

    # ------------------------------------------------------------------ read_your_writes = table
    def note_writes(self, database: str, tables: frozenset[str] | set[str], cycle: int) -> None:
        """A session finished writing ``tables`` (see ``routing.tables``) at ``cycle``."""
        horizons = self._tables.get(database)
        if horizons is None:
            horizons = self._tables[database] = TableHorizons()
            self.load_functions(database)  # with the relation catalog
        horizons.note_writes(tables, cycle)

    def table_horizon(self, database: str, tables: tuple[str, ...] | frozenset[str]) -> int:
        """The cycle a read of ``tables`` must wait for in ``database`` (0: none)."""
        horizons = self._tables.get(database)
        if horizons is None or not horizons.written:
            return 0
        if horizons.relations is not None and any(
                t.rsplit(".", 1)[-1] not in horizons.relations for t in tables):
            self.load_functions(database)  # a relation created since: reload (<= 1/s)
        return horizons.horizon(tables)

    def choose(self, min_lsn: int | None, exclude: frozenset[str] = frozenset()
               ) -> ReplicaState | None:
        """A healthy replica past ``min_lsn``: least outstanding requests, or round robin."""
        candidates = [
            r for r in self.replicas
            if r.healthy and r.name not in exclude
            and (min_lsn is None or caught_up(r.replay_lsn, min_lsn))
        ]
        if not candidates:
            return None
        n = next(self._rr)
        if self.routing.balance == "round_robin":
            return candidates[n % len(candidates)]
        low = min(r.outstanding for r in candidates)
        best = [r for r in candidates if r.outstanding == low]
        return best[n % len(best)]

    def replica(self, name: str) -> ReplicaState | None:
        for r in self.replicas:
            if r.name == name:
                return r
        return None

    def warn_once(self, key: str, event: str, **fields: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(event, **fields)

    # ------------------------------------------------------------------ function catalog
    def functions(self, database: str) -> FunctionPolicy:
        policy = self._policies.get(database)
        if policy is None:
            policy = FunctionPolicy(self.routing.read_only_functions,
                                    self.routing.write_functions,
                                    self._catalogs.get(database, {}))
            self._policies[database] = policy
            if database not in self._catalogs:
                self.load_functions(database)
        return policy

    def catalog_loaded(self, database: str) -> bool:
        return database in self._catalogs

    def load_functions(self, database: str, min_interval: float = 1.0) -> None:
        """(Re)load ``pg_proc`` of ``database`` in the background, at most once a second."""
        now = time.monotonic()
        if now - self._loading.get(database, -1e9) < min_interval:
            return
        self._loading[database] = now
        task = asyncio.get_running_loop().create_task(self._load_functions(database))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _load_functions(self, database: str) -> None:
        try:
            conn = await asyncio.wait_for(
                asyncpg.connect(self.primary_url.dsn(database=database), statement_cache_size=0,
                                server_settings={"application_name": "sqlproxy-catalog"}),
                timeout=self.config.proxy.connect_timeout,
            )
            try:
                rows = await conn.fetch(_PROC_SQL, timeout=30)
                relations = views = None
                if self.table_mode:
                    relations = await conn.fetch(_RELATIONS_SQL, timeout=30)
                    views = await conn.fetch(_VIEW_DEPS_SQL, timeout=30)
            finally:
                await conn.close()
        except Exception as exc:
            self.warn_once(f"catalog:{database}", "routing_catalog_unavailable",
                           database=database, error=str(exc),
                           consequence="statements calling functions stay on the primary")
            return
        catalog: dict[str, str] = {}
        for name, schema, raw in rows:
            vol = raw.decode() if isinstance(raw, bytes) else str(raw)  # "char" comes as bytes
            for key in (name, f"{schema}.{name}"):
                old = catalog.get(key)
                if old is None or _VOLATILITY_RANK.get(vol, 2) > _VOLATILITY_RANK.get(old, 2):
                    catalog[key] = vol
        self._catalogs[database] = catalog
        if relations is not None and views is not None:
            horizons = self._tables.setdefault(database, TableHorizons())
            horizons.relations = frozenset(r[0] for r in relations)
            horizons.views = view_closure((v[0], v[1]) for v in views)
        self._policies[database] = FunctionPolicy(
            self.routing.read_only_functions, self.routing.write_functions, catalog)

    # ------------------------------------------------------------------ SCRAM pass-through
    async def scram_keys(self, user: str, capture: ScramCapture) -> ScramKeys | None:
        """The client key of ``user`` recovered from its exchange with the primary, using the
        verifier read from the primary's ``pg_authid`` (None, warned once, when impossible)."""
        try:
            salt_iterations = capture.salt_iterations
        except ScramError:
            return None
        verifier = self._verifiers.get(user)
        for attempt in range(2):
            if verifier is None or attempt or (verifier.salt, verifier.iterations) != \
                    salt_iterations:
                verifier = await self._read_verifier(user)
                if verifier is None:
                    return None
            try:
                return derive_keys(capture, verifier)
            except ScramError as exc:
                if attempt:
                    self.warn_once(f"scram:{user}", "scram_passthrough_failed", user=user,
                                   error=str(exc))
        return None

    async def _read_verifier(self, user: str) -> ScramVerifier | None:
        task = self._verifier_reads.get(user)
        if task is None:  # one read per user at a time, however many sessions ask
            task = asyncio.get_running_loop().create_task(self._fetch_verifier(user))
            self._verifier_reads[user] = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(lambda _: self._verifier_reads.pop(user, None))
        return await asyncio.shield(task)

    async def _fetch_verifier(self, user: str) -> ScramVerifier | None:
        url = self.primary_url
        try:
            conn = await asyncio.wait_for(
                asyncpg.connect(url.dsn(database=url.database or "postgres"),
                                statement_cache_size=0,
                                server_settings={"application_name": "sqlproxy-auth"}),
                timeout=self.config.proxy.connect_timeout,
            )
            try:
                text = await conn.fetchval(_AUTHID_SQL, user, timeout=10)
            finally:
                await conn.close()
            verifier = ScramVerifier.parse(str(text or ""))
        except (ScramError, OSError, TimeoutError, asyncpg.PostgresError,
                asyncpg.InterfaceError) as exc:
            self.warn_once(f"verifier:{user}", "scram_verifier_unavailable", user=user,
                           error=str(exc) or type(exc).__name__,
                           hint="proxy.primary needs a superuser to read pg_authid")
            self._verifiers.pop(user, None)
            return None
        self._verifiers[user] = verifier
        return verifier

    # ------------------------------------------------------------------ visibility
    def backends(self) -> list[dict[str, Any]]:
        primary = {
            "name": "primary",
            "role": "primary",
            "address": self.primary_url.address,
            "healthy": self.primary_up,
            "up": self.primary_up,
            "wal_lsn": _lsn_text(self.primary_lsn),
            "routed": self.primary_routed,
            "fallbacks": self.fallbacks,
            "pinned_sessions": self.pinned_sessions,
            "last_error": self.primary_error,
        }
        return [primary, *(r.to_dict() for r in self.replicas)]
