"""The result cache of one proxy process: rules, the catalog each database needs, the store
(in-process, or Redis through ``cache.remote``), invalidation and the counters.

``judge`` tells a session whether a unit may be cached and under which rule (memoized by the
unit's statement texts); ``invalidate`` drops what a committed write made stale. The catalog
(function volatility, relations, views, partitions) is read per database with asyncpg and the
proxy's own credentials (``proxy.primary``), in the background: until it is loaded nothing of
that database is cached, and it is read again after DDL and when a statement names a relation
it does not know.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg

from sqlproxy.analysis.cache import StatementCache
from sqlproxy.analysis.classify import Shape, StatementKind
from sqlproxy.cache.keys import CanonicalUnit
from sqlproxy.cache.policy import Catalog, Coverage, RuleSet, statement_problem
from sqlproxy.cache.store import ALL, Counters, LocalStore, Stats
from sqlproxy.config import Config
from sqlproxy.logs import get_logger
from sqlproxy.routing.policy import FunctionPolicy, RoutedStatement, pin_reason
from sqlproxy.routing.tables import view_closure, written_tables

if TYPE_CHECKING:
    from sqlproxy.cache.remote import RedisStore

__all__ = ["Plan", "ResultCache", "UnitWrites"]

log = get_logger("sqlproxy.cache")

_PROC_SQL = (
    "SELECT p.proname, n.nspname, p.provolatile FROM pg_catalog.pg_proc p "
    "JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace"
)
_RELATIONS_SQL = (
    "SELECT c.relname, c.relkind FROM pg_catalog.pg_class c "
    "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') "
    "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
    "AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'"
)
_VIEW_DEPS_SQL = (
    "SELECT DISTINCT v.relname, t.relname FROM pg_catalog.pg_rewrite r "
    "JOIN pg_catalog.pg_class v ON v.oid = r.ev_class "
    "JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::regclass "
    "AND d.objid = r.oid AND d.refclassid = 'pg_catalog.pg_class'::regclass "
    "JOIN pg_catalog.pg_class t ON t.oid = d.refobjid "
    "WHERE t.oid <> v.oid AND v.relkind IN ('v', 'm')"
)
_INHERITS_SQL = (
    "SELECT c.relname, p.relname FROM pg_catalog.pg_inherits i "
    "JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid "
    "JOIN pg_catalog.pg_class p ON p.oid = i.inhparent"
)
_VOLATILITY_RANK = {"i": 0, "s": 1, "v": 2}
_RELKIND_RANK = {"r": 0, "p": 0, "m": 1, "v": 1, "f": 2}
_K = StatementKind
_MAX_PLANS = 20_000
_ZERO = Counters()


@dataclass(frozen=True, slots=True)
class Plan:
    """A unit the cache covers: its rule, TTL, the relations its answer depends on."""

    coverage: Coverage
    tables: frozenset[str]
    fingerprint: str


@dataclass(frozen=True, slots=True)
class UnitWrites:
    """What a forwarded unit means for the cache."""

    tables: frozenset[str]  # written (ALL: unknown); empty for a read
    settings: tuple[str, ...]  # SET / RESET / set_config texts: they change the key
    session_state: bool  # a temporary table: the session is no longer cached
    ddl: bool  # the catalog must be read again after it commits
    reset: bool  # RESET ALL / DISCARD ALL: the session's settings are the defaults again


class ResultCache:
    """See the module docstring."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stats = Stats(max_fingerprints=config.analysis.max_fingerprints)
        self.store = LocalStore(config.cache.max_bytes, self.stats)
        self.rules = RuleSet(config.cache, config.routing.write_functions)
        self.statements = StatementCache()
        self.remote: RedisStore | None = None
        if config.cache.url is not None:
            from sqlproxy.cache.remote import RedisStore

            self.remote = RedisStore(config.cache, self.stats)
        self._catalogs: dict[str, Catalog] = {}
        self._policies: dict[str, FunctionPolicy] = {}
        self._loading: dict[str, float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._plans: OrderedDict[tuple[str, tuple[str, ...]], Plan | str] = OrderedDict()
        self._writes: OrderedDict[tuple[str, str], UnitWrites] = OrderedDict()
        self.invalidations = 0  # committed writes that dropped entries (or would have)
        self.not_cached: dict[str, int] = {}  # why covered units could not be cached
        self.catalog_errors = 0
        self.generation = 0  # bumped when plans may change (sessions' memos follow)
        #: Sessions' unit memos (proxy/cached.py), shared by sessions in the same context
        #: (database, user, settings, prepared statements); valid for ``memos_generation``.
        self.memos: dict[Any, dict[bytes, Any]] = {}
        self.memos_generation = 0
        self._expiry: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self.remote is not None:
            await self.remote.start(self._remote_invalidation)
        self._expiry = asyncio.get_running_loop().create_task(self._expire_loop())

    async def stop(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            await asyncio.gather(self._expiry, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.remote is not None:
            await self.remote.stop()

    def reconfigure(self, config: Config) -> None:
        """Rules, TTLs and sizes change live; entries stored under old rules stay until
        their TTL, eviction or invalidation."""
        self.config = config
        self.rules = RuleSet(config.cache, config.routing.write_functions)
        self.store.max_bytes = config.cache.max_bytes
        while self.store.bytes > self.store.max_bytes and len(self.store):
            self.store.expire(time.monotonic())
            if self.store.bytes > self.store.max_bytes:
                self.store.shrink_to(self.store.max_bytes)
        if self.remote is not None:
            self.remote.config = config.cache
        self._plans.clear()
        self.generation += 1
        self._policies.clear()

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.store.expire(time.monotonic())

    # ------------------------------------------------------------------ judging units
    def shapes(self, sql: str) -> list[tuple[str, str, Shape, frozenset[str]]]:
        """(fingerprint, normalized text, shape, hints) of each statement of ``sql``."""
        cache = self.statements
        return [(n.fingerprint, n.text, cache.shape(n), n.hints) for n in cache.scan(sql)]

    def judge(self, database: str, unit: CanonicalUnit) -> Plan | None:
        """The plan for a unit with a key, or None when it is not to be cached."""
        memo_key = (database, unit.sqls)
        plan = self._plans.get(memo_key)
        if plan is None:
            plan = self._judge(database, unit.sqls)
            if isinstance(plan, Plan) or plan != "catalog not loaded":
                self._plans[memo_key] = plan
                if len(self._plans) > _MAX_PLANS:
                    self._plans.popitem(last=False)
        return plan if isinstance(plan, Plan) else None

    def _judge(self, database: str, sqls: tuple[str, ...]) -> Plan | str:
        fingerprints: list[str] = []
        named: list[str] = []
        for sql in sqls:
            for fp, _, shape, _ in self.shapes(sql):
                fingerprints.append(fp)
                named.extend(shape.tables)
        if not fingerprints:
            return "no statement"
        coverage = self.rules.cover("\n".join(sqls), fingerprints, named)
        if coverage is None:
            return "no rule"
        catalog = self.catalog(database)
        if not catalog.loaded:
            return "catalog not loaded"
        tables: set[str] = set()
        for sql in sqls:
            for _, _, shape, _ in self.shapes(sql):
                problem = statement_problem(shape, catalog, self.rules.write_functions)
                if problem is None:
                    read, problem = catalog.read_set(shape.tables)
                    if problem is not None and problem.startswith("unknown relation"):
                        self.load_catalog(database)  # created since: read again
                    tables.update(read)
                if problem is not None:
                    self._not_cached(problem)
                    return problem
        return Plan(coverage, frozenset(tables), fingerprints[0])

    def _not_cached(self, why: str) -> None:
        key = why.split(" ", 1)[0] if why.startswith(("unknown", "volatile", "stable")) \
            else why
        self.not_cached[key] = self.not_cached.get(key, 0) + 1

    def writes(self, database: str, sqls: Iterable[str], known: bool) -> UnitWrites:
        """What a forwarded unit with these statement texts may write (``known`` False: a
        Bind of a statement the session never saw parsed, a FunctionCall: anything)."""
        if not known:
            return UnitWrites(frozenset({ALL}), (), False, False, False)
        texts = tuple(sqls)
        if len(texts) == 1:
            memo = self._writes.get((database, texts[0]))
            if memo is not None:
                return memo
        stmts: list[RoutedStatement] = []
        settings: list[str] = []
        session_state = ddl = reset = False
        for sql in texts:
            for _, text, shape, hints in self.shapes(sql):
                st = RoutedStatement(text, shape, hints)
                stmts.append(st)
                why = pin_reason(st)
                if (shape.kind is _K.SET and shape.command == "reset"
                        and text.endswith(" all")) or (
                        shape.kind is _K.UTILITY and shape.command == "discard"
                        and text.endswith(" all")):
                    reset = True  # back to the defaults: what came before no longer counts
                    settings.clear()
                elif shape.kind is _K.SET or (why is not None and why.startswith("function")):
                    settings.append(sql)
                if why == "temporary table":
                    session_state = True  # it may shadow a table: the key cannot tell
                if shape.kind is _K.DDL:
                    ddl = True
        written = written_tables(stmts, self.functions(database))
        out = UnitWrites(written, tuple(settings), session_state, ddl, reset)
        if len(texts) == 1:
            self._writes[(database, texts[0])] = out
            if len(self._writes) > _MAX_PLANS:
                self._writes.popitem(last=False)
        return out

    # ------------------------------------------------------------------ invalidation
    def affected(self, database: str, written: Iterable[str]) -> frozenset[str]:
        tables = set(written)
        if ALL in tables:
            return frozenset({ALL})
        return frozenset(self.catalog(database).affected(tables))

    def invalidate_local(self, database: str, tables: frozenset[str]) -> int:
        self.invalidations += 1
        return self.store.invalidate(database, tables)

    def _remote_invalidation(self, database: str, tables: frozenset[str]) -> None:
        """Another instance committed a write (Redis pub/sub): count it, and refuse stores
        of answers that were in flight (``LocalStore.may_store``)."""
        self.store.invalidate(database, tables)

    def committed(self, database: str, ddl: bool) -> None:
        if ddl:
            self._plans.clear()
            self.generation += 1
            self._writes.clear()
            self.load_catalog(database, min_interval=0.0)

    # ------------------------------------------------------------------ catalog
    def catalog(self, database: str) -> Catalog:
        cat = self._catalogs.get(database)
        if cat is None:
            cat = self._catalogs[database] = Catalog()
            self.load_catalog(database)
        return cat

    def functions(self, database: str) -> FunctionPolicy:
        policy = self._policies.get(database)
        if policy is None:
            cat = self.catalog(database)
            policy = FunctionPolicy((), self.config.routing.write_functions, cat.volatility)
            if cat.loaded:
                self._policies[database] = policy
        return policy

    def load_catalog(self, database: str, min_interval: float = 1.0) -> None:
        now = time.monotonic()
        if now - self._loading.get(database, -1e9) < min_interval:
            return
        self._loading[database] = now
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(self._load_catalog(database))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _load_catalog(self, database: str) -> None:
        url = self.config.proxy.primary_url
        try:
            conn = await asyncio.wait_for(
                asyncpg.connect(url.dsn(database=database), statement_cache_size=0,
                                server_settings={"application_name": "sqlproxy-cache"}),
                timeout=self.config.proxy.connect_timeout)
            try:
                procs = await conn.fetch(_PROC_SQL, timeout=30)
                rels = await conn.fetch(_RELATIONS_SQL, timeout=30)
                views = await conn.fetch(_VIEW_DEPS_SQL, timeout=30)
                inherits = await conn.fetch(_INHERITS_SQL, timeout=30)
            finally:
                await conn.close()
        except Exception as exc:
            self.catalog_errors += 1
            log.warning("cache_catalog_unavailable", database=database, error=str(exc),
                        consequence="nothing of this database is cached until it is read")
            return
        volatility: dict[str, str] = {}
        for name, schema, raw in procs:
            vol = raw.decode() if isinstance(raw, bytes) else str(raw)
            for key in (name, f"{schema}.{name}"):
                old = volatility.get(key)
                if old is None or _VOLATILITY_RANK.get(vol, 2) > _VOLATILITY_RANK.get(old, 2):
                    volatility[key] = vol
        relkinds: dict[str, str] = {}
        for name, raw in rels:
            kind = raw.decode() if isinstance(raw, bytes) else str(raw)
            old = relkinds.get(name)
            if old is None or _RELKIND_RANK.get(kind, 2) > _RELKIND_RANK.get(old, 2):
                relkinds[name] = kind
        # A write to a partition changes what its parents read, and a write through a parent
        # what its partitions read: the whole inheritance tree is one family.
        pairs = [(r[0], r[1]) for r in inherits]
        parents = view_closure(pairs + [(b, a) for a, b in pairs])
        self._catalogs[database] = Catalog(
            volatility, relkinds, view_closure((v[0], v[1]) for v in views), parents,
            loaded=True)
        self._policies.pop(database, None)
        self._plans.clear()
        self.generation += 1
        self._writes.clear()

    # ------------------------------------------------------------------ admin view
    def describe(self) -> dict[str, Any]:
        cfg = self.config.cache
        remote = None if self.remote is None else self.remote.describe()
        return {
            "enabled": True,
            "store": "redis" if self.remote is not None else "memory",
            "max_bytes": cfg.max_bytes,
            "max_entry_bytes": cfg.max_entry_bytes,
            "bytes": self.store.bytes if self.remote is None else None,
            "entries": len(self.store) if self.remote is None else None,
            "totals": self.stats.total.as_dict(),
            "rules": [
                {"rule": r.label, "fingerprint": r.fingerprint, "table": r.table,
                 "ttl_s": r.ttl_s, **self.stats.rules.get(r.label, _ZERO).as_dict()}
                for r in cfg.rules
            ] + ([{"rule": "hint", **self.stats.rules["hint"].as_dict()}]
                 if "hint" in self.stats.rules else []),
            "fingerprints": {fp: c.as_dict() for fp, c in self.stats.fingerprints.items()},
            "invalidating_commits": self.invalidations,
            "not_cached": dict(self.not_cached),
            "catalogs": sorted(d for d, c in self._catalogs.items() if c.loaded),
            "redis": remote,
            "consistency": (
                "writes through this proxy (any session, committed) invalidate the entries "
                "reading the tables they change before the COMMIT completes; writes that "
                "bypass the proxy (other clients, triggers into other tables, functions "
                "not known to the catalog are counted as writing everything) are bounded "
                "by each entry's TTL only"),
        }

