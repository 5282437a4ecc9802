"""The pattern detector on synthetic executions, fed through ``Profiler.record``.

Timestamps are made up (perf_counter seconds); no test measures anything.
"""

from __future__ import annotations

from typing import Any

import pytest

from sqlproxy.analysis.detector import LOOP_BODY_MAX, MAX_BURST, MAX_DIGESTS, thresholds_for
from sqlproxy.analysis.findings import KINDS, FindingsStore, lookup_column
from sqlproxy.analysis.normalize import normalize
from sqlproxy.analysis.profiler import Profiler, SessionInfo
from sqlproxy.config import AnalysisSection, ApplicationThresholds

TEAMS = "select id, name from teams"
PLAYERS = "select id, name from players where team_id = $1"
COACH = "select id, name from coaches where team_id = $1"
INSERT = "insert into events (id, v) values ($1, $2)"


def fp(sql: str) -> str:
    return normalize(sql).fingerprint


def Ctx(id: int = 1, application_name: str = "app", database: str = "db") -> SessionInfo:
    """A session as the profiler sees it (no conversation: round trips judged by timing)."""
    return SessionInfo(id, "127.0.0.1:1", database, "u", application_name)


class Feed:
    """Feeds one connection's executions with a clock in milliseconds."""

    def __init__(self, prof: Profiler, ctx: SessionInfo | None = None) -> None:
        self.prof = prof
        self.ctx = ctx or Ctx()
        self.t = 1000.0  # ms

    def run(self, sql: str, params: int = 0, rows: int = 1, *, idle: float = 1.0,
            ms: float = 0.5, error: str | None = None) -> None:
        """One execution starting ``idle`` ms after the previous one ended; ``params`` stands
        for its Bind parameter values (0: none)."""
        start = self.t + idle
        self.t = start + ms
        bind = params.to_bytes(8, "big", signed=True) if params else b""
        self.prof.record(self.ctx, sql, 0, bind, rows, error, start / 1000, self.t / 1000)

    def pause(self, ms: float) -> None:
        self.t += ms

    def close(self) -> None:
        self.prof.session_closed(self.ctx)


def profiler(**analysis: Any) -> Profiler:
    return Profiler(AnalysisSection(**analysis))


def found(prof: Profiler, kind: str | None = None, **filters: Any) -> list[dict[str, Any]]:
    return prof.findings(kind, limit=1000, **filters)[0]


def only(prof: Profiler, kind: str) -> dict[str, Any]:
    items = found(prof, kind)
    assert len(items) == 1, items
    return items[0]


def lazy_load(f: Feed, teams: int = 10) -> None:
    f.run(TEAMS, rows=teams)
    for i in range(teams):
        f.run(PLAYERS, params=100 + i, rows=3)


# ------------------------------------------------------------------------------ N+1


def test_n_plus_one_with_parent() -> None:
    prof = profiler()
    f = Feed(prof)
    f.run("begin")
    lazy_load(f, 10)
    f.run("commit")
    f.close()
    assert [i["kind"] for i in found(prof)] == ["n_plus_one"]
    item = only(prof, "n_plus_one")
    assert item["fingerprint"] == fp(PLAYERS)
    assert item["parent_fingerprint"] == fp(TEAMS)
    assert item["query"] == normalize(PLAYERS).text
    assert item["parent_query"] == normalize(TEAMS).text
    assert item["occurrences"] == 1 and item["max_burst"] == 10
    assert item["total_ms"] == pytest.approx(10 * 0.5)
    assert item["application"] == "app" and item["databases"] == ["db"]
    assert "selectinload" in item["suggestion"] and "team_id = ANY($1)" in item["suggestion"]
    assert "players" in item["suggestion"] and "teams" in item["suggestion"]
    assert item["first_seen"].endswith("Z") and item["last_seen"] >= item["first_seen"]
    assert "10 x" in item["example"]
    for key in ("kind", "fingerprint", "query", "parent_fingerprint", "parent_query",
                "occurrences", "max_burst", "total_ms", "application", "suggestion",
                "first_seen", "last_seen", "example"):
        assert key in item
    assert prof.n_plus_one()[0] == [item]


def test_threshold_edge() -> None:
    prof = profiler()
    f = Feed(prof)
    lazy_load(f, 4)  # one below the default threshold of 5
    f.pause(500)
    f.run("select 1")  # the gap ends the burst
    assert found(prof) == []
    lazy_load(f, 5)
    f.close()
    assert only(prof, "n_plus_one")["max_burst"] == 5


