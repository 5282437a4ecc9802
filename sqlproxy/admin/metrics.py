"""Prometheus exposition, computed at scrape time from what the profiler already keeps.

Nothing here runs per statement: a custom collector reads the statistics when ``/metrics`` is
scraped. Counters must never go down, but statistics entries are evicted and reset; so the
collector remembers, per live entry, what it had already counted, and adds only the difference
since the previous scrape; entries about to be evicted or reset are handed to it first
(``StatsStore.on_retire``, a rare event) so their last increments are counted too. Entries whose
call count did not change cost one comparison per scrape. Latency histograms per statement
kind come from the entries' log-bucket sketches, re-bucketed into Prometheus buckets (within
the sketch's 1 %).

Per-fingerprint series exist only for the top ``admin.metrics_top_n`` fingerprints by total
time, to keep cardinality bounded.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from sqlproxy import __version__
from sqlproxy.admin.findings import Findings
from sqlproxy.admin.history import sketch_bins
from sqlproxy.admin.source import AdminSource
from sqlproxy.analysis.stats import StatEntry
from sqlproxy.analysis.windows import quantile

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
QUERY_LABEL_CHARS = 200


class _Seen:
    """What the collector has counted of one entry so far."""

    __slots__ = ("buckets", "calls", "entry", "errors", "routes", "total")

    def __init__(self, entry: StatEntry) -> None:
        self.entry = entry
        self.calls = 0
        self.total = 0.0
        self.routes: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.buckets = [0] * (len(BUCKETS) + 1)


def entry_buckets(entry: StatEntry) -> list[int]:
    """Non-cumulative counts of an entry's latencies per Prometheus bucket (last: > 10 s)."""
    out = [0] * (len(BUCKETS) + 1)
    sb = sketch_bins(entry)
    if sb is None:
        # No bucket view of this sketch: put everything at its mean.
        out[bisect.bisect_left(BUCKETS, entry.mean)] = entry.calls
        return out
    gamma, bins = sb
    scale = 2.0 / (gamma + 1.0)
    for key, n in bins.items():
        out[bisect.bisect_left(BUCKETS, gamma**key * scale)] += n
    return out


