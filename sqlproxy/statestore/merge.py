"""Folding one instance's statistics into another's: the arithmetic of a fleet view (and of a
snapshot restored into a process that already recorded something). Pure: no I/O, no clock.

What each quantity becomes when two instances' are merged:

* counts and sums (calls, rows, total and squared time, errors per SQLSTATE, executions per
  route, usage) add up; minimum and maximum are the extremes; the latency sketches merge by
  adding bucket counts, so merged percentiles are those of all executions, within the sketch's
  relative accuracy (what one process recording all of them would answer);
* first seen is the earliest, last seen the latest;
* descriptive fields (example text, tables) are kept from the entry merged into, or taken
  from the other when the first has none;
* findings merge with ``Finding.merge`` (occurrences and time summed, largest burst, earliest
  first seen, latest last seen);
* slow-query logs are concatenated and ordered by time.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlproxy.analysis.slowlog import SlowQuery
from sqlproxy.analysis.stats import MAX_APPLICATIONS, StatEntry, TransactionStats

__all__ = ["merge_entry", "merge_slow", "merge_transactions"]


def merge_entry(into: StatEntry, other: StatEntry) -> None:
    """Fold ``other`` (the same fingerprint, database and user, counted elsewhere) into
    ``into``, which stays the live object (sessions keep a reference to it)."""
    into.calls += other.calls
    into.rows += other.rows
    into.total += other.total
    into.sumsq += other.sumsq
    into.min = min(into.min, other.min)
    into.max = max(into.max, other.max)
    for sqlstate, n in other.errors.items():
        into.errors[sqlstate] = into.errors.get(sqlstate, 0) + n
    for app in other.applications:
        if app not in into.applications and len(into.applications) < MAX_APPLICATIONS:
            into.applications[app] = 1
    for route, n in other.other_routes.items():
        into.other_routes[route] = into.other_routes.get(route, 0) + n
    into.first_seen = min(into.first_seen, other.first_seen)
    into.last_seen = max(into.last_seen, other.last_seen)
    if not into.example:
        into.example = other.example
    if into.example_params is None:
        into.example_params = other.example_params
    if not into.tables:
        into.tables = other.tables
    into.sketch.merge(other.sketch)
    into.usage += other.usage


def merge_transactions(into: TransactionStats, other: TransactionStats) -> None:
    """Fold ``other`` (the same database and user) into ``into``."""
    into.count += other.count
    into.total += other.total
    into.max = max(into.max, other.max)
    into.statements += other.statements
    into.idle += other.idle
    into.rolled_back += other.rolled_back
    into.sketch.merge(other.sketch)


def merge_slow(logs: Iterable[Iterable[SlowQuery]]) -> list[SlowQuery]:
    """Several slow-query logs as one, oldest first (the order ``SlowLog`` keeps)."""
    out = [item for log in logs for item in log]
    out.sort(key=lambda s: s.at)  # stable: equal times keep their instance's order
    return out