def test_parent_needs_enough_rows() -> None:
    prof = profiler()
    f = Feed(prof)
    f.run(TEAMS, rows=3)  # three teams cannot explain ten lookups
    for i in range(10):
        f.run(PLAYERS, params=i)
    f.close()
    item = only(prof, "n_plus_one")
    assert item["parent_fingerprint"] is None and item["parent_query"] is None
    assert "batch these lookups" in item["suggestion"]


def test_gap_splits_bursts() -> None:
    prof = profiler()  # burst_gap_ms = 100
    f = Feed(prof)
    for i in range(8):
        f.run(PLAYERS, params=i, idle=100.0)  # exactly the gap: each its own burst
    f.close()
    assert found(prof) == []

    prof = profiler()
    f = Feed(prof)
    for i in range(8):
        f.run(PLAYERS, params=i, idle=99.0)  # just below the gap: one burst
    f.close()
    assert only(prof, "n_plus_one")["max_burst"] == 8


def test_gap_is_idle_time_not_statement_time() -> None:
    prof = profiler()
    f = Feed(prof)
    for i in range(6):
        f.run(PLAYERS, params=i, ms=500.0, idle=1.0)  # slow statements, no idle time
    f.close()
    assert only(prof, "n_plus_one")["max_burst"] == 6


def test_per_application_thresholds() -> None:
    prof = profiler(applications={"batch": ApplicationThresholds(n_plus_one_threshold=20),
                                  "web": ApplicationThresholds(burst_gap_ms=1000)})
    for app in ("batch", "web", "other"):
        f = Feed(prof, Ctx(id=hash(app) & 0xFFFF, application_name=app))
        for i in range(10):
            f.run(PLAYERS, params=i, idle=200.0)
        f.close()
    items = found(prof)
    assert [i["application"] for i in items] == ["web"]  # batch: 10 < 20; other: gaps
    assert found(prof, application="web") == items
    assert found(prof, application="batch") == []
    t = thresholds_for(AnalysisSection(applications={"x": ApplicationThresholds(deep_offset=7)}),
                       "x")
    assert (t.deep_offset, t.repeats, t.gap, t.large_rows) == (7, 5, 0.1, 10_000)


def test_application_name_change_mid_session() -> None:
    prof = profiler()
    ctx = Ctx(application_name="first")
    f = Feed(prof, ctx)
    lazy_load(f, 6)
    ctx.application_name = "second"
    lazy_load(f, 6)
    f.close()
    assert sorted(i["application"] for i in found(prof)) == ["first", "second"]


def test_interleaved_loop() -> None:
    prof = profiler()
    f = Feed(prof)
    f.run(TEAMS, rows=8)
    for i in range(8):
        f.run(PLAYERS, params=i, rows=11)
        f.run(COACH, params=i, rows=1)
    f.close()
    items = {i["fingerprint"]: i for i in found(prof, "n_plus_one")}
    assert set(items) == {fp(PLAYERS), fp(COACH)}
    for this, other in ((PLAYERS, COACH), (COACH, PLAYERS)):
        item = items[fp(this)]
        assert item["parent_fingerprint"] == fp(TEAMS)
        assert item["interleaved_with"] == [fp(other)]
        assert item["max_burst"] == 8
        assert "coaches" in item["suggestion"] and "players" in item["suggestion"]
    assert found(prof, "repeated_query") == []


def test_sequential_loops_share_the_parent_but_are_not_interleaved() -> None:
    prof = profiler()
    f = Feed(prof)
    f.run(TEAMS, rows=6)
    for i in range(6):
        f.run(PLAYERS, params=i)
    for i in range(6):
        f.run(COACH, params=i)
    f.close()
    items = found(prof, "n_plus_one")
    assert {i["fingerprint"] for i in items} == {fp(PLAYERS), fp(COACH)}
    assert all(i["parent_fingerprint"] == fp(TEAMS) for i in items)
    assert all(i["interleaved_with"] == [] for i in items)


def test_simple_protocol_literals_distinguish_executions() -> None:
    prof = profiler()
    f = Feed(prof)
    f.run("select * from teams", rows=7)
    for i in range(7):
        f.run(f"select * from players where team_id = {i}")
    f.close()
    item = only(prof, "n_plus_one")
    assert item["parent_fingerprint"] == fp("select * from teams")
    assert item["query"] == "select * from players where team_id = $1"


