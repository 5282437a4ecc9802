"""The fleet's merge arithmetic, without I/O: two instances' state merged is what one instance
that saw all of their traffic would report."""

from __future__ import annotations

import math
from typing import Any

import pytest

from sqlproxy.analysis.profiler import Profiler, SessionInfo
from sqlproxy.analysis.slowlog import SlowQuery
from sqlproxy.analysis.stats import StatEntry
from sqlproxy.config import AnalysisSection
from sqlproxy.state import StateFile, profiler_contributors
from sqlproxy.statestore.backoff import retry_delay
from sqlproxy.statestore.merge import merge_entry, merge_slow
from sqlproxy.statestore.view import fleet_view, live_sections

TIMES = ("first_seen", "last_seen")


def _profiler() -> Profiler:
    return Profiler(AnalysisSection(slow_query_ms=5.0))


def _ctx(id: int, app: str) -> SessionInfo:
    return SessionInfo(id, "127.0.0.1:1", "db", "u", app)


def _traffic_x(p: Profiler) -> None:
    """Lookups in a loop (an N+1), some slow, some failing; one transaction."""
    ctx = _ctx(1, "web")
    t = 100.0
    p.record(ctx, "select id from teams", 0, b"", 10, None, t, t + 0.001)
    for i in range(40):
        t += 0.002
        d = 0.0005 * (1 + i % 7) + (0.01 if i % 13 == 0 else 0.0)
        p.record(ctx, "select * from players where team_id = $1", 0, b"%d" % i, 3,
                 "57014" if i % 17 == 0 else None, t, t + d)
        t += d
    p.session_closed(ctx)
    p.transaction_done(ctx, 0.05, 3, 0.01, False)


def _traffic_y(p: Profiler) -> None:
    """Later: the same N+1 from another application, and statements of its own."""
    ctx = _ctx(2, "worker")
    t = 200.0
    p.record(ctx, "select id from teams", 0, b"", 10, None, t, t + 0.002)
    for i in range(25):
        t += 0.002
        p.record(ctx, "select * from players where team_id = $1", 0, b"%d" % (100 + i), 2,
                 None, t, t + 0.0008)
        t += 0.0008
    for i in range(5):
        t += 0.5
        p.record(ctx, f"update jobs set done = true where id = {i}", 0, b"", 1, None, t,
                 t + 0.02)
    p.session_closed(ctx)
    p.transaction_done(ctx, 0.2, 5, 0.1, True)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return 0.0 if value == 0 else round(value, 9 - math.floor(math.log10(abs(value))))
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items() if k not in TIMES}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _report(p: Profiler) -> dict[str, Any]:
    top = sorted(p.top(limit=1000)[0], key=lambda r: r["fingerprint"])
    findings = sorted(p.findings(limit=1000)[0], key=lambda f: f["id"])
    slow = p.slow_log(limit=1000)[0]
    return _rounded({"top": top, "findings": findings, "tx": p.transaction_summary(),
                     "slow": [s["duration_ms"] for s in slow], "executions": p.executions})


def _view(*profilers: Profiler) -> Profiler:
    view, problems = fleet_view(AnalysisSection(slow_query_ms=5.0), [
        (f"i{n}", live_sections(profiler_contributors(p))) for n, p in enumerate(profilers)])
    assert problems == []
    return view


def test_two_instances_merged_equal_one_that_saw_everything() -> None:
    a, b, both = _profiler(), _profiler(), _profiler()
    _traffic_x(a)
    _traffic_y(b)
    _traffic_x(both)
    _traffic_y(both)
    view = _view(a, b)
    assert _report(view) == _report(both)
    # Percentiles come from merged sketches, not from averaging the instances' percentiles.
    fp = next(r["fingerprint"] for r in both.top(limit=10)[0] if "players" in r["query"])
    merged = next(r for r in view.top(limit=10)[0] if r["fingerprint"] == fp)
    assert merged["calls"] == 65 and merged["errors"] == 3
    assert merged["applications"] == ["web", "worker"]
    n1 = [f for f in view.findings(limit=100)[0] if f["kind"] == "n_plus_one"]
    assert [(f["application"], f["occurrences"]) for f in n1] in (
        [("web", 1), ("worker", 1)], [("worker", 1), ("web", 1)])


def test_the_same_finding_on_two_instances_is_one_finding() -> None:
    a, b = _profiler(), _profiler()
    _traffic_x(a)
    _traffic_x(b)
    [fa] = a.findings(limit=10)[0]
    view = _view(a, b)
    [f] = view.findings(limit=10)[0]
    assert f["id"] == fa["id"]
    assert f["occurrences"] == 2 * fa["occurrences"]
    assert f["total_ms"] == pytest.approx(2 * fa["total_ms"])
    assert f["first_seen"] == min(fa["first_seen"], b.findings(limit=1)[0][0]["first_seen"])