class ProfilerCollector(Collector):
    def __init__(self, source: AdminSource, findings: Findings,
                 backends: Callable[[], list[dict[str, Any]]], explainer: Any = None) -> None:
        self.source = source
        self.backends = backends
        if source.profiler is not None:
            source.profiler.stats.on_retire = self.retire
        self.findings = findings
        self.explainer = explainer
        self._seen: dict[int, _Seen] = {}
        self.statements: dict[str, float] = {}
        self.errors: dict[str, float] = {}
        self.hist: dict[str, list[float]] = {}  # kind -> non-cumulative bucket counts
        self.hist_sum: dict[str, float] = {}
        self.evictions = 0.0
        self._last_evictions = 0
        self.slow = 0.0
        self._last_slow = 0
        self.finding_evictions = 0.0
        self._last_finding_evictions = 0

    def describe(self) -> Iterable[Metric]:
        return []  # collected lazily; nothing to check at registration

    # ------------------------------------------------------------------ monotonic totals
    def _account(self, entries: list[StatEntry]) -> None:
        seen = self._seen
        live: set[int] = set()
        for e in entries:
            key = id(e)
            live.add(key)
            s = seen.get(key)
            if s is None or s.entry is not e:
                s = seen[key] = _Seen(e)
            if e.calls != s.calls:
                self._count(s)
        for key in [k for k in seen if k not in live]:
            del seen[key]  # dropped entries were counted by retire()

    def retire(self, entries: list[StatEntry]) -> None:
        """``StatsStore.on_retire``: count what entries about to be dropped did since the last
        scrape (or ever, if they were born and evicted between two scrapes)."""
        for e in entries:
            s = self._seen.pop(id(e), None)
            if s is None or s.entry is not e:
                s = _Seen(e)
            if e.calls != s.calls:
                self._count(s)

    def _count(self, s: _Seen) -> None:
        e = s.entry
        for route, n in e.routes.items():
            d = n - s.routes.get(route, 0)
            if d > 0:
                self.statements[route] = self.statements.get(route, 0) + d
        for state, n in e.errors.items():
            d = n - s.errors.get(state, 0)
            if d > 0:
                self.errors[state] = self.errors.get(state, 0) + d
        buckets = entry_buckets(e)
        hist = self.hist.get(e.kind)
        if hist is None:
            hist = self.hist[e.kind] = [0.0] * (len(BUCKETS) + 1)
        for i, n in enumerate(buckets):
            d = n - s.buckets[i]
            if d > 0:
                hist[i] += d
        d_total = e.total - s.total
        if d_total > 0:
            self.hist_sum[e.kind] = self.hist_sum.get(e.kind, 0.0) + d_total
        s.calls = e.calls
        s.total = e.total
        s.routes = dict(e.routes)
        s.errors = dict(e.errors)
        s.buckets = buckets

    @staticmethod
    def _monotonic(total: float, last: int, now: int) -> float:
        return total + (now - last if now >= last else now)  # a reset starts from zero

    def _finding_evictions(self) -> float:
        now = self.findings.evictions
        self.finding_evictions = self._monotonic(self.finding_evictions,
                                                 self._last_finding_evictions, now)
        self._last_finding_evictions = now
        return self.finding_evictions

    # ------------------------------------------------------------------ collect
    def collect(self) -> Iterator[Metric]:
        src = self.source
        profiler = src.profiler

        info = GaugeMetricFamily("sqlproxy_info", "sqlproxy build information",
                                 labels=["version"])
        info.add_metric([__version__], 1)
        yield info

        conns = GaugeMetricFamily("sqlproxy_client_connections",
                                  "Client sessions by state", labels=["state"])
        states: dict[str, int] = {}
        for s in list(src.proxy.sessions.values()):
            state = getattr(getattr(s, "state", None), "value", "unknown")
            states[state] = states.get(state, 0) + 1
        for state in ("startup", "connecting", "authenticating", "ready"):
            states.setdefault(state, 0)
        for state, n in sorted(states.items()):
            conns.add_metric([state], n)
        yield conns
        yield GaugeMetricFamily("sqlproxy_accepting",
                                "1 when the proxy accepts new client connections",
                                value=1 if src.proxy.accepting else 0)

        backends = self.backends()
        up = GaugeMetricFamily("sqlproxy_backend_up", "Backend reachable (1) or not (0)",
                               labels=["backend", "role"])
        rotation = GaugeMetricFamily("sqlproxy_backend_in_rotation",
                                     "Backend receives routed statements", labels=["backend"])
        lag_s = GaugeMetricFamily("sqlproxy_backend_lag_seconds", "Replication lag (time)",
                                  labels=["backend"])
        lag_b = GaugeMetricFamily("sqlproxy_backend_lag_bytes", "Replication lag (WAL bytes)",
                                  labels=["backend"])
        pool = GaugeMetricFamily("sqlproxy_server_connections",
                                 "Server connections open", labels=["backend"])
        for b in backends:
            name = str(b.get("name"))
            if b.get("healthy") is not None:
                up.add_metric([name, str(b.get("role"))], 1 if b["healthy"] else 0)
            rotation.add_metric([name], 1 if b.get("in_rotation") else 0)
            if b.get("lag_ms") is not None:
                lag_s.add_metric([name], float(b["lag_ms"]) / 1000)
            if b.get("lag_bytes") is not None:
                lag_b.add_metric([name], float(b["lag_bytes"]))
            pool.add_metric([name], float(b.get("server_connections") or 0))
        yield from (up, rotation, lag_s, lag_b, pool)
        yield from self._pools()
        yield from self._workers()
        yield from self._cache()

        findings = GaugeMetricFamily("sqlproxy_findings", "Current findings by kind",
                                     labels=["kind"])
        for kind, n in sorted(self.findings.counts().items()):
            findings.add_metric([kind], n)
        yield findings
        yield CounterMetricFamily("sqlproxy_finding_evictions",
                                  "Findings evicted to stay within max_findings",
                                  value=self._finding_evictions())

        if self.explainer is not None:
            yield CounterMetricFamily("sqlproxy_explains", "EXPLAINs run by the admin API",
                                      value=self.explainer.count)
        yield from self._state_store()

        if profiler is None:
            return
        entries = list(profiler.stats.entries.values())
        self._account(entries)
        ev = profiler.stats.evictions
        self.evictions = self._monotonic(self.evictions, self._last_evictions, ev)
        self._last_evictions = ev
        slow = profiler.slow.total
        self.slow = self._monotonic(self.slow, self._last_slow, slow)
        self._last_slow = slow

        stm = CounterMetricFamily("sqlproxy_statements", "Statements executed, by route",
                                  labels=["route"])
        for route, value in sorted(self.statements.items()):
            stm.add_metric([route], value)
        yield stm
        err = CounterMetricFamily("sqlproxy_statement_errors",
                                  "Statements that failed, by SQLSTATE", labels=["sqlstate"])
        for sqlstate, value in sorted(self.errors.items()):
            err.add_metric([sqlstate], value)
        yield err
        hist = HistogramMetricFamily("sqlproxy_statement_duration_seconds",
                                     "Statement round-trip time seen by the proxy, by kind",
                                     labels=["kind"])
        for kind, counts in sorted(self.hist.items()):
            cum = 0.0
            buckets: list[tuple[str, float]] = []
            for bound, c in zip(BUCKETS, counts, strict=False):
                cum += c
                buckets.append((repr(bound), cum))
            buckets.append(("+Inf", cum + counts[-1]))
            hist.add_metric([kind], buckets, self.hist_sum.get(kind, 0.0))
        yield hist
        yield CounterMetricFamily("sqlproxy_fingerprint_evictions",
                                  "Statistics entries evicted to stay within max_fingerprints",
                                  value=self.evictions)
        yield CounterMetricFamily("sqlproxy_slow_queries", "Executions over slow_query_ms",
                                  value=self.slow)
        yield GaugeMetricFamily("sqlproxy_fingerprints", "Statistics entries held",
                                value=len(entries))
        yield CounterMetricFamily("sqlproxy_windows_closed",
                                  "Regression windows closed (analysis.window_s each)",
                                  value=profiler.windows.closed)

        yield from self._top(entries)

    def _cache(self) -> Iterator[Metric]:
        """The result cache ([cache]), labelled by rule."""
        manager = getattr(self.source.proxy, "cache", None)
        if manager is None:
            return
        stats = manager.stats
        counters = {k: CounterMetricFamily(f"sqlproxy_cache_{k}", doc, labels=["rule"])
                    for k, doc in (("hits", "Units answered from the cache"),
                                   ("misses", "Covered units sent to the server"),
                                   ("stores", "Answers stored"),
                                   ("evictions", "Entries evicted (cache.max_bytes)"),
                                   ("invalidations", "Entries dropped by committed writes"),
                                   ("expirations", "Entries dropped at their TTL"),
                                   ("too_large", "Answers over cache.max_entry_bytes"))}
        held = GaugeMetricFamily("sqlproxy_cache_bytes", "Bytes held, by rule", labels=["rule"])
        for rule, c in sorted(stats.rules.items()):
            for k, fam in counters.items():
                fam.add_metric([rule], float(getattr(c, k)))
            held.add_metric([rule], float(c.bytes))
        yield from counters.values()
        yield held
        yield GaugeMetricFamily("sqlproxy_cache_entries", "Entries in the in-process store",
                                value=len(manager.store))
        yield CounterMetricFamily("sqlproxy_cache_invalidating_commits",
                                  "Committed writes that invalidated tables",
                                  value=manager.invalidations)
        remote = manager.remote
        if remote is not None:
            d = remote.describe()
            yield GaugeMetricFamily("sqlproxy_cache_redis_up", "Redis store usable (1) or not",
                                    value=1.0 if d["up"] else 0.0)
            errors = CounterMetricFamily("sqlproxy_cache_redis_errors",
                                         "Redis calls that failed, by kind", labels=["kind"])
            errors.add_metric(["error"], float(d["errors"]))
            errors.add_metric(["timeout"], float(d["timeouts"]))
            yield errors
            yield CounterMetricFamily("sqlproxy_cache_redis_skipped_lookups",
                                      "Lookups not tried while Redis was down",
                                      value=d["skipped_lookups"])

    def _pools(self) -> Iterator[Metric]:
        """The transaction pools (pool.mode = "transaction"), labelled database, user and
        backend ("primary", or a replica's name: replica pools, with routing)."""
        manager = getattr(self.source.proxy, "pools", None)
        if manager is None:
            return
        labels = ["database", "user", "backend"]
        gauges = {k: GaugeMetricFamily(f"sqlproxy_pool_{k}", doc, labels=labels) for k, doc in (
            ("size", "pool.size"), ("servers", "Server connections open"),
            ("active", "Server connections lent to a client"),
            ("idle", "Server connections idle in the pool"),
            ("clients_waiting", "Clients waiting for a server connection"),
            ("pinned_clients", "Clients pinned to their server connection"),
            ("all_busy_ratio", "Share of the pool's life with every server connection busy"))}
        wait = GaugeMetricFamily("sqlproxy_pool_wait_seconds",
                                 "Waits for a server connection (max, p50, p99)",
                                 labels=[*labels, "quantile"])
        counters = {k: CounterMetricFamily(f"sqlproxy_pool_{k}", doc, labels=labels)
                    for k, doc in (("checkouts", "Server connections lent"),
                                   ("wait_timeouts", "Waits past pool.max_wait_ms (53300)"),
                                   ("servers_opened", "Server connections opened"))}
        closed = CounterMetricFamily("sqlproxy_pool_servers_closed",
                                     "Server connections closed, by reason",
                                     labels=[*labels, "reason"])
        for p in manager.describe():
            key = [str(p["database"]), str(p["user"]), str(p.get("backend", "primary"))]
            for k, g in gauges.items():
                v = len(p["pinned_clients"]) if k == "pinned_clients" else (
                    p["all_busy_share"] if k == "all_busy_ratio" else p[k])
                g.add_metric(key, float(v))
            for q in ("max", "p50", "p99"):
                wait.add_metric([*key, q], float(p["wait_ms"][q]) / 1000)
            for k, c in counters.items():
                c.add_metric(key, float(p[k]))
            for reason, n in sorted(p["servers_closed"].items()):
                closed.add_metric([*key, reason], float(n))
        yield from gauges.values()
        yield wait
        yield from counters.values()
        yield closed

    def _workers(self) -> Iterator[Metric]:
        """The worker processes ([proxy] workers): up, restarts, sessions."""
        labels = ["worker"]
        up = GaugeMetricFamily("sqlproxy_worker_up", "1 while the worker process runs",
                               labels=labels)
        sessions = GaugeMetricFamily("sqlproxy_worker_sessions",
                                     "Client sessions held by the worker", labels=labels)
        restarts = CounterMetricFamily("sqlproxy_worker_restarts",
                                       "Times the worker was restarted after it died",
                                       labels=labels)
        for w in self.source.workers():
            label = [str(w["worker"])]
            up.add_metric(label, 1 if w.get("alive") else 0)
            sessions.add_metric(label, float(w.get("sessions") or 0))
            restarts.add_metric(label, float(w.get("restarts") or 0))
        yield from (up, sessions, restarts)

    def _state_store(self) -> Iterator[Metric]:
        status = self.source.state_status()
        if status is None:
            return
        labels = ["kind"]
        up = GaugeMetricFamily("sqlproxy_state_store_up",
                               "1 while state snapshots are written (0 while they fail)",
                               labels=labels)
        up.add_metric([status.kind], 0 if status.ok is False else 1)
        failures = CounterMetricFamily("sqlproxy_state_store_failures",
                                       "Failed attempts to reach or write the state store",
                                       labels=labels)
        failures.add_metric([status.kind], status.failures)
        yield from (up, failures)
        if status.last_success is not None:
            yield GaugeMetricFamily("sqlproxy_state_store_last_snapshot_timestamp_seconds",
                                    "When the last snapshot was written (Unix time)",
                                    value=status.last_success)
        yield GaugeMetricFamily("sqlproxy_fleet_instances",
                                "Instances in the fleet view, this one included",
                                value=status.fleet_instances + 1)

    def _top(self, entries: list[StatEntry]) -> Iterator[Metric]:
        n = self.source.config.admin.metrics_top_n
        top = sorted(entries, key=lambda e: e.total, reverse=True)[:n]
        labels = ["fingerprint", "database", "user"]
        qinfo = GaugeMetricFamily("sqlproxy_query_info", "Normalized text of a top fingerprint",
                                  labels=[*labels, "kind", "query"])
        calls = CounterMetricFamily("sqlproxy_query_calls", "Calls of a top fingerprint",
                                    labels=labels)
        secs = CounterMetricFamily("sqlproxy_query_seconds", "Total time of a top fingerprint",
                                   labels=labels)
        rows = CounterMetricFamily("sqlproxy_query_rows", "Rows of a top fingerprint",
                                   labels=labels)
        errs = CounterMetricFamily("sqlproxy_query_errors", "Errors of a top fingerprint",
                                   labels=labels)
        quant = GaugeMetricFamily("sqlproxy_query_latency_seconds",
                                  "Latency quantiles of a top fingerprint",
                                  labels=[*labels, "quantile"])
        win = GaugeMetricFamily("sqlproxy_query_window_p95_seconds",
                                "p95 of a top fingerprint in its last closed window",
                                labels=["fingerprint"])
        base = GaugeMetricFamily("sqlproxy_query_baseline_p95_seconds",
                                 "p95 of a top fingerprint over its earlier windows "
                                 "(the latency_regression baseline)", labels=["fingerprint"])
        profiler = self.source.profiler
        windows = profiler.windows if profiler is not None else None
        latest = windows.latest() if windows is not None else {}
        for e in top:
            lv = [e.fingerprint, e.database, e.user]
            qinfo.add_metric([*lv, e.kind, e.query[:QUERY_LABEL_CHARS]], 1)
            calls.add_metric(lv, e.calls)
            secs.add_metric(lv, e.total)
            rows.add_metric(lv, e.rows)
            errs.add_metric(lv, e.error_count)
            for q in (0.5, 0.95, 0.99):
                quant.add_metric([*lv, str(q)], e.quantile(q))
        done: set[str] = set()
        for e in top:
            w = latest.get(e.fingerprint)
            if windows is None or w is None or e.fingerprint in done or not windows.gamma:
                continue
            done.add(e.fingerprint)
            win.add_metric([e.fingerprint], quantile(windows.gamma, w.bins, 0.95))
            b = windows.baseline_p95(e.fingerprint)
            if b is not None:
                base.add_metric([e.fingerprint], b)
        yield from (qinfo, calls, secs, rows, errs, quant, win, base)


def make_registry(collector: ProfilerCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