def test_aggregation_across_connections() -> None:
    prof = profiler()
    for conn in (1, 2, 3):
        f = Feed(prof, Ctx(id=conn, database=f"db{conn}"))
        lazy_load(f, 5 + conn)
        f.close()
    item = only(prof, "n_plus_one")
    assert item["occurrences"] == 3
    assert item["max_burst"] == 8
    assert item["executions"] == 6 + 7 + 8
    assert item["databases"] == ["db1", "db2", "db3"]
    assert found(prof, database="db2") == [item]
    assert found(prof, database="nope") == []


def test_connections_do_not_mix() -> None:
    prof = profiler()
    a, b = Feed(prof, Ctx(id=1)), Feed(prof, Ctx(id=2))
    a.run(TEAMS, rows=3)
    b.run(TEAMS, rows=3)
    for i in range(3):  # interleaved in time: six lookups, three per connection
        a.run(PLAYERS, params=i)
        b.t = a.t
        b.run(PLAYERS, params=10 + i)
        a.t = b.t
    a.close()
    b.close()
    assert found(prof) == []


# ------------------------------------------------------------------------------ repeated


def test_repeated_identical_query() -> None:
    prof = profiler()
    f = Feed(prof)
    for _ in range(6):
        f.run("select * from settings where key = $1", params=42)
    f.close()
    item = only(prof, "repeated_query")
    assert item["max_burst"] == 6
    assert "cache" in item["suggestion"]
    assert found(prof, "n_plus_one") == []


def test_repeated_simple_protocol_text() -> None:
    prof = profiler()
    f = Feed(prof)
    for _ in range(5):
        f.run("select * from settings where key = 'theme'")
    f.run("select * from settings where key = 'lang'")
    f.close()
    assert only(prof, "repeated_query")["max_burst"] == 5


def test_four_repeats_are_not_a_finding() -> None:
    prof = profiler()
    f = Feed(prof)
    for v in (1, 1, 1, 1, 2, 3, 4):  # 4 identical, 4 different: both below 5
        f.run("select * from settings where key = $1", params=v)
    f.close()
    assert found(prof) == []


# ------------------------------------------------------------------------------ writes


def test_row_by_row_insert_with_commit_each() -> None:
    prof = profiler()
    f = Feed(prof)
    for i in range(6):
        f.run("begin")
        f.run(INSERT, params=i)
        f.run("commit", ms=2.0)
    f.close()
    kinds = {i["kind"]: i for i in found(prof)}
    assert set(kinds) == {"row_by_row_write", "commit_per_row"}
    assert kinds["row_by_row_write"]["max_burst"] == 6
    assert "executemany" in kinds["row_by_row_write"]["suggestion"]
    assert kinds["commit_per_row"]["max_burst"] == 6
    assert kinds["commit_per_row"]["total_ms"] == pytest.approx(6 * 2.5)
    assert "commit once" in kinds["commit_per_row"]["suggestion"]


def test_row_by_row_in_one_transaction_is_not_commit_per_row() -> None:
    prof = profiler()
    f = Feed(prof)
    f.run("begin")
    for i in range(6):
        f.run("update accounts set n = n + 1 where id = $1", params=i)
    f.run("commit")
    f.close()
    item = only(prof, "row_by_row_write")
    assert "UPDATE … FROM" in item["suggestion"]
    assert found(prof, "commit_per_row") == []


def test_autocommit_writes_each_commit() -> None:
    prof = profiler()
    f = Feed(prof)
    for i in range(5):
        f.run("delete from events where id = $1", params=i)
    f.close()
    assert {i["kind"] for i in found(prof)} == {"row_by_row_write", "commit_per_row"}


def test_transaction_with_more_than_the_write_is_not_commit_per_row() -> None:
    prof = profiler()
    f = Feed(prof)
    for i in range(6):
        f.run("begin")
        f.run(INSERT, params=i)
        f.run("select count(*) from events", rows=1)
        f.run("commit")
    f.close()
    assert {i["kind"] for i in found(prof)} == {"row_by_row_write"}


def test_pipelined_writes_are_a_batch() -> None:
    prof = profiler()
    f = Feed(prof)
    f.run("begin")
    for i in range(50):  # each starts when the previous ends: sent before it ended
        f.run(INSERT, params=i, idle=0.0)
    f.run("commit")
    f.close()
    assert found(prof) == []


