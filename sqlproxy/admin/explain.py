"""EXPLAIN a statement sqlproxy has seen, on the primary, and advise on the plan.

Safety first: the statement runs in a transaction that is always rolled back, with a
``statement_timeout``; without ANALYZE (the default) that transaction is READ ONLY, and
PostgreSQL plans a write without executing it. ANALYZE executes the statement, so it is only
done for statements the classifier proves read-only (still in a READ ONLY transaction, which
also stops a "read" that calls a writing function), or for writes when the request insists
*and* ``admin.allow_analyze_writes`` is on.

Which text is explained: the stored example. Without ``capture_parameters`` that is the
normalized text, whose literals are ``$n`` placeholders; with it, the first raw text seen. A
text with placeholders gets a *generic* plan — ``plan_cache_mode = force_generic_plan``, then
``PREPARE`` and ``EXPLAIN EXECUTE`` with NULLs (PostgreSQL 16's ``GENERIC_PLAN`` option does
not exist on 15) — which is what the planner does for a prepared statement without knowing the
values. It connects with the proxy's own credentials (``proxy.primary``) to the database the
statement was seen in, and takes the role of the user who ran it when it is allowed to, so
that ``search_path`` and permissions are theirs.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import asyncpg

from sqlproxy.admin.advice import TableInfo, advise, quote_ident, relations
from sqlproxy.admin.params import APIError
from sqlproxy.admin.source import AdminSource
from sqlproxy.analysis.classify import StatementKind, classify
from sqlproxy.analysis.stats import StatEntry
from sqlproxy.analysis.timefmt import iso
from sqlproxy.logs import get_logger

log = get_logger("sqlproxy.admin.explain")

STATEMENT_TIMEOUT_MS = 10_000
CONNECT_TIMEOUT = 5.0
EXPLAINABLE = frozenset({StatementKind.SELECT, StatementKind.INSERT, StatementKind.UPDATE,
                         StatementKind.DELETE, StatementKind.MERGE})
_PARAM = re.compile(r"\$(\d+)")
# `interval $1` is valid only with a string literal: a placeholder needs a cast instead.
_TYPED_PARAM = re.compile(
    r"\b(interval|date|time|timestamp|timestamptz|numeric|bigint|integer|int|smallint"
    r"|boolean|bool|uuid|json|jsonb|text|varchar|real|float)\s+\$(\d+)",
    re.IGNORECASE,
)

_TABLES_SQL = """
SELECT n.nspname, c.relname, c.reltuples::float8,
       ARRAY(SELECT a.attname::text FROM pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
       ARRAY(SELECT array_to_string(ARRAY(
                 SELECT coalesce(a.attname::text, '')
                 FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                 LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                 ORDER BY k.ord), ',')
             FROM pg_index i WHERE i.indrelid = c.oid AND i.indisvalid)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE (n.nspname, c.relname) IN (SELECT * FROM unnest($1::text[], $2::text[]))
"""


def _main_entry(entries: list[StatEntry]) -> StatEntry:
    return max(entries, key=lambda e: e.calls)


class Explainer:
    def __init__(self, source: AdminSource) -> None:
        self.source = source
        self.results: dict[str, dict[str, Any]] = {}  # latest result per fingerprint
        self.max_results = 500
        self.count = 0
        self._semaphore = asyncio.Semaphore(2)  # at most two EXPLAINs at a time

    def latest(self, fingerprint: str) -> dict[str, Any] | None:
        return self.results.get(fingerprint)

    async def explain(self, fingerprint: str, analyze: bool = False,
                      insist: bool = False) -> dict[str, Any]:
        profiler = self.source.profiler
        entries = profiler.stats.by_fingerprint(fingerprint) if profiler is not None else []
        if not entries:
            raise APIError(404, f"unknown fingerprint {fingerprint!r}", fingerprint=fingerprint)
        entry = _main_entry(entries)
        config = self.source.config
        capture = config.analysis.capture_parameters
        sql = entry.example.strip().rstrip(";").strip() or entry.query
        shape = classify(entry.query)
        if shape.kind not in EXPLAINABLE:
            raise APIError(400, f"cannot EXPLAIN a {shape.kind.value} statement "
                           f"({shape.command.upper()}); only SELECT, INSERT, UPDATE, DELETE "
                           "and MERGE have plans", fingerprint=fingerprint)
        nparams = max((int(m) for m in _PARAM.findall(sql)), default=0)
        generic = nparams > 0
        notes: list[str] = []
        read_only = not shape.writes
        if analyze and generic:
            notes.append("ANALYZE needs the parameter values, which were not captured "
                         "(analysis.capture_parameters): showing the generic plan")
            analyze = False
        if analyze and not read_only:
            if not insist:
                raise APIError(403, "ANALYZE executes the statement, and this one may write: "
                               'pass "insist": true (needs admin.allow_analyze_writes)',
                               fingerprint=fingerprint)
            if not config.admin.allow_analyze_writes:
                raise APIError(403, "ANALYZE of a statement that may write is disabled "
                               "(admin.allow_analyze_writes = false)", fingerprint=fingerprint)
        async with self._semaphore:
            try:
                plan, tables = await asyncio.wait_for(
                    self._run(entry.database, entry.user, sql, nparams, analyze,
                              readonly_tx=read_only or not analyze),
                    timeout=STATEMENT_TIMEOUT_MS / 1000 + CONNECT_TIMEOUT + 5,
                )
            except asyncpg.PostgresError as exc:
                sqlstate = getattr(exc, "sqlstate", None)
                raise APIError(422, f"EXPLAIN failed: {exc}", sqlstate=sqlstate,
                               fingerprint=fingerprint) from None
            except (OSError, TimeoutError, asyncpg.InterfaceError) as exc:
                raise APIError(502, f"could not reach the primary: {type(exc).__name__}: {exc}",
                               fingerprint=fingerprint) from None
        doc = plan[0] if isinstance(plan, list) and plan else {}
        result = {
            "fingerprint": fingerprint,
            "database": entry.database,
            "user": entry.user,
            "query": sql,
            "analyze": analyze,
            "generic_plan": generic,
            "parameters": "generic" if generic else ("captured" if capture else "none"),
            "plan": plan,
            "planning_ms": doc.get("Planning Time"),
            "execution_ms": doc.get("Execution Time"),
            "advice": advise(plan, tables),
            "notes": notes,
            "explained_at": iso(time.time()),
        }
        self._store(fingerprint, result)
        return result

    def _store(self, fingerprint: str, result: dict[str, Any]) -> None:
        self.count += 1
        self.results.pop(fingerprint, None)
        self.results[fingerprint] = result
        while len(self.results) > self.max_results:
            self.results.pop(next(iter(self.results)))

    async def _run(self, database: str, user: str, sql: str, nparams: int, analyze: bool,
                   readonly_tx: bool) -> tuple[Any, dict[tuple[str, str], TableInfo]]:
        url = self.source.config.proxy.primary_url
        conn = await asyncpg.connect(url.dsn(database=database), timeout=CONNECT_TIMEOUT,
                                     statement_cache_size=0,
                                     server_settings={"application_name": "sqlproxy-explain"})
        try:
            tx = conn.transaction(readonly=readonly_tx)
            await tx.start()
            try:
                await conn.execute(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}")
                if user and user != (url.user or "postgres"):
                    # The application's role, when we may: its search_path and permissions.
                    await conn.execute("SAVEPOINT sqlproxy_role")
                    try:
                        await conn.execute(f"SET LOCAL ROLE {quote_ident(user)}")
                    except asyncpg.PostgresError:
                        await conn.execute("ROLLBACK TO SAVEPOINT sqlproxy_role")
                options = "FORMAT JSON, VERBOSE" + (", ANALYZE, BUFFERS" if analyze else "")
                if nparams:
                    await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
                    body = _TYPED_PARAM.sub(r"$\2::\1", sql)
                    # fetch(), not execute(): the extended protocol refuses several statements.
                    await conn.fetch(f"PREPARE sqlproxy_explain AS {body}")
                    nulls = ", ".join(["NULL"] * nparams)
                    raw = await conn.fetchval(
                        f"EXPLAIN ({options}) EXECUTE sqlproxy_explain({nulls})")
                else:
                    raw = await conn.fetchval(f"EXPLAIN ({options}) {sql}")
                plan = json.loads(raw) if isinstance(raw, str) else raw
                rels = sorted(relations(plan))
                rows = await conn.fetch(_TABLES_SQL, [r[0] for r in rels], [r[1] for r in rels])
            finally:
                await tx.rollback()
        finally:
            await conn.close(timeout=CONNECT_TIMEOUT)
        tables = {
            (r[0], r[1]): TableInfo(
                r[0], r[1], float(r[2]), tuple(r[3]),
                tuple(tuple(c for c in ix.split(",")) for ix in r[4]),
            )
            for r in rows
        }
        return plan, tables


class AutoExplainer:
    """Explains slow fingerprints in the background when ``admin.auto_explain`` is on.

    Rate-limited: at most ``per_tick`` EXPLAINs every ``interval`` seconds, and each
    fingerprint at most once per ``ttl`` seconds. Never ANALYZE.
    """

    def __init__(self, source: AdminSource, explainer: Explainer, interval: float = 10.0,
                 per_tick: int = 1, ttl: float = 3600.0) -> None:
        self.source = source
        self.explainer = explainer
        self.interval = interval
        self.per_tick = per_tick
        self.ttl = ttl
        self.done: dict[str, float] = {}
        self._since = time.time()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self.source.config.admin.auto_explain:
                await self.tick()

    async def tick(self) -> int:
        profiler = self.source.profiler
        if profiler is None:
            return 0
        now = time.time()
        for fp, at in list(self.done.items()):
            if now - at > self.ttl:
                del self.done[fp]
        candidates: list[str] = []
        for item in profiler.slow.select(since=self._since):  # newest first
            if item.fingerprint not in self.done and item.fingerprint not in candidates:
                candidates.append(item.fingerprint)
        self._since = now
        explained = 0
        for fp in candidates[: self.per_tick]:
            self.done[fp] = now
            try:
                result = await self.explainer.explain(fp)
            except APIError as exc:
                log.info("auto_explain_skipped", fingerprint=fp, reason=exc.message)
                continue
            explained += 1
            log.info("auto_explain", fingerprint=fp, database=result["database"],
                     advice=[a.get("suggestion") for a in result["advice"]])
        return explained
