"""The fleet against real servers: sqlproxy instances sharing a PostgreSQL state database (a
cluster of its own, which these tests stop and start again)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.support import pg
from tests.support.proxy import ProxyThread

MakeProxy = Callable[..., ProxyThread]


@pytest.fixture(scope="module")
def state_cluster(pg_bindir: Path, pg_base_dir: Path) -> Iterator[pg.PgCluster]:
    """The state database's server: a cluster of its own, since some tests stop it."""
    cluster = pg.start_primary(pg_base_dir, "statedb", bindir=pg_bindir)
    yield cluster
    cluster.stop("immediate")


@pytest.fixture
def state_url(state_cluster: pg.PgCluster) -> str:
    """A fresh state database per test (the schema is created by the first instance)."""
    if not state_cluster.is_running():
        state_cluster.start()
    name = f"fleet_{uuid.uuid4().hex[:10]}"
    state_cluster.psql(f"create database {name}")
    return state_cluster.dsn(dbname=name)


@pytest.fixture
def db(pg_primary: pg.PgCluster) -> Iterator[str]:
    """A fresh database for the proxied traffic, so that statistics are easy to attribute."""
    name = f"flt_{uuid.uuid4().hex[:10]}"
    pg_primary.psql(f"create database {name}")
    yield name
    pg_primary.psql(f"drop database {name} with (force)")


def _state(url: str, instance: str) -> dict[str, Any]:
    return {"enabled": True, "url": url, "instance": instance, "snapshot_seconds": 0.25,
            "fleet_window": 20, "timeout": 2.0}


def _http(proxy: ProxyThread, path: str, **params: Any) -> httpx.Response:
    assert proxy.runtime is not None
    return httpx.get(f"http://127.0.0.1:{proxy.runtime.admin_port}{path}", params=params,
                     timeout=30)


def _get(proxy: ProxyThread, path: str, **params: Any) -> Any:
    r = _http(proxy, path, **params)
    assert r.status_code == 200, (r.status_code, r.text)
    return r.json()


def _run(proxy: ProxyThread, db: str, *statements: str, app: str = "fleet-test") -> None:
    with psycopg.connect(proxy.dsn(dbname=db), application_name=app, autocommit=True) as conn:
        for sql in statements:
            conn.execute(sql)