def test_multi_row_and_ignored_and_failed_writes() -> None:
    prof = profiler()
    f = Feed(prof)
    for i in range(6):
        f.run("insert into events values ($1, $2), ($3, $4)", params=i, rows=2)
        f.run("/* sqlproxy:ignore */ insert into audit (id) values ($1)", params=i)
        f.run("insert into other (id) values ($1)", params=i, error="23505")
    f.close()
    assert found(prof) == []


# ------------------------------------------------------------------------------ single executions


def test_unbounded_result() -> None:
    prof = profiler()
    f = Feed(prof)
    f.run("select * from big", rows=10_001)
    f.run("select * from big", rows=10_000)  # not more than the threshold
    f.run("select * from big limit 50000", rows=50_000)
    f.pause(1000)
    f.run("select * from big", rows=50_000)
    f.close()
    item = only(prof, "unbounded_result")
    assert item["fingerprint"] == fp("select * from big")
    assert item["occurrences"] == 2 and item["max_rows"] == 50_000
    assert "paginate" in item["suggestion"] and "50000 rows" in item["suggestion"]


def test_deep_offset() -> None:
    prof = profiler(applications={"small": ApplicationThresholds(deep_offset=10)})
    f = Feed(prof)
    f.run("select * from t order by id limit 10 offset 1000", rows=10)
    f.run("select * from t order by id limit 10 offset 5000", rows=10)
    f.run("select * from t order by id limit 10 offset 20", rows=10)
    f.close()
    item = only(prof, "deep_offset")
    assert item["occurrences"] == 1 and item["max_offset"] == 5000
    assert "keyset" in item["suggestion"]
    g = Feed(prof, Ctx(id=2, application_name="small"))
    g.run("select * from t order by id limit 10 offset 20", rows=10)
    g.close()
    assert [i["application"] for i in found(prof, "deep_offset")] == ["app", "small"] or \
        sorted(i["application"] for i in found(prof, "deep_offset")) == ["app", "small"]


def test_ignore_hint() -> None:
    prof = profiler()
    f = Feed(prof)
    f.run("/* sqlproxy:ignore */ select * from teams", rows=10)
    for i in range(10):
        f.run("select * from players where team_id = $1 /* sqlproxy:ignore */", params=i)
    f.run("select * from big -- sqlproxy:ignore", rows=100_000)
    f.close()
    assert found(prof) == []


# ------------------------------------------------------------------------------ lifecycle


def test_open_burst_is_judged_when_idle_and_on_read() -> None:
    prof = profiler()
    f = Feed(prof)
    lazy_load(f, 6)
    # The connection is still open and its burst may go on: nothing to report yet ...
    det = prof.detectors[f.ctx.id]
    assert det.idle_since(f.t / 1000 + 0.05) is False
    prof.detector.flush_idle(f.t / 1000 + 0.05)
    assert prof.detector.findings.select() == []
    # ... but once it has been idle for a gap, a reader sees the finding.
    prof.detector.flush_idle(f.t / 1000 + 0.1)
    assert [x.kind for x in prof.detector.findings.select()] == ["n_plus_one"]
    f.close()
    assert f.ctx.id not in prof.detectors


def test_very_long_burst_is_judged_in_pieces() -> None:
    prof = profiler()
    f = Feed(prof)
    for i in range(MAX_BURST + 10):
        f.run(PLAYERS, params=i, idle=0.01)
    f.close()
    item = only(prof, "n_plus_one")
    assert item["occurrences"] == 2 and item["max_burst"] == MAX_BURST


def test_distinct_values_beyond_the_tracked_ones_are_shown_as_a_floor() -> None:
    prof = profiler()
    f = Feed(prof)
    for i in range(MAX_DIGESTS + 100):
        f.run(PLAYERS, params=i + 1, idle=0.01)
    f.close()
    item = only(prof, "n_plus_one")
    assert item["executions"] == MAX_DIGESTS + 100
    assert item["example"].endswith(f"-- {MAX_DIGESTS}+ different values")
    prof = profiler()
    f = Feed(prof)
    lazy_load(f, 7)
    f.close()
    assert only(prof, "n_plus_one")["example"].endswith("-- 7 different values")


