"""Plan advice and latency history: pure functions, synthetic inputs."""

from __future__ import annotations

from typing import Any

import pytest

from sqlproxy.admin.advice import TableInfo, advise, filter_columns
from sqlproxy.admin.history import History, bins_quantiles
from sqlproxy.admin.params import APIError, time_param
from sqlproxy.analysis.stats import StatEntry

USERS = TableInfo("public", "users", 100_000.0, ("id", "email", "status", "created_at", "Name"),
                  (("id",),))
TABLES = {("public", "users"): USERS}


@pytest.mark.parametrize(("expr", "columns"), [
    ("(email = $1)", ["email"]),
    ("((email)::text = 'a = b'::text)", ["email"]),
    ("((created_at > $1) AND (status = $2))", ["status", "created_at"]),
    ("((users.status = 'x'::text) AND (users.created_at <= now()))", ["status", "created_at"]),
    ("(id = ANY ('{1,2,3}'::integer[]))", ["id"]),
    ("(deleted_at IS NULL)", ["deleted_at"]),
    ("(deleted_at IS NOT NULL)", []),
    ("(status <> 'x'::text)", []),
    ("(lower(email) = 'x'::text)", []),
    ('("Name" = $1)', ["Name"]),
    ("((email ~~ 'abc%'::text) AND (status = $1))", ["status", "email"]),
])
def test_filter_columns(expr: str, columns: list[str]) -> None:
    assert filter_columns(expr) == columns


def seq_scan(filter_: str, rows: float, **extra: Any) -> list[dict[str, Any]]:
    return [{"Plan": {"Node Type": "Seq Scan", "Relation Name": "users", "Schema": "public",
                      "Alias": "users", "Plan Rows": rows, "Filter": filter_, **extra}}]


def test_seq_scan_advice() -> None:
    [a] = advise(seq_scan('("Name" = $1)', 10), TABLES)
    assert a["kind"] == "missing_index"
    assert a["suggestion"] == 'CREATE INDEX CONCURRENTLY ON public.users ("Name");'
    assert advise(seq_scan("(email = $1)", 50_000), TABLES) == []  # not selective
    small = {("public", "users"): TableInfo("public", "users", 500.0, USERS.columns)}
    assert advise(seq_scan("(email = $1)", 1), small) == []  # small table
    assert advise(seq_scan("(lower(email) = $1)", 1), TABLES) == []  # expression
    [stale] = advise(seq_scan("(id = $1)", 1), TABLES)
    assert stale["kind"] == "stale_statistics" and stale["suggestion"].startswith("ANALYZE")
    never = {("public", "users"): TableInfo("public", "users", -1.0, USERS.columns)}
    [n] = advise(seq_scan("(email = $1)", 1), never)
    assert n["kind"] == "never_analyzed"


def test_misestimate_and_spills() -> None:
    plan = [{"Plan": {
        "Node Type": "Sort", "Plan Rows": 10, "Actual Rows": 5000, "Actual Loops": 1,
        "Sort Key": ["users.email"], "Sort Method": "external merge",
        "Sort Space Used": 9000, "Sort Space Type": "Disk",
        "Plans": [{"Node Type": "Hash", "Plan Rows": 100, "Actual Rows": 100,
                   "Actual Loops": 1, "Hash Batches": 4, "Peak Memory Usage": 4000}],
    }}]
    by_kind = {a["kind"]: a for a in advise(plan, TABLES)}
    assert set(by_kind) == {"row_misestimate", "sort_spill", "hash_spill"}
    assert by_kind["row_misestimate"]["factor"] == 500
    assert "work_mem" in by_kind["sort_spill"]["suggestion"]
    # Within 10x, or tiny on both sides: nothing to say.
    ok = [{"Plan": {"Node Type": "Seq Scan", "Plan Rows": 100, "Actual Rows": 900,
                    "Actual Loops": 1}}]
    assert advise(ok, TABLES) == []
    tiny = [{"Plan": {"Node Type": "Seq Scan", "Plan Rows": 1, "Actual Rows": 40,
                      "Actual Loops": 1}}]
    assert advise(tiny, TABLES) == []


def test_history_intervals() -> None:
    e = StatEntry("f" * 16, "db", "u", "select $1", "select", 0.0)
    h = History(interval=1.0, size=3)
    for _ in range(10):
        e.add(0.010, 1, None, "app", "primary", 1.0)
    h.tick([e], now=1.0)
    for _ in range(10):
        e.add(0.100, 1, "22012", "app", "primary", 2.0)
    h.tick([e], now=2.0)
    h.tick([e], now=3.0)
    newest, middle, oldest = h.points(e.fingerprint)
    assert oldest.calls == 10 and oldest.p50_ms == pytest.approx(10, rel=0.02)
    assert middle.calls == 10 and middle.errors == 10
    assert middle.p50_ms == pytest.approx(100, rel=0.02)
    assert middle.mean_ms == pytest.approx(100, rel=0.001)
    assert newest.calls == 0 and newest.p50_ms is None
    h.tick([e], now=4.0)
    assert len(h.points(e.fingerprint)) == 3  # bounded
    assert bins_quantiles(1.02, {}, (0.5,)) == [None]


def test_time_param() -> None:
    from starlette.datastructures import QueryParams

    assert time_param(QueryParams("since=2026-01-01T00:00:00Z"), "since") == 1767225600.0
    assert time_param(QueryParams("since=2026-01-01T00:00:00"), "since") == 1767225600.0
    assert time_param(QueryParams("since=1767225600.5"), "since") == 1767225600.5
    assert time_param(QueryParams(""), "since") is None
    with pytest.raises(APIError):
        time_param(QueryParams("since=soon"), "since")