def _wait(cond: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _store(proxy: ProxyThread) -> dict[str, Any]:
    body = _get(proxy, "/healthz")
    store: dict[str, Any] = body["details"]["state_store"]
    return store


Counts = dict[tuple[str, str], tuple[int, int]]


def _queries(proxy: ProxyThread, db: str, scope: str) -> Counts:
    """(fingerprint, user) -> (calls, rows) in ``db``."""
    body = _get(proxy, "/api/queries", database=db, scope=scope, limit=1000)
    return {(q["fingerprint"], q["user"]): (q["calls"], q["rows"]) for q in body["items"]}


def _sum(*parts: Counts) -> Counts:
    out: Counts = {}
    for part in parts:
        for key, (calls, rows) in part.items():
            c, r = out.get(key, (0, 0))
            out[key] = (c + calls, r + rows)
    return out


def _slow_total(proxy: ProxyThread, scope: str) -> int:
    return int(_get(proxy, "/api/slow", scope=scope, limit=1)["total"])


def _fleet_is_sum(proxies: list[ProxyThread], db: str) -> bool:
    expected = _sum(*(_queries(p, db, "local") for p in proxies))
    slow = sum(_slow_total(p, "local") for p in proxies)
    return all(_queries(p, db, "fleet") == expected and _slow_total(p, "fleet") == slow
               for p in proxies)


def test_two_instances_see_the_sum_across_a_restart(make_proxy: MakeProxy, state_url: str,
                                                    db: str) -> None:
    analysis = {"slow_query_ms": 5}
    a = make_proxy(state=_state(state_url, "a"), analysis=analysis)
    b = make_proxy(state=_state(state_url, "b"), analysis=analysis)
    _run(a, db, *["select 1"] * 4, "select g from generate_series(1, 10) g",
         "select pg_sleep(0.01)")
    _run(b, db, *["select 1"] * 3, "select 1 as only_b", *["select pg_sleep(0.01)"] * 2)
    _wait(lambda: _fleet_is_sum([a, b], db), "fleet view = sum of the instances")
    fleet = _queries(a, db, "fleet")
    assert sorted(fleet.values()) == [(1, 1), (1, 10), (3, 3), (7, 7)]
    assert _queries(a, db, "local") != fleet  # local stays this instance's own view
    instances = _get(b, "/api/fleet")["items"]
    assert [(i["instance"], i["local"]) for i in instances] == [("b", True), ("a", False)]
    assert _store(a)["fleet_instances"] == 1 and _store(a)["kind"] == "postgresql"
    findings_a = _get(a, "/api/findings", scope="fleet")["total"]
    assert findings_a == _get(b, "/api/findings", scope="fleet")["total"]

    # Restart a: it reads its own rows back, and the fleet is the sum again.
    before = _queries(a, db, "local")
    a.stop()
    a = make_proxy(state=_state(state_url, "a"), analysis=analysis)
    _wait(lambda: _store(a)["restored"], "a restored its state")
    assert _queries(a, db, "local") == before
    _run(a, db, "select 1", "select 1 as new_on_a")
    _run(b, db, "select 1")
    _wait(lambda: _fleet_is_sum([a, b], db), "fleet view = sum after a's restart")
    assert sorted(_queries(b, db, "fleet").values()) == [(1, 1), (1, 1), (1, 10), (3, 3),
                                                         (9, 9)]
    # ... and across a restart of b.
    b.stop()
    b = make_proxy(state=_state(state_url, "b"), analysis=analysis)
    _wait(lambda: _store(b)["restored"], "b restored its state")
    _wait(lambda: _fleet_is_sum([a, b], db), "fleet view = sum after b's restart")
    assert sorted(_queries(a, db, "fleet").values())[-1] == (9, 9)


def _psql_json(cluster: pg.PgCluster, url: str, sql: str) -> Any:
    dbname = url.rsplit("/", 1)[1]
    out = cluster.psql(sql, dbname=dbname)
    return json.loads(out) if out else None


def _stored_calls(cluster: pg.PgCluster, url: str, instance: str, query: str) -> int:
    data = _psql_json(cluster, url, "select data from sqlproxy_state.sections where instance = "
                                    f"'{instance}' and name = 'statistics'")
    return sum(e["calls"] for e in data["entries"] if e["query"] == query) if data else 0


def test_state_database_down_proxying_unaffected_then_recovered(
        make_proxy: MakeProxy, state_cluster: pg.PgCluster, state_url: str, db: str) -> None:
    proxy = make_proxy(state=_state(state_url, "solo"))
    _wait(lambda: _store(proxy)["ok"] and _store(proxy)["last_snapshot"] is not None,
          "first snapshot written")
    _run(proxy, db, *["select 41 + 1"] * 3)
    _wait(lambda: _stored_calls(state_cluster, state_url, "solo", "select $1 + $2") == 3,
          "the statements reach the state database")

    state_cluster.stop()
    _run(proxy, db, *["select 41 + 1"] * 5)  # the proxy serves as before
    _wait(lambda: not _store(proxy)["ok"], "the failure shows in /healthz")
    r = _http(proxy, "/healthz")
    assert r.status_code == 200, "an unreachable state database is no reason to take us out"
    store = r.json()["details"]["state_store"]
    assert store["error"] and store["retry_in_s"] is not None and store["failures"] >= 1
    assert store["where"] == state_url  # no password in this one to hide
    metrics = _http(proxy, "/metrics").text
    assert 'sqlproxy_state_store_up{kind="postgresql"} 0.0' in metrics
    assert 'sqlproxy_state_store_failures_total{kind="postgresql"}' in metrics
    _run(proxy, db, *["select 41 + 1"] * 2)

    state_cluster.start()
    _wait(lambda: _store(proxy)["ok"], "recovered once the database is back")
    _wait(lambda: _stored_calls(state_cluster, state_url, "solo", "select $1 + $2") == 10,
          "what ran during the outage is written")
    metrics = _http(proxy, "/metrics").text
    assert 'sqlproxy_state_store_up{kind="postgresql"} 1.0' in metrics


def test_started_while_the_state_database_is_down(
        make_proxy: MakeProxy, state_cluster: pg.PgCluster, state_url: str, db: str) -> None:
    """A process starting without its state database serves at once, writes nothing until it
    has read its own rows back, then merges them with what it recorded meanwhile."""
    first = make_proxy(state=_state(state_url, "late"))
    _run(first, db, *["select 6 * 7"] * 4)
    first.stop()  # final snapshot: 4 calls stored
    assert _stored_calls(state_cluster, state_url, "late", "select $1 * $2") == 4
    state_cluster.stop()
    second = make_proxy(state=_state(state_url, "late"))
    _run(second, db, *["select 6 * 7"] * 3)
    store = _store(second)
    assert not store["restored"]
    _wait(lambda: _store(second)["failures"] >= 1, "the outage is seen")
    state_cluster.start()
    _wait(lambda: _store(second)["restored"] and _store(second)["ok"], "restored late")
    calls = {q["query"]: q["calls"] for q in _get(second, "/api/queries", database=db)["items"]}
    assert calls["select $1 * $2"] == 7
    _wait(lambda: _stored_calls(state_cluster, state_url, "late", "select $1 * $2") == 7,
          "the merged state is written")


def test_dashboard_switches_to_the_fleet_view(make_proxy: MakeProxy, state_url: str, db: str,
                                              browser: Any) -> None:
    from tests.admin.test_dashboard import wait_for

    a = make_proxy(state=_state(state_url, "a"))
    b = make_proxy(state=_state(state_url, "b"))
    _run(a, db, *["select 1"] * 2)
    _run(b, db, *["select 1"] * 5, "select 2 as only_b")
    _wait(lambda: _fleet_is_sum([a, b], db), "fleet view = sum of the instances")

    def calls(proxy: ProxyThread, scope: str) -> int:
        items = _get(proxy, "/api/queries", scope=scope, limit=1000)["items"]
        return sum(int(q["calls"]) for q in items)

    local, fleet = calls(a, "local"), calls(a, "fleet")
    assert fleet > local
    browser.get(f"http://127.0.0.1:{a.runtime.admin_port}/")  # type: ignore[union-attr]
    wait_for(browser, "return document.body.dataset.loaded === 'true'")
    wait_for(browser, "return !document.getElementById('scope-label').hidden")
    assert browser.execute_script(
        "return document.querySelector('#scope option[value=fleet]').textContent"
    ) == "fleet (2 instances)"
    wait_for(browser, f"return document.getElementById('c-calls').textContent === '{local}'")
    browser.execute_script("const s = document.getElementById('scope'); s.value = 'fleet';"
                           "s.dispatchEvent(new Event('change'));")
    wait_for(browser, f"return document.getElementById('c-calls').textContent === '{fleet}'")
    assert "select $1 as only_b" in browser.find_element("id", "queries").text


def test_two_processes_with_one_instance_name_are_told(make_proxy: MakeProxy,
                                                       state_url: str) -> None:
    a = make_proxy(state=_state(state_url, "same"))
    b = make_proxy(state=_state(state_url, "same"))
    _wait(lambda: any(_store(p)["warning"] for p in (a, b)), "a shared name is noticed")
    warning = next(_store(p)["warning"] for p in (a, b) if _store(p)["warning"])
    assert "'same'" in warning and "SQLPROXY_STATE__INSTANCE" in warning
