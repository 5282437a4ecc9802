"""The admin API's HTTP contract, against a real proxy in front of a real PostgreSQL."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from sqlproxy.analysis.normalize import normalize
from tests.admin.conftest import Admin, run
from tests.support import pg
from tests.support.proxy import ProxyThread

MakeAdmin = Callable[..., tuple[ProxyThread, Admin]]

QUERY_KEYS = {"fingerprint", "query", "calls", "rows", "errors", "total_ms", "mean_ms", "min_ms",
              "max_ms", "stddev_ms", "p50_ms", "p95_ms", "p99_ms", "database", "user",
              "applications", "routes", "first_seen", "last_seen"}
FINDING_KEYS = {"kind", "fingerprint", "query", "parent_fingerprint", "parent_query",
                "occurrences", "max_burst", "total_ms", "application", "suggestion",
                "first_seen", "last_seen"}


SELECT_LITERAL = "select 'v' as x"


def fp(sql: str) -> str:
    return normalize(sql).fingerprint


def is_iso_utc(value: str) -> bool:
    return value.endswith("Z") and datetime.fromisoformat(value.replace("Z", "+00:00")) is not None


def assert_error(r: Any, status: int, word: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert word in body["error"], body


# ------------------------------------------------------------------------------ health
def test_healthz_ok(admin_proxy: MakeAdmin) -> None:
    _, admin = admin_proxy()
    r = admin.get("/healthz")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok" and body["failed"] == []
    assert body["checks"]["proxy"]["ok"] and body["checks"]["primary"]["ok"]


def test_healthz_names_the_failed_check(admin_proxy: MakeAdmin) -> None:
    dead = f"postgresql://postgres@127.0.0.1:{pg.free_port()}/postgres"
    _proxy, admin = admin_proxy(proxy={"primary": dead, "connect_timeout": 1.0})
    r = admin.get("/healthz")
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "unavailable"
    assert body["failed"] == ["primary"]
    assert body["checks"]["primary"]["error"]
    backends = admin.json("/api/backends")["items"]
    assert backends[0]["name"] == "primary" and backends[0]["healthy"] is False


def test_workers_lists_the_single_process(admin_proxy: MakeAdmin) -> None:
    """With workers = 1 the process is the only worker (the supervisor's list is in
    tests/workers)."""
    _proxy, admin = admin_proxy()
    items = admin.json("/api/workers")["items"]
    assert len(items) == 1
    w = items[0]
    assert w["worker"] == 0 and w["pid"] == os.getpid() and w["alive"] is True
    assert w["restarts"] == 0 and w["last_exit"] is None and w["started_at"].endswith("Z")
    assert 'sqlproxy_worker_up{worker="0"} 1.0' in admin.get("/metrics").text


# ------------------------------------------------------------------------------ queries
def test_queries_items_pagination_sort_and_filters(admin_proxy: MakeAdmin, db: str) -> None:
    proxy, admin = admin_proxy()
    run(proxy, db, *["select 1"] * 5, "select g from generate_series(1, 10) g", app="app-a")
    run(proxy, db, *["select 2 + 2"] * 3, app="app-b")
    body = admin.json("/api/queries", database=db)
    assert set(body) == {"items", "total"}
    assert body["total"] >= 3
    by_fp = {i["fingerprint"]: i for i in body["items"]}
    item = by_fp[fp("select 1")]
    assert set(item) >= QUERY_KEYS, QUERY_KEYS - set(item)
    assert item["calls"] == 5 and item["database"] == db and item["user"] == "postgres"
    assert item["routes"] == {"primary": 5}
    assert item["applications"] == ["app-a"]
    assert is_iso_utc(item["first_seen"]) and is_iso_utc(item["last_seen"])
    assert item["min_ms"] <= item["p50_ms"] <= item["max_ms"] * 1.02
    assert by_fp[fp("select g from generate_series(1, 10) g")]["rows"] == 10

    by_calls = admin.json("/api/queries", database=db, sort="calls")["items"]
    calls = [i["calls"] for i in by_calls]
    assert calls == sorted(calls, reverse=True)
    page1 = admin.json("/api/queries", database=db, sort="calls", limit=1)
    page2 = admin.json("/api/queries", database=db, sort="calls", limit=1, offset=1)
    assert page1["total"] == page2["total"] == len(by_calls)
    assert page1["items"] == by_calls[:1] and page2["items"][0]["fingerprint"] == \
        by_calls[1]["fingerprint"]
    for sort in ("total_ms", "mean_ms", "calls", "rows", "p99_ms"):
        assert admin.get("/api/queries", sort=sort).status_code == 200

    app_b = admin.json("/api/queries", database=db, application="app-b")["items"]
    assert [i["fingerprint"] for i in app_b] == [fp("select 2 + 2")]
    assert admin.json("/api/queries", database=db, user="nobody")["total"] == 0
    assert admin.json("/api/queries", database="no_such_db")["items"] == []


@pytest.mark.parametrize(("params", "word"), [
    ({"sort": "bogus"}, "sort"),
    ({"limit": "abc"}, "limit"),
    ({"limit": "0"}, "limit"),
    ({"limit": "100000"}, "limit"),
    ({"offset": "-1"}, "offset"),
])
def test_queries_bad_parameters(admin_proxy: MakeAdmin, params: dict[str, str],
                                word: str) -> None:
    _, admin = admin_proxy()
    r = admin.get("/api/queries", **params)
    assert_error(r, 400, word)
    assert r.json()["parameter"] == word


def test_query_detail_and_unknown_fingerprint(admin_proxy: MakeAdmin, db: str) -> None:
    proxy, admin = admin_proxy(analysis={"slow_query_ms": 0})
    run(proxy, db, "select 'secret-value' as x", "select 'other' as x")
    d = admin.json(f"/api/queries/{fp(SELECT_LITERAL)}")
    assert set(d) >= QUERY_KEYS
    assert d["calls"] == 2
    assert "secret-value" not in str(d), "parameter values must not appear"
    assert "$1" in d["example"]
    assert len(d["slow"]) == 2 and d["slow"][0]["parameters"] is None
    assert d["findings"] == [] and d["explain"] is None

    r = admin.get("/api/queries/0123456789abcdef")
    assert_error(r, 404, "unknown fingerprint")
    assert r.json()["fingerprint"] == "0123456789abcdef"
    r = admin.get("/api/queries/0123456789abcdef/history")
    assert_error(r, 404, "unknown fingerprint")


def test_capture_parameters_shows_values(admin_proxy: MakeAdmin, db: str) -> None:
    proxy, admin = admin_proxy(analysis={"slow_query_ms": 0, "capture_parameters": True})
    run(proxy, db, "select 'visible-value' as x")
    d = admin.json(f"/api/queries/{fp(SELECT_LITERAL)}")
    assert "visible-value" in d["example"]
    assert d["slow"][0]["parameters"] == ["'visible-value'"]


def test_history_points(admin_proxy: MakeAdmin, db: str) -> None:
    proxy, admin = admin_proxy()
    st = proxy.runtime.admin.state  # type: ignore[union-attr]
    run(proxy, db, *["select 42"] * 3)
    proxy.call(st.sample_history)
    run(proxy, db, *["select 42"] * 2)
    proxy.call(st.sample_history)
    body = admin.json(f"/api/queries/{fp('select 42')}/history")
    assert body["total"] == 2
    newest, oldest = body["items"]
    assert (oldest["calls"], newest["calls"]) == (3, 2)
    assert newest["p50_ms"] is not None and newest["mean_ms"] > 0
    assert newest["at"] >= oldest["at"]


# ------------------------------------------------------------------------------ slow log
def test_slow_log_filters(admin_proxy: MakeAdmin, db: str) -> None:
    proxy, admin = admin_proxy(analysis={"slow_query_ms": 0})
    before = datetime.now(UTC) - timedelta(seconds=1)
    run(proxy, db, "select 1", "select pg_sleep(0.05)")
    body = admin.json("/api/slow")
    assert body["total"] >= 2
    ats = [i["at"] for i in body["items"]]
    assert ats == sorted(ats, reverse=True), "newest first"
    assert body["items"][0]["query"].startswith("select pg_sleep")
    assert admin.json("/api/slow", since=before.isoformat())["total"] == body["total"]
    assert admin.json("/api/slow", since=before.timestamp())["total"] == body["total"]
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    assert admin.json("/api/slow", since=future)["total"] == 0
    slowest = admin.json("/api/slow", min_ms=40)
    assert slowest["total"] >= 1
    assert all(i["duration_ms"] >= 40 for i in slowest["items"])
    assert admin.json("/api/slow", limit=1)["items"] == body["items"][:1]
    assert_error(admin.get("/api/slow", since="yesterday"), 400, "since")
    assert_error(admin.get("/api/slow", min_ms="-3"), 400, "min_ms")
    assert_error(admin.get("/api/slow", min_ms="fast"), 400, "min_ms")


# ------------------------------------------------------------------------------ findings
def test_n_plus_one_and_findings(admin_proxy: MakeAdmin, db: str) -> None:
    proxy, admin = admin_proxy(analysis={"n_plus_one_threshold": 3})
    run(proxy, db, "create table author (id int primary key, name text)",
        "insert into author select g, 'a' || g from generate_series(1, 10) g")
    with psycopg.connect(proxy.dsn(dbname=db), application_name="orm",
                         autocommit=True) as conn:
        ids = [r[0] for r in conn.execute("select id from author order by id limit 8")]
        for i in ids:
            conn.execute("select name from author where id = %s", (i,))
        conn.execute("select 1")  # the burst ends
    time.sleep(0.3)  # burst_gap_ms (100) passes; the finding is flushed on read
    body = admin.json("/api/n-plus-one")
    assert body["total"] >= 1, body
    item = body["items"][0]
    assert set(item) >= FINDING_KEYS
    assert item["kind"] == "n_plus_one" and item["application"] == "orm"
    assert "author" in item["query"] and item["parent_query"]
    assert item["suggestion"]
    everything = admin.json("/api/findings")
    assert everything["total"] >= body["total"]
    assert admin.json("/api/findings", kind="n_plus_one")["total"] == body["total"]
    assert admin.json("/api/findings", application="nobody")["total"] == 0
    assert_error(admin.get("/api/findings", kind="bogus"), 400, "bogus")
    detail = admin.json(f"/api/findings/{item['id']}")
    assert detail["kind"] == "n_plus_one"
    assert_error(admin.get("/api/findings/nope"), 404, "unknown finding")
    q = admin.json(f"/api/queries/{item['fingerprint']}")
    assert [f["kind"] for f in q["findings"]] == ["n_plus_one"]

    r = admin.post("/api/reset", {"what": "findings"})
    assert r.status_code == 200 and r.json() == {"reset": "findings"}
    assert admin.json("/api/findings")["total"] == 0
    assert admin.json("/api/queries", database=db)["total"] > 0


# ------------------------------------------------------------------------------ live state
def test_connections_and_backends(admin_proxy: MakeAdmin, db: str) -> None:
    proxy, admin = admin_proxy()
    with psycopg.connect(proxy.dsn(dbname=db), application_name="holder") as conn:
        conn.execute("select 1")  # now idle in transaction
        items = admin.json("/api/connections", application="holder")["items"]
        assert len(items) == 1
        c = items[0]
        assert c["database"] == db and c["user"] == "postgres" and c["state"] == "ready"
        assert c["transaction_status"] == "T"
        assert c["backends"] == ["primary"]
        assert is_iso_utc(c["connected_at"]) and ":" in c["client"]
        assert c["tls"] is None and c["direct_relay"] is True
        assert admin.json("/api/connections", database="elsewhere")["total"] == 0

        backends = admin.json("/api/backends")
        assert backends["total"] == len(backends["items"]) >= 1
        primary = backends["items"][0]
        assert primary["name"] == "primary" and primary["role"] == "primary"
        assert primary["healthy"] is True and primary["in_rotation"] is True
        assert primary["server_connections"] >= 1
        assert primary["routed"] >= 1
        assert primary["address"] == proxy.config.proxy.primary_url.address
    deadline = time.monotonic() + 10  # the proxy sees the disconnect asynchronously
    while admin.json("/api/connections", application="holder")["total"]:
        assert time.monotonic() < deadline, "closed session still listed"
        time.sleep(0.05)


# ------------------------------------------------------------------------------ reset
def test_reset(admin_proxy: MakeAdmin, db: str) -> None:
    proxy, admin = admin_proxy(analysis={"slow_query_ms": 0})
    run(proxy, db, "select 1", "select 2")
    assert admin.post("/api/reset", {"what": "slow"}).json() == {"reset": "slow"}
    assert admin.json("/api/slow")["total"] == 0
    assert admin.json("/api/queries", database=db)["total"] >= 1
    assert_error(admin.post("/api/reset", {"what": "everything"}), 422, "what")
    assert_error(admin.post("/api/reset", {"bogus": 1}), 422, "bogus")
    assert admin.post("/api/reset", what="statistics").json() == {"reset": "statistics"}
    assert admin.json("/api/queries")["total"] == 0
    run(proxy, db, "select 3")
    assert admin.post("/api/reset").json() == {"reset": "all"}
    assert admin.json("/api/queries")["total"] == 0
    assert admin.json("/api/slow")["total"] == 0


def test_transactions(admin_proxy: MakeAdmin, db: str) -> None:
    proxy, admin = admin_proxy()
    with psycopg.connect(proxy.dsn(dbname=db)) as conn:
        conn.execute("select 1")
        conn.commit()
    items = admin.json("/api/transactions")["items"]
    assert any(i["database"] == db and i["transactions"] >= 1 for i in items)


# ------------------------------------------------------------------------------ auth
def test_bearer_token(admin_proxy: MakeAdmin) -> None:
    proxy, admin = admin_proxy(admin={"token": "s3cret-token"})
    assert admin.get("/api/queries").status_code == 200
    anon = Admin(proxy)
    wrong = Admin(proxy, "s3cret-tokem")
    try:
        for path in ("/api/queries", "/api/slow", "/api/findings", "/api/connections",
                     "/api/backends", "/metrics", "/openapi.json", "/api/n-plus-one"):
            r = anon.get(path)
            assert_error(r, 401, "missing bearer token")
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert_error(wrong.get(path), 401, "invalid bearer token")
        assert_error(anon.post("/api/reset"), 401, "bearer")
        assert_error(wrong.post("/api/queries/0123456789abcdef/explain"), 401, "bearer")
        r = anon.http.get("/api/queries", headers={"Authorization": "Basic s3cret-token"})
        assert r.status_code == 401
        assert anon.get("/healthz").status_code == 200
        page = anon.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    finally:
        anon.close()
        wrong.close()


def test_refuses_open_address_without_token(pg_primary: pg.PgCluster) -> None:
    p = ProxyThread.for_primary(pg_primary.dsn(), admin={"listen": "0.0.0.0:0"})
    with pytest.raises(RuntimeError) as info:
        p.start()
    p.stop()
    assert "admin.token" in str(info.value.__cause__)
    p = ProxyThread.for_primary(pg_primary.dsn(),
                                admin={"listen": "0.0.0.0:0", "token": "t0ken"}).start()
    try:
        assert p.runtime is not None and p.runtime.admin_port
    finally:
        p.stop()


def test_admin_disabled(make_proxy: Callable[..., ProxyThread]) -> None:
    p = make_proxy(admin={"enabled": False})
    assert p.runtime is not None and p.runtime.admin_port is None


# ------------------------------------------------------------------------------ misc
def test_openapi_describes_every_route(admin_proxy: MakeAdmin) -> None:
    from sqlproxy.admin.app import ROUTES

    _, admin = admin_proxy()
    spec = admin.json("/openapi.json")
    assert spec["openapi"].startswith("3.")
    for route in ROUTES:
        assert route.path in spec["paths"], route.path
        for method in route.methods or ():
            if method != "HEAD":
                assert method.lower() in spec["paths"][route.path], (route.path, method)
    assert "bearer" in spec["components"]["securitySchemes"]


def test_unknown_path_and_method_are_json(admin_proxy: MakeAdmin) -> None:
    _, admin = admin_proxy()
    assert_error(admin.get("/api/nothing"), 404, "Not Found")
    assert_error(admin.http.delete("/api/queries"), 405, "Method Not Allowed")


def test_dashboard_page_is_served(admin_proxy: MakeAdmin) -> None:
    _, admin = admin_proxy()
    r = admin.get("/")
    assert r.status_code == 200
    assert "<html" in r.text.lower() and "sqlproxy" in r.text


def test_backends_with_a_replica(admin_proxy: MakeAdmin, pg_replica: pg.PgCluster,
                                 db: str) -> None:
    pg_replica.wait_for_replay()
    proxy, admin = admin_proxy(routing={"enabled": True, "health_interval_ms": 100},
                               replicas=[{"url": pg_replica.dsn(), "name": "r1"}])
    deadline = time.monotonic() + 30
    while True:
        items = admin.json("/api/backends")["items"]
        if len(items) == 2 and items[1]["in_rotation"]:
            break
        assert time.monotonic() < deadline, items
        time.sleep(0.1)
    pg_replica.wait_for_replay()
    run(proxy, db, *["select 1"] * 5)
    primary, replica = admin.json("/api/backends")["items"]
    assert primary["name"] == "primary" and primary["healthy"] is True
    assert replica["name"] == "r1" and replica["role"] == "replica"
    assert replica["healthy"] is True and replica["address"] == f"127.0.0.1:{pg_replica.port}"
    assert replica["lag_ms"] is not None and replica["checked_at"]
    assert replica["routed"] >= 1, replica
    assert primary["routed"] + replica["routed"] >= 5
    assert replica["retried"] == 0 and replica["failures"] == 0 and replica["outstanding"] == 0
    assert primary["fallbacks"] >= 0 and primary["pinned_sessions"] == 0
    metrics = admin.get("/metrics").text
    assert 'sqlproxy_backend_up{backend="r1",role="replica"} 1.0' in metrics
    assert 'sqlproxy_backend_in_rotation{backend="r1"} 1.0' in metrics
    assert 'sqlproxy_backend_lag_seconds{backend="r1"}' in metrics
