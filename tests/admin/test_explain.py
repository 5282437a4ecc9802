"""EXPLAIN through the admin API on a real table, and the advice it gives."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sqlproxy.analysis.normalize import normalize
from tests.admin.conftest import Admin, run
from tests.support import pg
from tests.support.proxy import ProxyThread

MakeAdmin = Callable[..., tuple[ProxyThread, Admin]]

BY_EMAIL = "select id, status from users where email = 'user4242@example.com'"
BY_STATUS_AND_TIME = ("select id from users where created_at > '2024-06-01' "
                      "and status = 'status7'")


def fp(sql: str) -> str:
    return normalize(sql).fingerprint


@pytest.fixture
def users_db(db: str, pg_primary: pg.PgCluster) -> Iterator[str]:
    """A table large enough for the planner to care, with no index but the primary key."""
    pg_primary.psql(
        "create table users (id serial primary key, email text not null, status text not null,"
        " created_at timestamptz not null);"
        "insert into users (email, status, created_at) select 'user' || g || '@example.com',"
        " 'status' || (g % 50), timestamptz '2024-01-01' + g * interval '5 minutes'"
        " from generate_series(1, 60000) g;"
        "analyze users;", dbname=db)
    yield db


def explain(admin: Admin, sql: str, **body: Any) -> dict[str, Any]:
    r = admin.post(f"/api/queries/{fp(sql)}/explain", body or None)
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


def kinds(result: dict[str, Any]) -> list[str]:
    return [a["kind"] for a in result["advice"]]


def node_types(plan: Any) -> set[str]:
    out = set()

    def walk(node: dict[str, Any]) -> None:
        out.add(node["Node Type"])
        for child in node.get("Plans", ()):
            walk(child)

    walk(plan[0]["Plan"])
    return out


def test_missing_index_advice_goes_away_after_create_index(
    admin_proxy: MakeAdmin, users_db: str, pg_primary: pg.PgCluster
) -> None:
    proxy, admin = admin_proxy()
    run(proxy, users_db, BY_EMAIL)
    result = explain(admin, BY_EMAIL)
    assert result["generic_plan"] is True and result["parameters"] == "generic"
    assert result["database"] == users_db and result["analyze"] is False
    assert "4242" not in str(result), "no parameter values without capture_parameters"
    assert "Seq Scan" in node_types(result["plan"])
    [advice] = [a for a in result["advice"] if a["kind"] == "missing_index"]
    assert advice["relation"] == "public.users"
    assert advice["columns"] == ["email"]
    assert advice["suggestion"] == "CREATE INDEX CONCURRENTLY ON public.users (email);"
    assert advice["table_rows"] == 60000

    detail = admin.json(f"/api/queries/{fp(BY_EMAIL)}")
    assert detail["explain"]["advice"] == result["advice"]

    pg_primary.psql("create index users_email on users (email)", dbname=users_db)
    after = explain(admin, BY_EMAIL)
    assert "missing_index" not in kinds(after), after["advice"]
    assert "Seq Scan" not in node_types(after["plan"])


def test_equality_columns_come_first(admin_proxy: MakeAdmin, users_db: str) -> None:
    proxy, admin = admin_proxy()
    run(proxy, users_db, BY_STATUS_AND_TIME)
    result = explain(admin, BY_STATUS_AND_TIME)
    [advice] = [a for a in result["advice"] if a["kind"] == "missing_index"]
    assert advice["columns"] == ["status", "created_at"]
    assert "(status, created_at)" in advice["suggestion"]


def test_unselective_filter_gets_no_index_advice(admin_proxy: MakeAdmin,
                                                 users_db: str) -> None:
    proxy, admin = admin_proxy(analysis={"capture_parameters": True})
    sql = "select id from users where status <> 'status1'"
    run(proxy, users_db, sql)
    result = explain(admin, sql)
    assert result["parameters"] == "captured" and result["generic_plan"] is False
    assert "missing_index" not in kinds(result)


def test_analyze_read_only_with_captured_parameters(admin_proxy: MakeAdmin,
                                                   users_db: str) -> None:
    proxy, admin = admin_proxy(analysis={"capture_parameters": True})
    run(proxy, users_db, BY_EMAIL)
    result = explain(admin, BY_EMAIL, analyze=True)
    assert result["analyze"] is True and result["execution_ms"] is not None
    assert "user4242@example.com" in result["query"]
    scan = result["plan"][0]["Plan"]
    assert scan["Actual Rows"] == 1 and scan["Rows Removed by Filter"] == 59999
    [advice] = [a for a in result["advice"] if a["kind"] == "missing_index"]
    assert advice["basis"] == "actual"


def test_analyze_without_values_falls_back_to_generic(admin_proxy: MakeAdmin,
                                                      users_db: str) -> None:
    proxy, admin = admin_proxy()
    run(proxy, users_db, BY_EMAIL)
    result = explain(admin, BY_EMAIL, analyze=True)
    assert result["analyze"] is False and result["generic_plan"] is True
    assert "capture_parameters" in result["notes"][0]


def test_analyze_of_a_write_needs_insist_and_config(admin_proxy: MakeAdmin, users_db: str,
                                                    pg_primary: pg.PgCluster) -> None:
    sql = "delete from users where id < 100"
    count = "select count(*) from users"
    proxy, admin = admin_proxy(analysis={"capture_parameters": True})
    run(proxy, users_db, "begin", sql, "rollback")
    plain = explain(admin, sql)  # without ANALYZE: planned, never executed
    assert plain["analyze"] is False and "ModifyTable" in node_types(plain["plan"])
    r = admin.post(f"/api/queries/{fp(sql)}/explain", {"analyze": True})
    assert r.status_code == 403 and "insist" in r.json()["error"]
    r = admin.post(f"/api/queries/{fp(sql)}/explain", {"analyze": True, "insist": True})
    assert r.status_code == 403 and "allow_analyze_writes" in r.json()["error"]

    proxy2, admin2 = admin_proxy(analysis={"capture_parameters": True},
                                 admin={"allow_analyze_writes": True})
    run(proxy2, users_db, "begin", sql, "rollback")
    result = explain(admin2, sql, analyze=True, insist=True)
    assert result["analyze"] is True
    assert result["plan"][0]["Plan"]["Plans"][0]["Actual Rows"] == 99
    assert pg_primary.psql(count, dbname=users_db).strip().endswith("60000"), "rolled back"


def test_explain_errors(admin_proxy: MakeAdmin, users_db: str) -> None:
    proxy, admin = admin_proxy()
    run(proxy, users_db, "set application_name = 'x'", BY_EMAIL)
    r = admin.post(f"/api/queries/{fp('set application_name = $1')}/explain")
    assert r.status_code == 400 and "cannot EXPLAIN a set statement" in r.json()["error"]
    r = admin.post("/api/queries/0123456789abcdef/explain")
    assert r.status_code == 404 and "unknown fingerprint" in r.json()["error"]
    r = admin.post(f"/api/queries/{fp(BY_EMAIL)}/explain", {"analyze": "yes"})
    assert r.status_code == 422 and "analyze" in r.json()["error"]
    r = admin.post(f"/api/queries/{fp(BY_EMAIL)}/explain", {"bogus": True})
    assert r.status_code == 422 and "bogus" in r.json()["error"]
    r = admin.http.post(f"/api/queries/{fp(BY_EMAIL)}/explain", content=b"{not json",
                        headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["error"]


def test_auto_explain_of_slow_fingerprints(admin_proxy: MakeAdmin, users_db: str) -> None:
    proxy, admin = admin_proxy(analysis={"slow_query_ms": 0}, admin={"auto_explain": True})
    run(proxy, users_db, BY_EMAIL)
    assert proxy.runtime is not None and proxy.runtime.admin is not None and proxy.loop
    auto = proxy.runtime.admin.state.auto_explainer
    done = asyncio.run_coroutine_threadsafe(auto.tick(), proxy.loop).result(60)
    assert done == 1
    detail = admin.json(f"/api/queries/{fp(BY_EMAIL)}")
    assert detail["explain"] is not None
    assert "missing_index" in kinds(detail["explain"])
    # Rate limit: the same fingerprint is not explained again within the TTL.
    run(proxy, users_db, BY_EMAIL)
    again = asyncio.run_coroutine_threadsafe(auto.tick(), proxy.loop).result(60)
    assert again == 0
