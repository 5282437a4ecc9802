"""Replicas coming and going under load, lag, and several replicas.

The destructive tests run on a replica of their own (``own_replica``), so the session-wide
``pg_replica`` other tests use is never stopped here.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from tests.routing.test_routing import calls, router_of, wait_for, wait_ready
from tests.support import pg
from tests.support.clients import describe, run, unique_name
from tests.support.pg import PgCluster
from tests.support.proxy import ProxyThread


@pytest.fixture(scope="module")
def own_replica(pg_primary: PgCluster, pg_base_dir: Path) -> Iterator[PgCluster]:
    cluster = pg.start_replica(pg_primary, pg_base_dir, name=unique_name("replica"))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def bench_db(pg_primary: PgCluster, own_replica: PgCluster) -> Iterator[str]:
    """A pgbench database (scale 1), replayed on the module's replica."""
    name = unique_name("rbench")
    pg_primary.psql(f"CREATE DATABASE {name}")
    init = run([pg_primary.bindir / "pgbench", "-i", "-s", "1", "-q", "-h", pg_primary.host,
                "-p", str(pg_primary.port), "-U", pg.SUPERUSER, name])
    assert init.returncode == 0, describe(init)
    own_replica.wait_for_replay()
    yield name
    pg_primary.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def pgbench(proxy: ProxyThread, db: str, *args: str) -> str:
    result = run([pg.find_pg_bindir() / "pgbench", "-n", "-S", *args, "-h", proxy.host,
                  "-p", str(proxy.port), "-U", pg.SUPERUSER, db], timeout=300)
    assert result.returncode == 0, describe(result)
    assert "aborted" not in result.stdout + result.stderr, describe(result)
    failed = re.search(r"number of failed transactions: (\d+)", result.stdout)
    assert failed is None or failed.group(1) == "0", describe(result)
    assert "error" not in result.stderr.lower(), describe(result)
    return result.stdout


ACCOUNTS = "FROM pgbench_accounts"


@pytest.mark.parametrize("mode", ["simple", "prepared"])
def test_pgbench_with_the_replica_stopped_and_started_mid_run(
    make_proxy: Callable[..., ProxyThread], own_replica: PgCluster, bench_db: str, mode: str
) -> None:
    proxy = make_proxy(routing={"enabled": True, "health_interval_ms": 50},
                       replicas=[{"url": own_replica.dsn(), "name": "own"}])
    wait_ready(proxy)
    router = router_of(proxy)
    states: list[bool] = []

    def bounce() -> None:
        time.sleep(2.0)
        own_replica.stop("fast")
        time.sleep(0.3)
        states.append(proxy.call(lambda: router.replicas[0].healthy))
        time.sleep(1.5)
        own_replica.start()

    before = calls(own_replica, ACCOUNTS)
    bouncer = threading.Thread(target=bounce)
    bouncer.start()
    try:
        out = pgbench(proxy, bench_db, "-M", mode, "-c", "4", "-j", "2", "-T", "7")
    finally:
        bouncer.join()
        if not own_replica.is_running():
            own_replica.start()
    assert states == [False], "the stopped replica should have left the rotation"
    assert re.search(r"number of transactions actually processed: [1-9]", out), out
    during = calls(own_replica, ACCOUNTS)
    assert during > before  # pg_stat_statements survives a clean restart
    # Back in rotation: reads return to it.
    wait_ready(proxy)
    pgbench(proxy, bench_db, "-M", mode, "-c", "2", "-t", "50")
    assert calls(own_replica, ACCOUNTS) >= during + 100
    assert proxy.call(lambda: router.replicas[0].failures) >= 1


def test_lagging_replica_leaves_the_rotation_and_returns(
    make_proxy: Callable[..., ProxyThread], pg_primary: PgCluster, own_replica: PgCluster,
) -> None:
    table = unique_name("lag")
    pg_primary.psql(f"CREATE TABLE {table} (id int PRIMARY KEY, v int);"
                    f"INSERT INTO {table} VALUES (1, 0)")
    own_replica.wait_for_replay()
    proxy = make_proxy(routing={"enabled": True, "health_interval_ms": 50,
                                "max_replica_lag_ms": 300},
                       replicas=[{"url": own_replica.dsn(), "name": "own"}])
    wait_ready(proxy)
    router = router_of(proxy)
    healthy = lambda: proxy.call(lambda: router.replicas[0].healthy)  # noqa: E731
    own_replica.set_apply_delay(60_000)
    try:
        pg_primary.psql(f"UPDATE {table} SET v = 1")  # another session's write
        wait_for(lambda: not healthy(), what="the lagging replica out of rotation")
        lag = proxy.call(lambda: router.replicas[0].lag_ms)
        assert lag is not None and lag > 300
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            for _ in range(5):  # no error, and the fresh value: the primary answers
                assert conn.execute(f"SELECT v FROM {table} WHERE id = 1").fetchone() == (1,)
        assert calls(own_replica, f"SELECT v FROM {table}") == 0
        assert calls(pg_primary, f"SELECT v FROM {table}") == 5
    finally:
        own_replica.set_apply_delay(0)
    wait_for(healthy, what="the replica back in rotation once it caught up")
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for _ in range(3):
            assert conn.execute(f"SELECT v FROM {table} WHERE id = 1").fetchone() == (1,)
    assert calls(own_replica, f"SELECT v FROM {table}") == 3
    pg_primary.psql(f"DROP TABLE {table}")


@pytest.mark.parametrize("balance", ["least_outstanding", "round_robin"])
def test_two_replicas_share_the_reads(
    make_proxy: Callable[..., ProxyThread], pg_primary: PgCluster, pg_replica: PgCluster,
    own_replica: PgCluster, bench_db: str, balance: str,
) -> None:
    pg_replica.set_apply_delay(0)
    pg_replica.wait_for_replay()
    proxy = make_proxy(routing={"enabled": True, "health_interval_ms": 50, "balance": balance},
                       replicas=[{"url": pg_replica.dsn(), "name": "r1"},
                                 {"url": own_replica.dsn(), "name": "r2"}])
    wait_ready(proxy)
    router = router_of(proxy)
    # pg_stat_statements ignores aliases and comments: count this shape's calls before/after.
    query = "SELECT aid FROM pgbench_accounts WHERE aid = %s AND abalance > -1"
    marker = "WHERE aid = $1 AND abalance >"
    before = {c.name: calls(c, marker) for c in (pg_replica, own_replica)}
    with psycopg.connect(proxy.dsn(dbname=bench_db), autocommit=True) as conn:
        for i in range(1, 41):
            got = conn.execute(query, (i,)).fetchone()
            assert got == (i,)
    r1 = calls(pg_replica, marker) - before[pg_replica.name]
    r2 = calls(own_replica, marker) - before[own_replica.name]
    assert r1 + r2 == 40 and r1 > 0 and r2 > 0, (r1, r2)
    routed = proxy.call(lambda: [r.routed for r in router.replicas])
    assert all(n > 0 for n in routed), routed
    # Under concurrent load (pgbench), both replicas serve too.
    before = {c.name: calls(c, ACCOUNTS) for c in (pg_replica, own_replica)}
    pgbench(proxy, bench_db, "-c", "4", "-j", "2", "-t", "100")
    assert calls(pg_replica, ACCOUNTS) > before[pg_replica.name]
    assert calls(own_replica, ACCOUNTS) > before[own_replica.name]