def test_slow_logs_are_concatenated_in_time_order() -> None:
    a, b = _profiler(), _profiler()
    _traffic_y(a)  # the later traffic on the first instance
    _traffic_x(b)
    view = _view(a, b)
    ats = [s.at for s in view.slow.entries]
    assert ats == sorted(ats) and len(ats) == len(a.slow.entries) + len(b.slow.entries)
    assert view.slow_log(limit=1)[0][0]["at"] == a.slow_log(limit=1)[0][0]["at"]  # newest
    q = SlowQuery(1.0, 0.1, "f", "q", "d", "u", "a", "c", 1, 0, None, "primary", None)
    r = SlowQuery(0.5, 0.1, "g", "q", "d", "u", "a", "c", 1, 0, None, "primary", None)
    assert merge_slow([[q], [r]]) == [r, q]


def test_merge_entry_extremes_errors_and_routes() -> None:
    x = StatEntry("f", "db", "u", "q", "select", 10.0)
    y = StatEntry("f", "db", "u", "q", "select", 5.0)
    x.add(0.010, 1, None, "a", "primary", 11.0)
    x.add(0.030, 1, "40001", "a", "r1", 12.0)
    y.add(0.001, 2, "40001", "b", "r1", 20.0)
    y.add(0.050, 2, "23505", "b", "primary", 21.0)
    merge_entry(x, y)
    assert (x.calls, x.rows, x.min, x.max) == (4, 6, 0.001, 0.050)
    assert x.total == pytest.approx(0.091)
    assert x.errors == {"40001": 2, "23505": 1}
    assert x.routes == {"primary": 2, "r1": 2}
    assert (x.first_seen, x.last_seen) == (5.0, 21.0)
    assert sorted(x.applications) == ["a", "b"]
    assert x.sketch.count == 4


def test_a_late_restore_merges_into_the_live_entries() -> None:
    """The PostgreSQL store may restore an instance's state after it recorded (the database
    was down at start): sessions keep recording into the same entries."""
    old = _profiler()
    _traffic_x(old)
    sections = StateFile.collect(profiler_contributors(old))
    live = _profiler()
    ctx = _ctx(1, "web")
    live.record(ctx, "select * from players where team_id = $1", 0, b"1", 3, None, 1.0, 1.001)
    entry = next(iter(live.stats.entries.values()))
    from sqlproxy.state import restore_sections

    restored, failed = restore_sections(profiler_contributors(live),
                                        {n: (v, d) for n, v, d in sections})
    assert not failed and "statistics" in restored
    assert next(e for e in live.stats.entries.values() if e.query == entry.query) is entry
    live.record(ctx, "select * from players where team_id = $1", 0, b"2", 3, None, 2.0, 2.001)
    assert entry.calls == 40 + 2
    assert live.executions == old.executions + 2


def test_an_incompatible_section_is_left_out_and_named() -> None:
    a, b = _profiler(), _profiler()
    _traffic_x(a)
    _traffic_y(b)
    bad = live_sections(profiler_contributors(b))
    bad["transactions"] = (99, bad["transactions"][1])
    view, problems = fleet_view(AnalysisSection(), [
        ("a", live_sections(profiler_contributors(a))), ("b", bad)])
    assert len(problems) == 1 and problems[0].startswith("b: section transactions")
    assert view.executions == a.executions + b.executions  # the rest of b is there
    assert [t["transactions"] for t in view.transaction_summary()] == [1]


def test_view_is_unbounded_by_the_local_limits() -> None:
    a, b = Profiler(AnalysisSection(max_fingerprints=10)), Profiler(
        AnalysisSection(max_fingerprints=10))
    for p, name in ((a, "a"), (b, "b")):
        ctx = _ctx(1, name)
        for i in range(10):
            p.record(ctx, f"select {name}{i} from t", 0, b"", 1, None, 1.0, 1.001)
    view, _ = fleet_view(AnalysisSection(max_fingerprints=10), [
        ("a", live_sections(profiler_contributors(a))),
        ("b", live_sections(profiler_contributors(b)))])
    assert len(view.stats.entries) == 20


def test_retry_delay_doubles_up_to_the_cap() -> None:
    assert retry_delay(0) == 0.0
    delays = [retry_delay(n, initial=0.5, cap=8.0) for n in range(1, 8)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert retry_delay(3, 1.2, initial=0.5, cap=8.0) == pytest.approx(2.4)
    assert retry_delay(10_000) == 30.0
