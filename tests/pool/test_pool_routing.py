"""Replica routing in transaction pooling mode, against a real primary and streaming replica.

Where a statement ran is checked on the servers themselves (pg_stat_statements), as in
tests/routing; the replica's server connections are pooled too (their pool in /api/pools).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from tests.routing.test_routing import calls, router_of, wait_for, wait_ready
from tests.support.clients import unique_name
from tests.support.pg import PgCluster
from tests.support.proxy import ProxyThread


@pytest.fixture
def pooled_routed(make_proxy: Callable[..., ProxyThread],
                  pg_replica: PgCluster) -> Iterator[ProxyThread]:
    pg_replica.set_apply_delay(0)
    p = make_proxy(routing={"enabled": True, "health_interval_ms": 50},
                   replicas=[{"url": pg_replica.dsn(), "name": "r1"}],
                   pool={"mode": "transaction", "size": 3, "max_wait_ms": 30_000})
    wait_ready(p)
    yield p


@pytest.fixture
def table(pg_primary: PgCluster, pg_replica: PgCluster) -> Iterator[str]:
    name = unique_name("prt")
    pg_primary.psql(f"CREATE TABLE {name} (id int PRIMARY KEY, v text);"
                    f"INSERT INTO {name} SELECT g, 'v' || g FROM generate_series(1, 10) g")
    pg_replica.wait_for_replay()
    yield name
    pg_primary.psql(f"DROP TABLE IF EXISTS {name}")


def pools(p: ProxyThread) -> dict[str, dict[str, Any]]:
    def get() -> list[dict[str, Any]]:
        rt = p.runtime
        assert rt is not None and rt.proxy.pools is not None
        return rt.proxy.pools.describe()
    return {pool["backend"]: pool for pool in p.call(get)}


def test_reads_on_pooled_replica_writes_on_primary(
    pooled_routed: ProxyThread, table: str, pg_primary: PgCluster, pg_replica: PgCluster,
) -> None:
    with psycopg.connect(pooled_routed.dsn(), autocommit=True) as conn:
        time.sleep(0.3)  # past the read-your-writes horizon of the session's setup
        for i in range(1, 4):
            assert conn.execute(f"SELECT v FROM {table} WHERE id = %s",
                                (i,)).fetchone() == (f"v{i}",)
        conn.execute(f"UPDATE {table} SET v = 'x' WHERE id = 9")
        with conn.transaction():  # a transaction stays on the primary, reads included
            assert conn.execute(f"SELECT count(*) FROM {table} WHERE id < 100").fetchone() \
                == (10,)
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
    assert calls(pg_replica, f"SELECT v FROM {table} WHERE id") == 3
    assert calls(pg_primary, f"SELECT v FROM {table} WHERE id") == 0
    assert calls(pg_primary, f"UPDATE {table}") == 1
    assert calls(pg_replica, f"UPDATE {table}") == 0
    assert calls(pg_primary, f"FROM {table} WHERE id <") == 1
    assert calls(pg_replica, f"FROM {table} WHERE id <") == 0
    by_backend = pools(pooled_routed)
    assert set(by_backend) == {"primary", "r1"}
    assert by_backend["r1"]["checkouts"] >= 3 and by_backend["r1"]["servers"] >= 1
    assert by_backend["r1"]["servers"] <= 3 and by_backend["primary"]["servers"] <= 3


def test_read_your_writes_with_a_delayed_replica(
    pooled_routed: ProxyThread, table: str, pg_replica: PgCluster,
) -> None:
    pg_replica.set_apply_delay(300)
    try:
        with psycopg.connect(pooled_routed.dsn(), autocommit=True) as conn:
            for i in range(10):
                conn.execute(f"UPDATE {table} SET v = %s WHERE id = 5", (f"w{i}",))
                assert conn.execute(f"SELECT v FROM {table} WHERE id = 5").fetchone() == (
                    f"w{i}",)
            before = calls(pg_replica, f"FROM {table} WHERE id")
            wait_for(lambda: (conn.execute(f"SELECT v FROM {table} WHERE id = 4").fetchone()
                              and calls(pg_replica, f"FROM {table} WHERE id") > before),
                     what="reads back on the replica")
    finally:
        pg_replica.set_apply_delay(0)


def test_replica_error_is_retried_on_the_primary(
    pooled_routed: ProxyThread, table: str, pg_primary: PgCluster, pg_replica: PgCluster,
) -> None:
    seq = f"{table}_rseq"
    pg_primary.psql(f"CREATE SEQUENCE {seq}")
    pg_replica.wait_for_replay()
    with psycopg.connect(pooled_routed.dsn(), autocommit=True) as conn:
        for i in range(1, 4):
            time.sleep(0.2)  # past the read-your-writes horizon of the previous nextval
            got = conn.execute(f"/* sqlproxy:replica */ SELECT nextval('{seq}')").fetchone()
            assert got == (i,)
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the session goes on
    router = router_of(pooled_routed)
    assert pooled_routed.call(lambda: router.replicas[0].retried) >= 1
    assert calls(pg_primary, "nextval") >= 3


def test_many_clients_over_few_pooled_servers(
    pooled_routed: ProxyThread, table: str, pg_primary: PgCluster, pg_replica: PgCluster,
) -> None:
    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            with psycopg.connect(pooled_routed.dsn(), autocommit=True) as conn:
                for i in range(30):
                    assert conn.execute(f"SELECT v FROM {table} WHERE id = %s",
                                        (k + 1,)).fetchone() is not None
                    if i % 10 == 0:
                        conn.execute(f"UPDATE {table} SET v = %s WHERE id = %s",
                                     (f"c{k}-{i}", k + 1))
                        assert conn.execute(f"SELECT v FROM {table} WHERE id = %s",
                                            (k + 1,)).fetchone() == (f"c{k}-{i}",)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    by_backend = pools(pooled_routed)
    assert by_backend["primary"]["servers"] <= 3
    assert by_backend.get("r1", {"servers": 0})["servers"] <= 3
    assert calls(pg_replica, f"SELECT v FROM {table} WHERE id") > 0
