"""Authentication to replicas: SCRAM pass-through (no passwords configured) and
``routing.passwords`` for an MD5 user, against a real primary and streaming replica."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import psycopg
import pytest

from tests.routing.test_routing import calls, router_of, wait_for, wait_ready
from tests.support.clients import unique_name
from tests.support.pg import APP_DATABASE, APP_USER, MD5_USER, SCRAM_USER, PgCluster
from tests.support.proxy import ProxyThread


def make_routed(make_proxy: Callable[..., ProxyThread], replica: PgCluster,
                **routing: object) -> ProxyThread:
    replica.set_apply_delay(0)
    p = make_proxy(routing={"enabled": True, "health_interval_ms": 50, **routing},
                   replicas=[{"url": replica.dsn(), "name": "r1"}])
    wait_ready(p)
    return p


@pytest.fixture
def granted(pg_primary: PgCluster, pg_replica: PgCluster) -> Iterator[str]:
    """A table in ``postgres`` readable by the password users."""
    name = unique_name("auth")
    users = ", ".join((SCRAM_USER.name, MD5_USER.name))
    pg_primary.psql(f"CREATE TABLE {name} (id int PRIMARY KEY, v text);"
                    f"INSERT INTO {name} SELECT g, 'v' || g FROM generate_series(1, 5) g;"
                    f"GRANT SELECT ON {name} TO {users}")
    pg_replica.wait_for_replay()
    yield name
    pg_primary.psql(f"DROP TABLE IF EXISTS {name}")


def test_scram_user_reads_on_the_replica_without_passwords(
    make_proxy: Callable[..., ProxyThread], pg_primary: PgCluster, pg_replica: PgCluster,
    granted: str,
) -> None:
    routed = make_routed(make_proxy, pg_replica)
    dsn = routed.dsn(SCRAM_USER.name, SCRAM_USER.password)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(1, 6):
            assert conn.execute(f"SELECT v FROM {granted} WHERE id = %s", (i,)).fetchone() == (
                f"v{i}",)
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        assert conn.execute("SELECT current_user").fetchone() == (SCRAM_USER.name,)
    assert calls(pg_replica, f"SELECT v FROM {granted}") == 5
    assert calls(pg_primary, f"SELECT v FROM {granted}") == 0


def test_scram_app_user_in_its_database(
    make_proxy: Callable[..., ProxyThread], pg_primary: PgCluster, pg_replica: PgCluster,
) -> None:
    name = unique_name("app")
    pg_primary.psql(f"CREATE TABLE {name} (id int); INSERT INTO {name} VALUES (1), (2)",
                    user=APP_USER.name, dbname=APP_DATABASE, password=APP_USER.password)
    pg_replica.wait_for_replay()
    routed = make_routed(make_proxy, pg_replica)
    router = router_of(routed)
    dsn = routed.dsn(APP_USER.name, APP_USER.password, APP_DATABASE)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            wait_for(lambda: routed.call(lambda: router.catalog_loaded(APP_DATABASE)),
                     what="the app database's function catalog")
            for _ in range(4):
                assert conn.execute(f"SELECT count(*) FROM {name}").fetchone() == (2,)
            # Writes still go to the primary, and this session reads its own write.
            conn.execute(f"INSERT INTO {name} (id) VALUES (3)")
            assert conn.execute(f"SELECT count(*) FROM {name}").fetchone() == (3,)
        assert calls(pg_replica, f"FROM {name}", APP_DATABASE) >= 4
        assert calls(pg_replica, f"INSERT INTO {name} (id)", APP_DATABASE) == 0
        assert calls(pg_primary, f"INSERT INTO {name} (id)", APP_DATABASE) == 1
    finally:
        pg_primary.psql(f"DROP TABLE {name}", dbname=APP_DATABASE)


def test_md5_user_with_routing_passwords(
    make_proxy: Callable[..., ProxyThread], pg_primary: PgCluster, pg_replica: PgCluster,
    granted: str,
) -> None:
    routed = make_routed(make_proxy, pg_replica,
                         passwords={MD5_USER.name: MD5_USER.password})
    with psycopg.connect(routed.dsn(MD5_USER.name, MD5_USER.password), autocommit=True) as conn:
        for _ in range(3):
            assert conn.execute(f"SELECT count(*) FROM {granted}").fetchone() == (5,)
    assert calls(pg_replica, f"SELECT count(*) FROM {granted}") == 3


def test_md5_user_without_passwords_stays_on_the_primary(
    make_proxy: Callable[..., ProxyThread], pg_primary: PgCluster, pg_replica: PgCluster,
    granted: str,
) -> None:
    routed = make_routed(make_proxy, pg_replica)
    with psycopg.connect(routed.dsn(MD5_USER.name, MD5_USER.password), autocommit=True) as conn:
        for _ in range(3):
            assert conn.execute(f"SELECT id FROM {granted} WHERE id = 2").fetchone() == (2,)
    assert calls(pg_replica, f"SELECT id FROM {granted}") == 0
    assert calls(pg_primary, f"SELECT id FROM {granted}") == 3
    router = router_of(routed)
    assert f"auth:{MD5_USER.name}" in routed.call(lambda: set(router._warned))


@pytest.mark.parametrize("auth_user", [None, "postgres"], ids=["pass-through", "auth_user"])
def test_pooled_scram_user_reads_on_the_pooled_replica(
    make_proxy: Callable[..., ProxyThread], pg_primary: PgCluster, pg_replica: PgCluster,
    granted: str, auth_user: str | None,
) -> None:
    """Transaction pooling: the keys a SCRAM login proved log the replica pool's servers in
    too (a streaming replica has the primary's roles), whether the login went through to the
    server or the proxy checked it (``pool.auth_user``)."""
    pg_replica.set_apply_delay(0)
    pool: dict[str, object] = {"mode": "transaction", "size": 2, "max_wait_ms": 30_000}
    if auth_user is not None:
        pool["auth_user"] = auth_user
    routed = make_proxy(routing={"enabled": True, "health_interval_ms": 50},
                        replicas=[{"url": pg_replica.dsn(), "name": "r1"}], pool=pool)
    wait_ready(routed)
    dsn = routed.dsn(SCRAM_USER.name, SCRAM_USER.password)
    marker = f"SELECT v FROM {granted}"
    for client in range(3):
        before = calls(pg_replica, marker)
        with psycopg.connect(dsn, autocommit=True) as conn:
            # (Pass-through: the keys are recovered just after the login; reads go to the
            # primary meanwhile.)
            wait_for(lambda: routed.call(lambda: [
                s.scram_keys is not None for s in routed.runtime.proxy.sessions.values()  # type: ignore[union-attr]
            ] == [True]), what="the client's SCRAM keys")
            for i in range(1, 6):
                assert conn.execute(f"SELECT v FROM {granted} WHERE id = %s",
                                    (i,)).fetchone() == (f"v{i}",)
            assert conn.execute("SELECT current_user").fetchone() == (SCRAM_USER.name,)
        assert calls(pg_replica, marker) - before == 5, client
    assert calls(pg_primary, marker) == 0
