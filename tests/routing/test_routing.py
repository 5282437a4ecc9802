"""Routing against a real primary and a real streaming replica.

Where a statement ran is checked on the servers themselves, with their pg_stat_statements.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.support.clients import active_queries, sleep_until_canceled, unique_name
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


def test_misrouting_traps_go_to_the_primary(
    routed: ProxyThread, table: str, pg_primary: PgCluster, pg_replica: PgCluster
) -> None:
    seq = f"{table}_seq"
    fn = f"{table}_add"
    pg_primary.psql(
        f"CREATE SEQUENCE {seq};"
        f"CREATE FUNCTION {fn}(n int) RETURNS int LANGUAGE plpgsql AS $$ BEGIN "
        f"INSERT INTO {table} VALUES (n, 'fn'); RETURN n; END $$;"
    )
    pg_replica.wait_for_replay()
    with psycopg.connect(routed.dsn(), autocommit=True) as conn:
        assert conn.execute(f"SELECT nextval('{seq}')").fetchone() == (1,)
        assert conn.execute(f"SELECT {fn}(100)").fetchone() == (100,)
        assert conn.execute(
            f"WITH u AS (UPDATE {table} SET v = 'cte' WHERE id = 2 RETURNING id) "
            "SELECT id FROM u").fetchall() == [(2,)]
        assert conn.execute(f"SELECT id FROM {table} WHERE id = 3 FOR UPDATE").fetchall() == [
            (3,)]
        conn.execute(f"SELECT * INTO {table}_copy FROM {table}")
        # Everything above wrote; nothing of it reached the replica.
    for marker in ("nextval", f"{fn}(", "WITH u AS (UPDATE", "FOR UPDATE",
                   f"INTO {table}_copy"):
        assert calls(pg_replica, marker) == 0, marker
        assert calls(pg_primary, marker) >= 1, marker
    assert pg_primary.psql(f"SELECT count(*) FROM {table}_copy") == "11"
    pg_primary.psql(f"DROP TABLE {table}_copy; DROP FUNCTION {fn}(int); DROP SEQUENCE {seq}")


def test_temp_table_pins_the_session(routed: ProxyThread, pg_replica: PgCluster) -> None:
    name = unique_name("tmp")
    with psycopg.connect(routed.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE TEMP TABLE {name} (a int)")
        conn.execute(f"INSERT INTO {name} VALUES (1), (2)")
        for _ in range(5):
            assert conn.execute(f"SELECT count(*) FROM {name}").fetchone() == (2,)
    assert calls(pg_replica, name) == 0
    router = router_of(routed)
    assert routed.call(lambda: router.pinned_sessions) >= 1


def test_set_search_path_then_read(
    routed: ProxyThread, pg_primary: PgCluster, pg_replica: PgCluster
) -> None:
    schema = unique_name("sch")
    pg_primary.psql(f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.only_here (a int);"
                    f"INSERT INTO {schema}.only_here VALUES (42)")
    pg_replica.wait_for_replay()
    with psycopg.connect(routed.dsn(), autocommit=True) as conn:
        time.sleep(0.3)  # past the read-your-writes horizon of the session's setup
        conn.execute(f"SET search_path = {schema}, public")
        for _ in range(3):
            assert conn.execute("SELECT a FROM only_here").fetchone() == (42,)
        assert conn.execute("SHOW search_path").fetchone() == (f"{schema}, public",)
    assert calls(pg_replica, "FROM only_here") >= 1
    pg_primary.psql(f"DROP SCHEMA {schema} CASCADE")


def test_read_your_writes_with_a_delayed_replica(
    routed: ProxyThread, table: str, pg_primary: PgCluster, pg_replica: PgCluster
) -> None:
    pg_replica.set_apply_delay(300)
    try:
        with psycopg.connect(routed.dsn(), autocommit=True) as conn:
            for i in range(20):
                conn.execute(f"UPDATE {table} SET v = %s WHERE id = 5", (f"w{i}",))
                assert conn.execute(f"SELECT v FROM {table} WHERE id = 5").fetchone() == (
                    f"w{i}",)
            # Once the replica has caught up, reads go back to it.
            before = calls(pg_replica, f"FROM {table} WHERE id")
            wait_for(lambda: (conn.execute(f"SELECT v FROM {table} WHERE id = 4").fetchone()
                              and calls(pg_replica, f"FROM {table} WHERE id") > before),
                     what="reads back on the replica")
    finally:
        pg_replica.set_apply_delay(0)


def readers_survive_a_replica_restart(proxy: ProxyThread, table: str,
                                      pg_replica: PgCluster) -> None:
    """Four readers through ``proxy`` (10 rows in ``table``) while the replica stops and comes
    back: none sees an error, and reads go to the replica again afterwards."""
    errors: list[BaseException] = []
    done = 0

    async def reader(dsn: str, stop: asyncio.Event) -> None:
        nonlocal done
        conn = await asyncpg.connect(dsn, statement_cache_size=0)
        try:
            while not stop.is_set():
                try:
                    assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 10
                    done += 1
                except BaseException as exc:
                    errors.append(exc)
                    return
        finally:
            await conn.close()

    async def main() -> None:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(reader(proxy.dsn(), stop)) for _ in range(4)]
        await asyncio.sleep(0.5)
        await asyncio.to_thread(pg_replica.stop, "fast")
        await asyncio.sleep(1.0)
        await asyncio.to_thread(pg_replica.start)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*tasks)

    try:
        asyncio.run(main())
    finally:
        if not pg_replica.is_running():
            pg_replica.start()
    assert not errors, errors
    assert done > 0
    wait_ready(proxy)
    before = calls(pg_replica, f"SELECT count(*) FROM {table}")
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for _ in range(3):
            conn.execute(f"SELECT count(*) FROM {table}")
    assert calls(pg_replica, f"SELECT count(*) FROM {table}") > before


def test_stopping_the_replica_mid_run(
    routed: ProxyThread, table: str, pg_replica: PgCluster
) -> None:
    readers_survive_a_replica_restart(routed, table, pg_replica)


def test_asyncpg_prepared_statements(
    routed: ProxyThread, table: str, pg_primary: PgCluster, pg_replica: PgCluster
) -> None:
    async def main() -> None:
        conn = await asyncpg.connect(routed.dsn())
        try:
            stmt = await conn.prepare(f"SELECT v FROM {table} WHERE id = $1")
            for i in range(1, 11):
                assert await stmt.fetchval(i) == f"v{i}"
            # The statement cache: the same query text again and again.
            for i in range(1, 11):
                assert await conn.fetchval(f"SELECT id FROM {table} WHERE v = $1", f"v{i}") == i
            # A write in between (on the primary), then reads with the cached statements.
            await conn.execute(f"UPDATE {table} SET v = 'new' WHERE id = 7")
            assert await stmt.fetchval(7) == "new"
            assert await conn.fetchval(f"SELECT id FROM {table} WHERE v = $1", "new") == 7
            async with conn.transaction():
                assert await stmt.fetchval(7) == "new"
                await conn.execute(f"UPDATE {table} SET v = 'tx' WHERE id = 7")
                assert await stmt.fetchval(7) == "tx"
            await asyncio.sleep(0.3)
            for i in range(1, 5):
                assert await stmt.fetchval(i) == f"v{i}"
        finally:
            await conn.close()

    asyncio.run(main())
    assert calls(pg_replica, f"SELECT v FROM {table} WHERE id") >= 1
    assert calls(pg_primary, f"UPDATE {table}") == 2


def test_psycopg_pipeline(
    routed: ProxyThread, table: str, pg_primary: PgCluster, pg_replica: PgCluster
) -> None:
    with psycopg.connect(routed.dsn(), autocommit=True) as conn:
        with conn.pipeline():
            curs = [conn.execute(f"SELECT v FROM {table} WHERE id = %s", (i,))
                    for i in range(1, 6)]
            w = conn.execute(f"UPDATE {table} SET v = 'p' WHERE id = 1 RETURNING id")
            r = conn.execute(f"SELECT v FROM {table} WHERE id = 1")
        assert [c.fetchone() for c in curs] == [(f"v{i}",) for i in range(1, 6)]
        assert w.fetchone() == (1,)
        assert r.fetchone() == ("p",)
        time.sleep(0.3)
        with conn.pipeline():
            curs = [conn.execute(f"SELECT v FROM {table} WHERE id = %s", (i,))
                    for i in range(2, 6)]
        assert [c.fetchone() for c in curs] == [(f"v{i}",) for i in range(2, 6)]
    with psycopg.connect(routed.dsn()) as conn:  # not autocommit: a transaction block
        with conn.pipeline():
            a = conn.execute(f"SELECT v FROM {table} WHERE id = 3")
            conn.execute(f"UPDATE {table} SET v = 'q' WHERE id = 3")
            b = conn.execute(f"SELECT v FROM {table} WHERE id = 3")
        assert a.fetchone() == ("v3",)
        assert b.fetchone() == ("q",)
        conn.commit()
    assert pg_primary.psql(f"SELECT v FROM {table} WHERE id = 3") == "q"


def test_sqlalchemy(routed: ProxyThread, table: str, pg_replica: PgCluster) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(routed.dsn().replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(f"SELECT id, v FROM {table} WHERE id < :n ORDER BY id"),
                                {"n": 4}).all()
            assert [tuple(r) for r in rows] == [(1, "v1"), (2, "v2"), (3, "v3")]
            conn.commit()
        with engine.begin() as conn:
            conn.execute(sa.text(f"UPDATE {table} SET v = 'sa' WHERE id = 9"))
        with engine.connect() as conn:
            assert conn.execute(sa.text(f"SELECT v FROM {table} WHERE id = 9")).scalar() == "sa"
    finally:
        engine.dispose()
    # SQLAlchemy opens a transaction block for everything: it stays on the primary, unless
    # the application asks for a read-only one.
    engine = sa.create_engine(routed.dsn().replace("postgresql://", "postgresql+psycopg://"),
                              isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            for _ in range(3):
                conn.execute(sa.text(f"SELECT v FROM {table} WHERE id = 8")).scalar()
    finally:
        engine.dispose()
    assert calls(pg_replica, f"SELECT v FROM {table} WHERE id =") >= 3


def test_read_only_transaction_on_the_replica(
    routed: ProxyThread, table: str, pg_primary: PgCluster, pg_replica: PgCluster
) -> None:
    with psycopg.connect(routed.dsn(), autocommit=True) as conn:
        conn.execute("BEGIN READ ONLY")
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        assert conn.execute(f"SELECT count(*) FROM {table} WHERE id > 0").fetchone() == (10,)
        conn.execute("COMMIT")
        conn.execute("BEGIN")
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
        conn.execute("COMMIT")


def test_routes_in_statistics_and_backends(routed: ProxyThread, table: str) -> None:
    with psycopg.connect(routed.dsn(), autocommit=True) as conn:
        for _ in range(3):
            conn.execute(f"SELECT v FROM {table} WHERE id = 1 AND 1 = 1")
    assert routed.runtime is not None
    runtime = routed.runtime
    backends = routed.call(runtime.backends)
    names = [b["name"] for b in backends]
    assert names == ["primary", "r1"]
    router = router_of(routed)
    assert routed.call(lambda: router.replicas[0].routed) >= 3
    profiler = runtime.profiler
    assert profiler is not None
    rows, _ = routed.call(lambda: profiler.top(limit=500))
    mine = [r for r in rows if "and $2 = $3" in r["query"] and table in r["query"]]
    assert mine, rows
    assert mine[0]["routes"] == {"r1": 3}


def test_replica_error_is_retried_on_the_primary(
    routed: ProxyThread, table: str, pg_primary: PgCluster, pg_replica: PgCluster
) -> None:
    # The hint waives the volatility check: nextval() reaches the replica, which refuses it
    # (25006); nothing was sent to the client yet, so the primary answers instead.
    seq = f"{table}_rseq"
    pg_primary.psql(f"CREATE SEQUENCE {seq}")
    pg_replica.wait_for_replay()
    with psycopg.connect(routed.dsn(), autocommit=True) as conn:
        for i in range(1, 4):
            time.sleep(0.2)  # past the read-your-writes horizon of the previous nextval
            got = conn.execute(f"/* sqlproxy:replica */ SELECT nextval('{seq}')").fetchone()
            assert got == (i,)
    router = router_of(routed)
    assert routed.call(lambda: router.replicas[0].retried) >= 1
    assert calls(pg_primary, "nextval") >= 3


def test_routed_client_pid_is_the_primary_backend(
    routed: ProxyThread, pg_primary: PgCluster
) -> None:
    """The driver's PID is the primary backend's; pg_backend_pid() runs there to agree."""

    async def main() -> tuple[int, int, str]:
        conn = await asyncpg.connect(routed.dsn(), server_settings={"application_name": "pidr"})
        try:
            pid = conn.get_server_pid()
            return pid, await conn.fetchval("SELECT pg_backend_pid()"), pg_primary.psql(
                f"SELECT application_name FROM pg_stat_activity WHERE pid = {pid}")
        finally:
            await conn.close()

    pid, reported, app = asyncio.run(main())
    assert reported == pid and app == "pidr"


def test_cancel_reaches_the_query_on_the_replica(
    routed: ProxyThread, pg_replica: PgCluster
) -> None:
    """Two reads sleeping on the replica: a cancel ends exactly the one it names."""

    async def main() -> None:
        markers = [unique_name("rcancel") for _ in range(2)]
        conns = [await psycopg.AsyncConnection.connect(routed.dsn(), autocommit=True)
                 for _ in markers]
        observer = await asyncpg.connect(pg_replica.dsn())

        async def active(marker: str) -> int:
            return await active_queries(observer, marker)

        tasks = [asyncio.create_task(sleep_until_canceled(c, m))
                 for c, m in zip(conns, markers, strict=True)]
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while not all([await active(m) for m in markers]):
                assert loop.time() < deadline, "the sleeps never ran on the replica"
                await asyncio.sleep(0.05)
            await conns[0].cancel_safe()
            assert await asyncio.wait_for(tasks[0], 20) == "canceled"
            assert not tasks[1].done() and await active(markers[1]) == 1
            await conns[1].cancel_safe()
            assert await asyncio.wait_for(tasks[1], 20) == "canceled"
            assert (await (await conns[0].execute("SELECT 1")).fetchone()) == (1,)
        finally:
            for t in tasks:
                t.cancel()
            for c in conns:
                await c.close()
            await observer.close()

    asyncio.run(main())
