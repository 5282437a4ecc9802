"""Per-fingerprint statement statistics, seen from the client side.

Like ``pg_stat_statements``: one entry per (fingerprint, database, user), bounded in number; when
full, the least-used 5 % are evicted (usage decays so that old heavy hitters can leave too) and
the evictions are counted. Latency percentiles come from a DDSketch (1 % relative error,
mergeable; see sketch.py), never from stored samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Final

from sqlproxy.analysis.sketch import LogSketch

SORT_KEYS = ("total_ms", "mean_ms", "calls", "rows", "p99_ms", "p95_ms", "errors", "max_ms")
MAX_APPLICATIONS: Final = 16  # application names remembered per entry
SKETCH_ACCURACY: Final = 0.01


class StatEntry:
    """Statistics of one statement shape for one database and user."""

    def __init__(self, fingerprint: str, database: str, user: str, query: str, kind: str,
                 now: float) -> None:
        self.fingerprint = fingerprint
        self.database = database
        self.user = user
        self.query = query
        self.kind = kind
        self.calls = 0
        self.rows = 0
        self.total = 0.0  # seconds
        self.sumsq = 0.0
        self.min = math.inf
        self.max = 0.0
        self.errors: dict[str, int] = {}
        self.applications: dict[str, int] = {}  # names seen (bounded); values unused
        self.other_routes: dict[str, int] = {}  # executions not on the primary, by route
        self._last_application: str | None = None
        self.first_seen = now
        self.last_seen = now
        self.example = ""
        self.example_params: tuple[str, ...] | None = None
        self.sketch = LogSketch(SKETCH_ACCURACY)
        self.usage = 0.0
        self.evicted = False
        self.tables: tuple[str, ...] = ()

    def add(self, seconds: float, rows: int, sqlstate: str | None, application: str,
            route: str, now: float) -> None:
        # Once per executed statement: kept to plain attribute arithmetic and at most two dict
        # operations in the common case (same application as last time, primary route).
        self.calls += 1
        self.rows += rows
        self.total += seconds
        self.sumsq += seconds * seconds
        if seconds < self.min:
            self.min = seconds
        if seconds > self.max:
            self.max = seconds
        self.last_seen = now
        self.usage += 1.0
        self.sketch.add(seconds)
        if sqlstate is not None:
            self.errors[sqlstate] = self.errors.get(sqlstate, 0) + 1
        if application != self._last_application:
            self._last_application = application
            apps = self.applications
            if application not in apps and len(apps) < MAX_APPLICATIONS:
                apps[application] = 1
        if route != "primary":
            self.other_routes[route] = self.other_routes.get(route, 0) + 1

    @property
    def routes(self) -> dict[str, int]:
        """Executions per route: "primary" and each replica's name."""
        other = self.other_routes
        primary = self.calls - sum(other.values())
        out = {"primary": primary} if primary else {}
        out.update(other)
        return out

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def mean(self) -> float:
        return self.total / self.calls if self.calls else 0.0

    @property
    def stddev(self) -> float:
        if self.calls < 2:
            return 0.0
        mean = self.mean
        var = self.sumsq / self.calls - mean * mean
        return math.sqrt(var) if var > 0 else 0.0

    def quantile(self, q: float) -> float:
        return self.sketch.quantile(q)

    def sort_value(self, key: str) -> float:
        if key == "total_ms":
            return self.total
        if key == "mean_ms":
            return self.mean
        if key == "calls":
            return self.calls
        if key == "rows":
            return self.rows
        if key == "p99_ms":
            return self.quantile(0.99)
        if key == "p95_ms":
            return self.quantile(0.95)
        if key == "errors":
            return self.error_count
        if key == "max_ms":
            return self.max
        raise ValueError(f"unknown sort key {key!r}; expected one of {', '.join(SORT_KEYS)}")

    def to_dict(self) -> dict[str, Any]:
        from sqlproxy.analysis.timefmt import iso

        return {
            "fingerprint": self.fingerprint,
            "query": self.query,
            "kind": self.kind,
            "database": self.database,
            "user": self.user,
            "calls": self.calls,
            "rows": self.rows,
            "errors": self.error_count,
            "errors_by_sqlstate": dict(self.errors),
            "total_ms": self.total * 1000,
            "mean_ms": self.mean * 1000,
            "min_ms": (self.min if self.calls else 0.0) * 1000,
            "max_ms": self.max * 1000,
            "stddev_ms": self.stddev * 1000,
            "p50_ms": self.quantile(0.50) * 1000,
            "p95_ms": self.quantile(0.95) * 1000,
            "p99_ms": self.quantile(0.99) * 1000,
            "applications": sorted(self.applications),
            "routes": dict(self.routes),
            "tables": list(self.tables),
            "first_seen": iso(self.first_seen),
            "last_seen": iso(self.last_seen),
        }