def test_detail_reset_and_errors() -> None:
    prof = profiler()
    f = Feed(prof)
    lazy_load(f, 6)
    f.close()
    item = only(prof, "n_plus_one")
    detail = prof.finding(item["id"])
    assert detail is not None
    assert detail["statement"]["fingerprint"] == fp(PLAYERS)
    assert detail["parent_statement"]["fingerprint"] == fp(TEAMS)
    assert detail["mean_burst"] == 6
    assert prof.finding("0" * 16) is None
    with pytest.raises(ValueError, match="unknown finding kind"):
        prof.findings("nope")
    page, total = prof.findings(limit=0)
    assert (page, total) == ([], 1)
    prof.reset("statistics")
    assert found(prof) != []
    prof.reset("findings")
    assert found(prof) == []
    assert prof.detector.findings.to_state()["findings"] == []


def test_bounded_findings_evict() -> None:
    prof = profiler(max_findings=10)
    f = Feed(prof)
    for t in range(40):
        f.run(f"select * from t{t}", rows=20_000)
    f.close()
    store = prof.detector.findings
    assert len(store) <= 10 and store.evictions >= 30
    assert len(store.by_id) == len(store)


def test_state_round_trip() -> None:
    prof = profiler()
    f = Feed(prof)
    lazy_load(f, 6)
    f.close()
    state = prof.detector.to_state()
    other = profiler()
    g = Feed(other)
    lazy_load(g, 7)
    g.close()
    other.detector.from_state(state, 1)
    item = only(other, "n_plus_one")
    assert item["occurrences"] == 2 and item["max_burst"] == 7
    assert other.finding(item["id"]) is not None


def test_configure_applies_new_thresholds_to_open_connections() -> None:
    prof = profiler()
    f = Feed(prof)
    f.run(TEAMS, rows=3)
    prof.configure(AnalysisSection(n_plus_one_threshold=3))
    for i in range(3):
        f.run(PLAYERS, params=i)
    f.close()
    assert only(prof, "n_plus_one")["parent_fingerprint"] == fp(TEAMS)


def test_store_rejects_unknown_sort() -> None:
    with pytest.raises(ValueError, match="unknown sort key"):
        FindingsStore().select(sort="nope")
    assert "n_plus_one" in KINDS


@pytest.mark.parametrize(
    ("query", "column"),
    [
        ("select * from players where players.team_id = $1", "team_id"),
        ("select players.id from players where $1::integer = players.team_id", "team_id"),
        ('select * from "Player" where "teamId" = $1', '"teamId"'),
        ("select * from t", None),
    ],
)
def test_lookup_column(query: str, column: str | None) -> None:
    assert lookup_column(query) == column


def test_repeated_query_with_writes_between_is_not_a_cache_hint() -> None:
    prof = profiler()
    f = Feed(prof)
    f.run("begin")
    for i in range(6):
        f.run(INSERT, params=i, idle=0.0)  # pipelined: not row-by-row either
        f.run("select count(*) from events", idle=0.0)
    f.run("commit")
    f.close()
    assert found(prof) == []


def test_sparse_repetition_on_a_busy_connection_is_no_loop() -> None:
    prof = profiler()
    f = Feed(prof)
    for i in range(8):  # a busy connection: one lookup among many other statements
        f.run(PLAYERS, params=i)
        for j in range(LOOP_BODY_MAX):
            f.run(f"select * from other{i}_{j} where id = $1", params=i)
    f.close()
    assert found(prof, "n_plus_one") == []

    prof = profiler()
    f = Feed(prof)
    for i in range(8):  # the same with a loop body of LOOP_BODY_MAX statements
        f.run(PLAYERS, params=i)
        for j in range(LOOP_BODY_MAX - 1):
            f.run(f"select * from other{j} where id = $1", params=i)
    f.close()
    assert len(found(prof, "n_plus_one")) == LOOP_BODY_MAX


def test_the_last_run_is_forgotten_with_the_runs() -> None:
    """The run observed last is kept at hand (no lookup for the same statement again); a
    flush at a gap or a reset forgets it with the runs, so counting begins afresh."""
    prof = profiler()
    f = Feed(prof)
    for i in range(3):
        f.run(PLAYERS, params=i + 1)
    det = f.ctx.detector
    assert det is not None
    (run,) = det.runs.values()
    assert run.count == 3 and det.last_run is run
    prof.detector.reset()
    assert det.last_run is None and not det.runs
    f.run(PLAYERS, params=9)
    (again,) = det.runs.values()
    assert again is not run and again.count == 1 and det.last_run is again
    f.pause(10_000)  # a gap: the burst is judged, its runs forgotten
    f.run(PLAYERS, params=10)
    (third,) = det.runs.values()
    assert third is not again and third.count == 1 and len(third.digests) == 1
