"""pgjdbc server-prepared statements through a routed session (reads on the replica)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.routing.test_routing import calls, router_of, wait_ready
from tests.support.clients import describe, find_pgjdbc_jar, java_missing, run, unique_name
from tests.support.pg import APP_DATABASE, APP_USER, PgCluster
from tests.support.proxy import ProxyThread

SOURCE = Path(__file__).resolve().parent / "jdbc" / "RoutedReads.java"


@pytest.fixture(scope="module")
def routed_reads(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(classes dir, pgjdbc jar) with RoutedReads.java compiled."""
    reason = java_missing()
    if reason is not None:
        pytest.skip(f"pgjdbc: {reason}")
    jar = find_pgjdbc_jar()
    assert jar is not None
    classes = tmp_path_factory.mktemp("jdbc-routed")
    result = run(["javac", "-d", classes, "-cp", jar, SOURCE], timeout=120)
    assert result.returncode == 0, describe(result)
    return classes, jar


def test_pgjdbc_server_prepared_statements_on_the_replica(
    routed_reads: tuple[Path, Path], make_proxy: Callable[..., ProxyThread],
    pg_primary: PgCluster, pg_replica: PgCluster,
) -> None:
    classes, jar = routed_reads
    table = unique_name("jdbc")
    pg_primary.psql(f"CREATE TABLE {table} (id int PRIMARY KEY, v text);"
                    f"INSERT INTO {table} SELECT g, 'v' || g FROM generate_series(1, 10) g",
                    user=APP_USER.name, dbname=APP_DATABASE, password=APP_USER.password)
    pg_replica.set_apply_delay(0)
    pg_replica.wait_for_replay()
    # The app user authenticates with SCRAM: no routing.passwords, pass-through does it.
    proxy = make_proxy(routing={"enabled": True, "health_interval_ms": 50},
                       replicas=[{"url": pg_replica.dsn(), "name": "r1"}])
    wait_ready(proxy)
    router = router_of(proxy)
    try:
        url = f"jdbc:postgresql://{proxy.host}:{proxy.port}/{APP_DATABASE}?prepareThreshold=3"
        before = calls(pg_replica, f"SELECT v FROM {table}", APP_DATABASE)
        result = run(["java", "-cp", f"{classes}:{jar}", "RoutedReads", url, APP_USER.name,
                      APP_USER.password, table], timeout=120)
        assert result.returncode == 0, describe(result)
        out = dict(line.split("=", 1) for line in result.stdout.splitlines())
        assert out == {"autocommit_reads": "30", "read_only_tx": "ok",
                       "read_your_writes": "ok", "after": "ok", "count": "10", "done": "ok"}
        on_replica = calls(pg_replica, f"SELECT v FROM {table}", APP_DATABASE) - before
        # The 30 autocommit reads, the 10 of the read-only transaction, some of the last 10
        # (the others wait for the replica to replay the updates: read-your-writes).
        assert on_replica >= 40, on_replica
        assert proxy.call(lambda: router.replicas[0].retried) == 0
        assert calls(pg_replica, f"UPDATE {table}", APP_DATABASE) == 0
        assert calls(pg_primary, f"UPDATE {table}", APP_DATABASE) == 6
    finally:
        pg_primary.psql(f"DROP TABLE IF EXISTS {table}", dbname=APP_DATABASE)