class StatsStore:
    """Bounded map (fingerprint, database, user) -> StatEntry."""

    def __init__(self, max_entries: int = 5000) -> None:
        self.max_entries = max_entries
        self.entries: dict[tuple[str, str, str], StatEntry] = {}
        self.evictions = 0
        self.reset_at = 0.0
        # Called with entries about to be dropped (eviction, reset): a rare event, so that a
        # reader keeping process-lifetime totals (the Prometheus collector) loses nothing.
        self.on_retire: Callable[[list[StatEntry]], None] | None = None

    def entry(self, fingerprint: str, database: str, user: str, query: str, kind: str,
              now: float) -> StatEntry:
        key = (fingerprint, database, user)
        e = self.entries.get(key)
        if e is None:
            if len(self.entries) >= self.max_entries:
                self._evict()
            e = StatEntry(fingerprint, database, user, query, kind, now)
            self.entries[key] = e
        return e

    def _evict(self) -> None:
        """Drop the least-used 5 % (at least one), as pg_stat_statements does, and decay."""
        victims = sorted(self.entries.items(), key=lambda kv: kv[1].usage)
        n = max(1, len(victims) * 5 // 100)
        if self.on_retire is not None:
            self.on_retire([e for _, e in victims[:n]])
        for key, e in victims[:n]:
            e.evicted = True
            del self.entries[key]
        self.evictions += n
        for e in self.entries.values():
            e.usage *= 0.99

    def select(
        self,
        sort: str = "total_ms",
        database: str | None = None,
        user: str | None = None,
        application: str | None = None,
        fingerprint: str | None = None,
    ) -> list[StatEntry]:
        if sort not in SORT_KEYS:
            raise ValueError(f"unknown sort key {sort!r}; expected one of {', '.join(SORT_KEYS)}")
        items: Iterable[StatEntry] = self.entries.values()
        if database:
            items = (e for e in items if e.database == database)
        if user:
            items = (e for e in items if e.user == user)
        if application:
            items = (e for e in items if application in e.applications)
        if fingerprint:
            items = (e for e in items if e.fingerprint == fingerprint)
        return sorted(items, key=lambda e: e.sort_value(sort), reverse=True)

    def by_fingerprint(self, fingerprint: str) -> list[StatEntry]:
        return [e for e in self.entries.values() if e.fingerprint == fingerprint]

    def reset(self) -> None:
        if self.on_retire is not None:
            self.on_retire(list(self.entries.values()))
        for e in self.entries.values():
            e.evicted = True
        self.entries.clear()
        self.evictions = 0


class TransactionStats:
    """Explicit transaction blocks per (database, user)."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.max = 0.0
        self.statements = 0
        self.idle = 0.0  # client think time inside transactions
        self.sketch = LogSketch(SKETCH_ACCURACY)
        self.rolled_back = 0

    def add(self, seconds: float, statements: int, idle: float, failed: bool) -> None:
        self.count += 1
        self.total += seconds
        self.max = max(self.max, seconds)
        self.statements += statements
        self.idle += idle
        self.sketch.add(seconds)
        if failed:
            self.rolled_back += 1

    def to_dict(self) -> dict[str, Any]:
        c = self.count or 1
        p = self.sketch.quantile(0.99)
        return {
            "transactions": self.count,
            "failed": self.rolled_back,
            "total_ms": self.total * 1000,
            "mean_ms": self.total / c * 1000,
            "max_ms": self.max * 1000,
            "p99_ms": (p or 0.0) * 1000,
            "statements_per_transaction": self.statements / c,
            "idle_in_transaction_ms": self.idle * 1000,
            "idle_in_transaction_mean_ms": self.idle / c * 1000,
        }
