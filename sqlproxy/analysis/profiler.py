"""The profiler: turns each completed execution into statistics, slow-log entries and
pattern-detector input. Pure bookkeeping; the proxy calls ``record`` from its event loop.

Cost per execution matters (see DESIGN.md, "The hot path"): a statement text seen before on a
session is found in that session's memo (one dict lookup on a ``str`` whose hash is cached),
which already holds its normalized form, its classification and its statistics entry. Only new
texts go through the literal scanner, and only new shapes through sqlglot.

Tagged statements (sqlcommenter / query log tags in edge comments, see tags.py) are never in
the memo — their comments make each text unique — so ``_find`` sees every one of them and says
so (``self.tagged``); only then are the tags read, and the execution takes ``_record_tagged``:
statistics per endpoint, per-request pattern detection, the optional span export. An untagged
execution pays nothing for any of it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Final

from sqlproxy.analysis.bindparams import bound_integer, bound_texts, offset_parameter
from sqlproxy.analysis.cache import (
    StatementCache,
    literal_slot,
    literal_values,
    skeleton_literal,
    skeleton_literal_bytes,
    skeleton_prefix,
    skeleton_scan,
    strip_edge_comments,
)
from sqlproxy.analysis.churn import ChurnMeter, churn_fingerprint
from sqlproxy.analysis.detector import PatternDetector
from sqlproxy.analysis.endpoints import EndpointStore
from sqlproxy.analysis.findings import CONNECTION_CHURN, SESSION_STATE_IN_POOL
from sqlproxy.analysis.slowlog import SlowLog, SlowQuery
from sqlproxy.analysis.statement import SessionInfo, Statement
from sqlproxy.analysis.stats import StatEntry, StatsStore, TransactionStats
from sqlproxy.analysis.tags import TagReader
from sqlproxy.analysis.windows import Windows
from sqlproxy.config import AnalysisSection
from sqlproxy.wire.requests import Pending

__all__ = ["MEMO_LIMIT", "Profiler", "SessionInfo", "Statement"]

MEMO_LIMIT: Final = 1024  # distinct statement texts remembered per session


class Profiler:
    def __init__(self, config: AnalysisSection, log: Any = None) -> None:
        self.config = config
        self.cache = StatementCache()
        self.stats = StatsStore(config.max_fingerprints)
        self.slow = SlowLog(config.slow_log_size)
        self.transactions: dict[tuple[str, str], TransactionStats] = {}
        self.log = log
        # perf_counter -> wall clock, fixed once: one addition per record instead of a call.
        self.wall_offset = time.time() - time.perf_counter()
        self.executions = 0
        self._offset_params: dict[str, int] = {}  # SQL text -> its OFFSET $n number, or -1
        self.started_at = time.time()
        # Pattern detection: one detector per session, findings aggregated (issue #4).
        self.detector = PatternDetector(config, log, self.wall_offset)
        self.detectors = self.detector.connections
        # Per-fingerprint time windows (regressions), closed by a background task's tick().
        self.windows = Windows(config, self.detector.findings, log)
        # The settings read on every execution, as native fields (the config is a pydantic
        # model: reading it is a Python attribute lookup).
        self.slow_seconds = config.slow_query_ms / 1000.0
        self.capture_parameters = config.capture_parameters
        self.matched = ""  # set by _find (see there)
        self.tagged = False  # set by _find: the text has edge comments (maybe tags)
        self.tags = TagReader(frozenset(k.lower() for k in config.tag_keys))
        self.endpoints = EndpointStore(config.max_routes)
        # Called with (tags, statement, session, started, ended, rows, sqlstate, wall offset)
        # for each traced statement when OpenTelemetry export is on (sqlproxy.otel); None: off.
        self.span_sink: Any = None
        self.churn = ChurnMeter()  # connect-per-request applications (connection_churn)

    def configure(self, config: AnalysisSection) -> None:
        """Apply a reloaded [analysis] section (thresholds change live)."""
        self.config = config
        self.stats.max_entries = config.max_fingerprints
        self.slow_seconds = config.slow_query_ms / 1000.0
        self.capture_parameters = config.capture_parameters
        self.tags.configure(frozenset(k.lower() for k in config.tag_keys))
        self.endpoints.max_entries = config.max_routes
        self.windows.configure(config)
        self.detector.configure(config)

    # ------------------------------------------------------------------ hot path
    def statements(self, ctx: SessionInfo, sql: str) -> list[Statement]:
        """The statements of ``sql`` on the session (a text matched by its skeleton gives the
        skeleton's statement, whose ``values`` are those of the first such text)."""
        stmts = ctx.memo.get(sql)
        if stmts is None:
            stmts = self._find(ctx, sql)
        return stmts

    def _find(self, ctx: SessionInfo, sql: str) -> list[Statement]:
        """``statements`` for a text not in the session's memo. Sets ``self.matched`` to the
        text when its skeleton found the statement (its literals are its own), else to ""."""
        self.matched = ""
        memo = ctx.memo
        # A text not seen on this session. If it differs from one seen before only in plain
        # literals (a simple-protocol client inlining values), its skeleton finds the
        # statement without the full scanner, and the one-off text stays out of the memo.
        prefix = ctx.skeleton_prefix
        if len(prefix) > 0 and sql.startswith(prefix):
            skel = skeleton_scan(sql, len(prefix) - 1)  # "": the text holds a comment
        else:
            skel = skeleton_scan(sql)
            if skel is not None and skel != "":
                ctx.skeleton_prefix = skeleton_prefix(skel)
        if skel == "" or (skel is None and "/*" in sql):
            # Tag comments that make every text unique (sqlcommenter's traceparent, query log
            # tags): the statement without them is the one to find or remember.
            bare = strip_edge_comments(sql)
            if bare is not None and bare != sql:
                stmts = memo.get(bare)
                if stmts is None:
                    stmts = self._find(ctx, bare)
                self.tagged = True
                return stmts
            skel = None
        if skel is not None:
            base = memo.get(skel)  # skeletons hold a NUL: they never equal a SQL text
            if base is None:
                n = self.cache.template(skel, literal_values(sql), sql)
                if n is not None:
                    base = [Statement(n, self.cache.shape(n), None)]
                    if len(memo) >= MEMO_LIMIT:
                        _clear_memo(ctx)
                    memo[skel] = base
            if base is not None:
                self.matched = sql
                _remember_slot(ctx, skel, base)
                return base
        stmts = [Statement(n, self.cache.shape(n), None) for n in self.cache.scan(sql)]
        if len(memo) >= MEMO_LIMIT:
            _clear_memo(ctx)
        memo[sql] = stmts
        return stmts

    def _entry(self, ctx: SessionInfo, stmt: Statement) -> StatEntry:
        n = stmt.normalized
        now = time.time()
        entry = self.stats.entry(n.fingerprint, ctx.database, ctx.user, n.text,
                                 stmt.shape.kind.value, now)
        if not entry.example:
            entry.example = n.text
            entry.tables = stmt.shape.tables
        return entry

    def record(
        self,
        ctx: SessionInfo,
        sql: str,
        index: int,
        bind: bytes,
        rows: int,
        sqlstate: str | None,
        started: float,
        ended: float,
        route: str = "primary",
    ) -> Statement | None:
        """One completed execution. ``bind`` is the Bind message body of an extended-protocol
        execution from its parameter format codes on (empty for the simple protocol): its
        parameter values tell executions apart, and are decoded only when a value is needed."""
        raw = ""  # a text matched by its skeleton: its own literals are in it
        # What tells this execution's values apart (pattern detection): its one literal when
        # it is the last one-literal statement again (the rest of the text is the same), else
        # ``raw`` (or the statement's own values, when that is empty).
        values: object = ""
        lit = ctx.lit_stmts
        if lit is not None and (literal := skeleton_literal(
                sql, ctx.lit_prefix, ctx.lit_suffix, ctx.lit_string)) is not None:
            stmts = lit  # the last one-literal statement again, with another value
            raw = sql
            values = literal
        else:
            # The text found in the memo last, again (the same object: an unnamed statement's
            # text as its Parse was read, or a prepared statement's): no lookup.
            if sql is ctx.memo_text:
                found = ctx.memo_found
            else:
                found = ctx.memo.get(sql)
                if found is not None:
                    ctx.memo_text = sql
                    ctx.memo_found = found
            if found is None:
                known = ctx.tagged.get(sql)
                if known is not None:
                    return self._record_tagged(ctx, sql, known[0], "", known[1], index, bind,
                                               rows, sqlstate, started, ended, route)
                self.tagged = False
                found = self._find(ctx, sql)
                raw = self.matched
                if self.tagged:
                    tags = self.tags.read(sql)
                    if tags is not None:
                        if len(raw) == 0 and len(tags.trace_id) == 0:
                            if len(ctx.tagged) >= MEMO_LIMIT:
                                ctx.tagged.clear()
                            ctx.tagged[sql] = (found, tags)
                        return self._record_tagged(ctx, sql, found, raw, tags, index, bind, rows,
                                                   sqlstate, started, ended, route)
            stmts = found
            values = raw
            if len(raw) > 0 and ctx.lit_stmts is found:
                # Its skeleton is the one the shortcut above matches from now on: the same
                # text then gives the same values.
                literal = skeleton_literal(sql, ctx.lit_prefix, ctx.lit_suffix, ctx.lit_string)
                if literal is not None:
                    values = literal
        return self._execution(ctx, stmts, sql, raw, values, index, bind, rows, sqlstate,
                               started, ended, route, None)

    def record_pending(self, ctx: SessionInfo, pending: Pending, index: int, rows: int,
                       sqlstate: str | None, started: float, ended: float,
                       route: str = "primary") -> Statement | None:
        """``record`` of the execution of ``pending``'s statement: a text not decoded yet that
        is the last one-literal statement again with another value (its bytes say so) is
        recorded without being decoded (unless the slow log or an example needs it)."""
        lit = ctx.lit_stmts
        if lit is not None and len(pending.raw) > 0:
            shape = pending.shape
            if shape is not None and shape is ctx.lit_shape:
                # The fast path found the text of that shape, and its digits' value.
                return self._execution(ctx, lit, "", "", pending.value, index, pending.params,
                                       rows, sqlstate, started, ended, route, pending)
            literal = skeleton_literal_bytes(pending.raw, pending.start, pending.stop,
                                             ctx.lit_prefix_b, ctx.lit_suffix_b, ctx.lit_string)
            if literal is not None:
                if shape is not None and not ctx.lit_string and shape.prefix == ctx.lit_prefix_b \
                        and shape.suffix == ctx.lit_suffix_b:
                    ctx.lit_shape = shape  # the same test: prefix, digits, suffix
                return self._execution(ctx, lit, "", "", literal, index, pending.params, rows,
                                       sqlstate, started, ended, route, pending)
        return self.record(ctx, pending.sql, index, pending.params, rows, sqlstate, started,
                           ended, route)

    def _execution(self, ctx: SessionInfo, stmts: list[Statement], sql: str, raw: str,
                   values: object, index: int, bind: bytes, rows: int, sqlstate: str | None,
                   started: float, ended: float, route: str, pending: Pending | None
                   ) -> Statement | None:
        """``record``, once the text's statements are found: ``raw`` and ``values`` as there;
        with ``pending``, the text is that request's (``sql`` and ``raw``, read only when
        needed)."""
        if index >= len(stmts):
            return None  # e.g. an empty query string
        stmt = stmts[index]
        now = ended + self.wall_offset
        entry = stmt.entry
        if entry is None or entry.evicted:
            entry = stmt.entry = self._entry(ctx, stmt)
        if stmt.has_offset and stmt.offset < 0 and len(bind) > 0:
            if pending is not None:
                sql = raw = pending.sql
                pending = None
            stmt = self._bound_offset(stmt, sql, bind)
        if self.capture_parameters and entry.example_params is None:
            if pending is not None:
                sql = raw = pending.sql
                pending = None
            self._capture(entry, stmt, sql, raw, len(stmts), bind)
        seconds = ended - started
        application = ctx.application_name
        entry.add(seconds, rows, sqlstate, application, route, now)
        self.executions += 1
        if seconds >= self.slow_seconds:
            if pending is not None:
                raw = pending.sql
            self._slow(ctx, stmt, raw, entry, seconds, rows, sqlstate, route, now)
        det = ctx.detector
        if det is None or det.application != application:
            det = ctx.detector = self.detector.connection(ctx)
        det.observe(stmt, bind, values, rows, sqlstate is not None, started, ended, ctx)
        return stmt

    def _record_tagged(self, ctx: SessionInfo, sql: str, stmts: list[Statement], raw: str,
                       tags: Any, index: int, bind: bytes, rows: int, sqlstate: str | None,
                       started: float, ended: float, route: str) -> Statement | None:
        """``record`` for a statement whose comments carry tags (see tags.py)."""
        if index >= len(stmts):
            return None
        stmt = stmts[index]
        now = ended + self.wall_offset
        entry = stmt.entry
        if entry is None or entry.evicted:
            entry = stmt.entry = self._entry(ctx, stmt)
        if stmt.has_offset and stmt.offset < 0 and len(bind) > 0:
            stmt = self._bound_offset(stmt, sql, bind)
        if self.capture_parameters and entry.example_params is None:
            self._capture(entry, stmt, sql, raw, len(stmts), bind)
        seconds = ended - started
        application = ctx.application_name
        entry.add(seconds, rows, sqlstate, application, route, now)
        self.executions += 1
        if seconds >= self.slow_seconds:
            self._slow(ctx, stmt, raw, entry, seconds, rows, sqlstate, route, now)
        trace_id: str = tags.trace_id
        if len(trace_id) > 0:
            det, new_request = self.detector.trace(ctx, tags, started)
        else:
            home = ctx.detector
            if home is None or home.application != application:
                home = ctx.detector = self.detector.connection(ctx)
            new_request = home.tag(tags, started)
            det = home
        det.observe(stmt, bind, raw, rows, sqlstate is not None, started, ended, ctx)
        endpoint: str = tags.endpoint
        if len(endpoint) > 0:
            self.endpoints.record(tags, stmt.fingerprint, entry.query, entry.kind, seconds, rows,
                                  sqlstate is not None, new_request, application, now)
        sink = self.span_sink
        if sink is not None and len(trace_id) > 0:
            sink(tags, stmt, ctx, started, ended, rows, sqlstate, self.wall_offset)
        return stmt

    def session_closed(self, ctx: SessionInfo, connected_at: float = 0.0,
                       ready_at: float = 0.0) -> None:
        """The session ended: its last burst is judged and its detector dropped. With
        ``connected_at`` (wall clock) and ``ready_at`` (perf_counter of its first
        ReadyForQuery, 0: never ready), short sessions feed the churn meter."""
        self.detector.closed(ctx)
        ctx.detector = None
        if ready_at > 0.0 and connected_at > 0.0:
            now = time.time()
            churn = self.churn.closed(ctx.application_name, ctx.database, ctx.user,
                                      now - connected_at,
                                      ready_at + self.wall_offset - connected_at, now)
            if churn is not None:
                self._churn(ctx, churn.sessions, churn.login_s, churn.in_window, now)

    # ------------------------------------------------------------------ connection findings
    def _churn(self, ctx: SessionInfo, sessions: int, login_s: float, in_window: int,
               now: float) -> None:
        app = ctx.application_name
        m = self.churn
        mean_ms = login_s * 1000 / max(1, sessions)
        what = (f"connections of {app or '(unnamed application)'} to {ctx.database} "
                f"as {ctx.user}")
        self.detector.findings.add(
            CONNECTION_CHURN, churn_fingerprint("sessions", ctx.database, ctx.user), what,
            None, None, app, ctx.database, in_window, login_s, now, count=sessions,
            user=ctx.user,
            example=f"{in_window} sessions shorter than {m.short_s:g} s within "
                    f"{m.window_s:g} s; login {mean_ms:.1f} ms each",
            suggestion=f"the application connects per request ({in_window} connections of "
                       f"under {m.short_s:g} s within {m.window_s:g} s, {mean_ms:.1f} ms "
                       "to log in each): keep a client-side pool (SQLAlchemy's default "
                       "QueuePool instead of NullPool, psycopg_pool, HikariCP, pg.Pool) or, "
                       "for short-lived processes, sqlproxy's pool.mode = \"transaction\"",
            connection_id=ctx.id)

    def note_pool_pin(self, ctx: SessionInfo, reason: str, text: str) -> None:
        """Transaction pooling pinned the session ``ctx`` to its server connection because
        of ``text`` (see sqlproxy/proxy/pooled.py): a ``session_state_in_pool`` finding."""
        stmts = self.statements(ctx, text)
        if not stmts:
            return
        word = _PIN_WORDS.get(reason.split(" ", 1)[0], reason.rsplit(" ", 1)[-1])
        pick = next((s for s in stmts if word in s.normalized.text.lower()), stmts[0])
        n = pick.normalized
        self.detector.findings.add(
            SESSION_STATE_IN_POOL, n.fingerprint, n.text, None, None, ctx.application_name,
            ctx.database, 1, 0.0, time.time(), user=ctx.user,
            example=f"{n.text}  -- pinned: {reason}",
            suggestion=_pin_advice(reason), statement_kind=pick.shape.kind.value,
            tables=pick.shape.tables, connection_id=ctx.id)

    # ------------------------------------------------------------------ rare events
    def _bound_offset(self, stmt: Statement, sql: str, bind: bytes) -> Statement:
        """This execution's statement with the value bound to its ``OFFSET $n``."""
        number = self._offset_params.get(sql, 0)
        if number == 0:
            number = offset_parameter(sql) or -1
            if len(self._offset_params) >= MEMO_LIMIT:
                self._offset_params.clear()
            self._offset_params[sql] = number
        value = bound_integer(bind, number) if number > 0 else None
        if value is None:
            return stmt
        return stmt.with_offset(dataclasses.replace(stmt.normalized, offset=value), value)

    def _capture(self, entry: StatEntry, stmt: Statement, sql: str, raw: str, count: int,
                 bind: bytes) -> None:
        """Keep one example with its values (capture_parameters = true only)."""
        if bind:
            values = bound_texts(bind)
            if values is None:
                return  # binary parameters: wait for an example we can show
            entry.example = sql
            entry.example_params = values
            return
        entry.example = (raw or sql) if count == 1 else stmt.normalized.text
        entry.example_params = _values(stmt, raw)

    def _slow(self, ctx: SessionInfo, stmt: Statement, raw: str, entry: StatEntry,
              seconds: float, rows: int, sqlstate: str | None, route: str, now: float) -> None:
        params: tuple[str, ...] | None = None
        if self.capture_parameters:
            params = _values(stmt, raw)
        item = SlowQuery(now, seconds, entry.fingerprint, entry.query, ctx.database, ctx.user,
                         ctx.application_name, ctx.peer, ctx.id, rows, sqlstate, route, params)
        self.slow.add(item)
        if self.log is not None:
            self.log.warning("slow_query", duration_ms=round(seconds * 1000, 3),
                             fingerprint=entry.fingerprint, query=entry.query[:2000],
                             database=ctx.database, user=ctx.user,
                             application_name=ctx.application_name, client=ctx.peer,
                             connection_id=ctx.id, rows=rows, sqlstate=sqlstate, route=route,
                             parameters=list(params) if params is not None else None)

    def transaction_done(self, ctx: SessionInfo, seconds: float, statements: int,
                         idle: float, failed: bool) -> None:
        key = (ctx.database, ctx.user)
        tx = self.transactions.get(key)
        if tx is None:
            tx = self.transactions[key] = TransactionStats()
        tx.add(seconds, statements, idle, failed)

    # ------------------------------------------------------------------ read access
    def top(self, sort: str = "total_ms", limit: int = 50, offset: int = 0,
            database: str | None = None, user: str | None = None,
            application: str | None = None, route: str | None = None,
            controller: str | None = None,
            action: str | None = None) -> tuple[list[dict[str, Any]], int]:
        """Statement statistics; with ``route``/``controller``/``action``, those of each
        (fingerprint, endpoint) pair that matches instead."""
        rows = self.stats.select(sort, database, user, application)
        if route or controller or action:
            pairs = self.endpoints.select_pairs(sort, route, controller, action)
            if database or user or application:
                wanted = {e.fingerprint for e in rows}
                pairs = [p for p in pairs if p.fingerprint in wanted]
            eps = self.endpoints
            return ([p.to_dict(eps.requests(p.endpoint)) for p in pairs[offset : offset + limit]],
                    len(pairs))
        return [e.to_dict() for e in rows[offset : offset + limit]], len(rows)

    def endpoint_summary(self, sort: str = "total_ms", limit: int = 50, offset: int = 0,
                         route: str | None = None, controller: str | None = None,
                         action: str | None = None) -> tuple[list[dict[str, Any]], int]:
        """The endpoints the tags named: requests, statements and database time per request,
        their findings by kind and their costliest statements."""
        self.detector.flush_idle(time.perf_counter())
        eps = self.endpoints.select(sort, route, controller, action)
        found: dict[str, dict[str, int]] = {}
        for f in self.detector.findings.entries.values():
            if f.endpoint:
                kinds = found.setdefault(f.endpoint, {})
                kinds[f.kind] = kinds.get(f.kind, 0) + 1
        pairs: dict[str, list[Any]] = {}
        for p in self.endpoints.pairs.values():
            pairs.setdefault(p.endpoint, []).append(p)
        out = []
        for ep in eps[offset : offset + limit]:
            d = ep.to_dict()
            kinds = found.get(ep.name, {})
            d["findings"] = sum(kinds.values())
            d["findings_by_kind"] = kinds
            top = sorted(pairs.get(ep.name, ()), key=lambda p: p.total, reverse=True)[:5]
            d["statements_top"] = [p.to_dict(ep.requests) for p in top]
            out.append(d)
        return out, len(eps)

    def detail(self, fingerprint: str) -> dict[str, Any] | None:
        entries = self.stats.by_fingerprint(fingerprint)
        if not entries:
            return None
        main = max(entries, key=lambda e: e.calls)
        out = main.to_dict()
        out["example"] = main.example
        if self.config.capture_parameters and main.example_params is not None:
            out["example_parameters"] = list(main.example_params)
        out["by_database_user"] = [e.to_dict() for e in entries]
        eps = self.endpoints
        out["by_route"] = [p.to_dict(eps.requests(p.endpoint))
                           for p in eps.select_pairs(fingerprint=fingerprint)[:50]]
        out["slow"] = [s.to_dict() for s in self.slow.select(fingerprint=fingerprint)[:50]]
        return out

    def slow_log(self, since: float | None = None, min_ms: float | None = None,
                 limit: int = 100, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        items = self.slow.select(since, min_ms)
        return [s.to_dict() for s in items[offset : offset + limit]], len(items)

    def transaction_summary(self) -> list[dict[str, Any]]:
        return [{"database": db, "user": user, **tx.to_dict()}
                for (db, user), tx in sorted(self.transactions.items())]

    def findings(self, kind: str | None = None, application: str | None = None,
                 limit: int = 50, offset: int = 0, database: str | None = None,
                 sort: str = "total_ms", route: str | None = None,
                 controller: str | None = None,
                 action: str | None = None) -> tuple[list[dict[str, Any]], int]:
        """Pattern findings, most costly first; ``kind`` one of ``findings.KINDS``."""
        self.detector.flush_idle(time.perf_counter())
        items = self.detector.findings.select(kind, application, database, sort=sort,
                                              route=route, controller=controller,
                                              action=action)
        return [f.to_dict() for f in items[offset : offset + limit]], len(items)

    def n_plus_one(self, application: str | None = None, limit: int = 50, offset: int = 0,
                   database: str | None = None) -> tuple[list[dict[str, Any]], int]:
        return self.findings("n_plus_one", application, limit, offset, database)

    def tick_windows(self, now: float | None = None) -> None:
        """Close the current time window (a background task calls this every window_s)."""
        self.windows.tick(list(self.stats.entries.values()),
                          time.time() if now is None else now)

    def finding(self, finding_id: str) -> dict[str, Any] | None:
        """One finding (by its ``id``) in detail, with the statistics of its statements."""
        self.detector.flush_idle(time.perf_counter())
        f = self.detector.findings.get(finding_id)
        if f is None:
            return None
        out = f.detail()
        for key, fp in (("statement", f.fingerprint), ("parent_statement",
                                                        f.parent_fingerprint)):
            entries = self.stats.by_fingerprint(fp) if fp else []
            out[key] = max(entries, key=lambda e: e.calls).to_dict() if entries else None
        return out

    def reset(self, what: str = "all") -> None:
        if what in ("all", "findings"):
            self.detector.reset()
        if what in ("all", "statistics"):
            self.stats.reset()
            self.endpoints.reset()
            self.windows.reset()
            self.transactions.clear()
            self.executions = 0
        if what in ("all", "slow"):
            self.slow.reset()


#: The first word of a pin reason -> a word of the statement that pinned.
_PIN_WORDS = {"set": "set", "temporary": "temp", "cursor": "hold", "sql": "prepare",
              "listen": "listen"}


def _pin_advice(reason: str) -> str:
    """What to change so that the session no longer needs a server of its own."""
    head = ("this client keeps a server connection for its whole session (" + reason
            + "), so transaction pooling cannot share it: ")
    if reason == "startup options":
        return head + ("the settings it logs in with in `options` cannot be replayed on a "
                       "shared server: set them with ALTER ROLE/DATABASE ... SET, or SET "
                       "LOCAL inside each transaction")
    if reason.startswith("set"):
        return head + ("use SET LOCAL inside the transaction, or pass the setting as a "
                       "startup parameter (options are pinned too: prefer ALTER ROLE/DATABASE "
                       "... SET)")
    if reason.startswith("function"):
        return head + ("use transaction-scoped advisory locks (pg_advisory_xact_lock) or "
                       "set_config(..., true)")
    if reason == "temporary table":
        return head + "create it ON COMMIT DROP inside the transaction, or use a real table"
    if reason == "listen":
        return head + ("LISTEN needs a session: give listeners their own connection "
                       "through a session-mode sqlproxy (pool.mode = \"session\")")
    if reason == "sql prepare":
        return head + ("use the protocol's prepared statements (the driver's), which the "
                       "pool tracks per client, instead of SQL PREPARE")
    if reason == "cursor with hold":
        return head + "fetch the rows inside the transaction, or page with keyset LIMIT"
    return head + "move the session state into a transaction"


def _values(stmt: Statement, raw: str) -> tuple[str, ...]:
    """The literal values of one execution: its own text's when its skeleton matched
    (``raw``), else those its statement was scanned with."""
    return literal_values(raw) if raw else stmt.values


def _clear_memo(ctx: SessionInfo) -> None:
    """Forget the session's memo (at its bound), and the text found in it last."""
    ctx.memo.clear()
    ctx.memo_text = None
    ctx.memo_found = None


def _remember_slot(ctx: SessionInfo, skel: str, stmts: list[Statement]) -> None:
    """Keep a skeleton of one literal for ``same_skeleton`` (none with a quote around it: a
    quote the skeleton left unclosed could pair with the next text's literal)."""
    at = literal_slot(skel)
    if at < 0:
        return
    prefix = skel[:at]
    suffix = skel[at + 1 :]
    if "'" in prefix or "'" in suffix:
        return
    ctx.lit_prefix = prefix
    ctx.lit_suffix = suffix
    ctx.lit_prefix_b = prefix.encode("utf-8", "surrogatepass")
    ctx.lit_suffix_b = suffix.encode("utf-8", "surrogatepass")
    ctx.lit_shape = None
    ctx.lit_string = skel[at] == "\x01"
    ctx.lit_stmts = stmts
