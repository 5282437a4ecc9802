"""Routing against a real primary and a real streaming replica.

Where a statement ran is checked on the servers themselves, with their pg_stat_statements.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.clients import unique_name
from tests.support.pg import PgCluster
from tests.support.proxy import ProxyThread


def calls(cluster: PgCluster, marker: str, dbname: str = "postgres") -> int:
    out = cluster.psql(
        "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
        f"WHERE query LIKE '%{marker}%' AND query NOT LIKE '%pg_stat_statements%'",
        dbname=dbname,
    )
    return int(out or 0)


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def router_of(proxy: ProxyThread) -> Any:
    assert proxy.runtime is not None
    return proxy.runtime.proxy.router


def wait_ready(proxy: ProxyThread, dbname: str = "postgres") -> None:
    router = router_of(proxy)
    wait_for(lambda: proxy.call(lambda: all(r.healthy for r in router.replicas)
                                and router.catalog_loaded(dbname)),
             what="replicas in rotation and the function catalog loaded")


@pytest.fixture
def routed(make_proxy: Callable[..., ProxyThread], pg_replica: PgCluster) -> Iterator[ProxyThread]:
    pg_replica.set_apply_delay(0)
    p = make_proxy(routing={"enabled": True, "health_interval_ms": 50},
                   replicas=[{"url": pg_replica.dsn(), "name": "r1"}])
    wait_ready(p)
    yield p


@pytest.fixture
def table(pg_primary: PgCluster, pg_replica: PgCluster) -> Iterator[str]:
    name = unique_name("rt")
    pg_primary.psql(f"CREATE TABLE {name} (id int PRIMARY KEY, v text);"
                    f"INSERT INTO {name} SELECT g, 'v' || g FROM generate_series(1, 10) g")
    pg_replica.wait_for_replay()
    yield name
    pg_primary.psql(f"DROP TABLE IF EXISTS {name}")


def test_psql_reads_on_replica_writes_on_primary(
    routed: ProxyThread, table: str, pg_primary: PgCluster, pg_replica: PgCluster
) -> None:
    from tests.support.clients import client_env, run
    psql = str(pg_primary.bindir / "psql")
    script = (f"SELECT count(*) FROM {table};\n"
              f"SELECT v FROM {table} WHERE id = 3;\n"
              f"UPDATE {table} SET v = 'x' WHERE id = 1;\n")
    res = run([psql, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", routed.dsn(), "-c",
               f"SELECT count(*) FROM {table}"], env=client_env())
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "10"
    res = run([psql, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", routed.dsn(), "-f", "-"],
              env=client_env(), input=script)
    assert res.returncode == 0, res.stderr
    assert calls(pg_replica, f"SELECT count(*) FROM {table}") == 2
    assert calls(pg_primary, f"SELECT count(*) FROM {table}") == 0
    assert calls(pg_primary, f"UPDATE {table}") == 1
    assert calls(pg_replica, f"UPDATE {table}") == 0
