"""/metrics: parsed with prometheus_client's own parser, counters monotonic, top-N bounded."""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.admin.conftest import Admin, run
from tests.support.proxy import ProxyThread

MakeAdmin = Callable[..., tuple[ProxyThread, Admin]]


def scrape(admin: Admin) -> dict[str, list[Sample]]:
    r = admin.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(r.text)}


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = [s.value for s in samples
             if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, samples)
    return found[0]


def test_metrics_parse_and_count(admin_proxy: MakeAdmin, db: str) -> None:
    proxy, admin = admin_proxy(analysis={"slow_query_ms": 0}, admin={"metrics_top_n": 2})
    with psycopg.connect(proxy.dsn(dbname=db), autocommit=True) as conn:
        for i in range(5):
            conn.execute(f"select {i}")
        conn.execute("select g from generate_series(1, 3) g")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select 1/0")
        conn.execute("create temp table t (x int)")
        m = scrape(admin)
        assert value(m["sqlproxy_client_connections"], "sqlproxy_client_connections",
                     state="ready") >= 1
    assert value(m["sqlproxy_accepting"], "sqlproxy_accepting") == 1
    statements = value(m["sqlproxy_statements"], "sqlproxy_statements_total", route="primary")
    assert statements >= 8
    assert value(m["sqlproxy_statement_errors"], "sqlproxy_statement_errors_total",
                 sqlstate="22012") == 1
    hist = m["sqlproxy_statement_duration_seconds"]
    buckets = [s for s in hist if s.name.endswith("_bucket") and s.labels["kind"] == "select"]
    counts = [s.value for s in buckets]
    assert counts == sorted(counts), "cumulative buckets"
    assert buckets[-1].labels["le"] == "+Inf"
    select_count = value(hist, "sqlproxy_statement_duration_seconds_count", kind="select")
    assert select_count == counts[-1] >= 7
    assert value(hist, "sqlproxy_statement_duration_seconds_sum", kind="select") > 0
    assert value(hist, "sqlproxy_statement_duration_seconds_count", kind="ddl") == 1
    assert value(m["sqlproxy_backend_up"], "sqlproxy_backend_up",
                 backend="primary", role="primary") == 1
    assert value(m["sqlproxy_slow_queries"], "sqlproxy_slow_queries_total") >= 8
    assert "sqlproxy_fingerprint_evictions" in m and "sqlproxy_findings" in m
    # Per-fingerprint series: only the top N.
    fingerprints = {s.labels["fingerprint"] for s in m["sqlproxy_query_calls"]}
    assert len(fingerprints) == 2
    assert {s.labels["fingerprint"] for s in m["sqlproxy_query_info"]} == fingerprints


def test_counters_survive_reset_and_eviction(admin_proxy: MakeAdmin, db: str) -> None:
    proxy, admin = admin_proxy(analysis={"max_fingerprints": 10})
    run(proxy, db, *[f"select {i} as a{i}" for i in range(30)])  # 30 shapes: evictions
    m1 = scrape(admin)
    total1 = value(m1["sqlproxy_statements"], "sqlproxy_statements_total", route="primary")
    assert total1 == 30
    assert value(m1["sqlproxy_fingerprint_evictions"],
                 "sqlproxy_fingerprint_evictions_total") > 0
    assert admin.post("/api/reset").status_code == 200
    run(proxy, db, "select 1", "select 2")
    m2 = scrape(admin)
    total2 = value(m2["sqlproxy_statements"], "sqlproxy_statements_total", route="primary")
    assert total2 == total1 + 2, "a reset must not make a counter go down"
    c1 = value(m1["sqlproxy_statement_duration_seconds"],
               "sqlproxy_statement_duration_seconds_count", kind="select")
    c2 = value(m2["sqlproxy_statement_duration_seconds"],
               "sqlproxy_statement_duration_seconds_count", kind="select")
    assert c2 == c1 + 2


def test_findings_by_kind(admin_proxy: MakeAdmin, db: str) -> None:
    proxy, admin = admin_proxy(analysis={"n_plus_one_threshold": 3})
    run(proxy, db, "create table item (id int primary key)",
        "insert into item select generate_series(1, 5)")
    with psycopg.connect(proxy.dsn(dbname=db), autocommit=True) as conn:
        ids = [r[0] for r in conn.execute("select id from item")]
        for i in ids:
            conn.execute("select id from item where id = %s", (i,))
    # The burst is judged when the proxy has seen the connection close (just after we did).
    deadline = time.monotonic() + 10
    while admin.json("/api/n-plus-one")["total"] < 1:
        assert time.monotonic() < deadline, "no N+1 finding"
        time.sleep(0.05)
    m = scrape(admin)
    assert value(m["sqlproxy_findings"], "sqlproxy_findings", kind="n_plus_one") >= 1
