"""Replica routing in transaction pooling mode, against a real primary and streaming replica.

Where a statement ran is checked on the servers themselves (pg_stat_statements), as in
tests/routing; the replica's server connections are pooled too (their pool in /api/pools).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.routing.test_routing import (
    calls,
    readers_survive_a_replica_restart,
    router_of,
    wait_for,
    wait_ready,
)
from tests.support.clients import active_queries, sleep_until_canceled, unique_name
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


def test_asyncpg_prepared_statements_on_pooled_replicas(
    pooled_routed: ProxyThread, table: str, pg_primary: PgCluster, pg_replica: PgCluster,
) -> None:
    async def main() -> None:
        conn = await asyncpg.connect(pooled_routed.dsn())
        try:
            await asyncio.sleep(0.3)  # past the horizon of the session's setup
            stmt = await conn.prepare(f"SELECT v FROM {table} WHERE id = $1")
            for i in range(1, 11):
                assert await stmt.fetchval(i) == f"v{i}"
            for i in range(1, 11):
                assert await conn.fetchval(f"SELECT id FROM {table} WHERE v = $1", f"v{i}") == i
            await conn.execute(f"UPDATE {table} SET v = 'new' WHERE id = 7")
            assert await stmt.fetchval(7) == "new"
            async with conn.transaction():
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


def test_stopping_the_replica_mid_run(
    pooled_routed: ProxyThread, table: str, pg_replica: PgCluster,
) -> None:
    readers_survive_a_replica_restart(pooled_routed, table, pg_replica)


def test_cancel_reaches_the_query_on_the_pooled_replica(
    pooled_routed: ProxyThread, pg_replica: PgCluster,
) -> None:
    async def main() -> None:
        markers = [unique_name("prcancel") for _ in range(2)]
        conns = [await psycopg.AsyncConnection.connect(pooled_routed.dsn(), autocommit=True)
                 for _ in markers]
        observer = await asyncpg.connect(pg_replica.dsn())
        await asyncio.sleep(0.3)  # past the horizon of the sessions' setup
        tasks = [asyncio.create_task(sleep_until_canceled(c, m))
                 for c, m in zip(conns, markers, strict=True)]
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while not all([await active_queries(observer, m) for m in markers]):
                assert loop.time() < deadline, "the sleeps never ran on the replica"
                await asyncio.sleep(0.05)
            await conns[0].cancel_safe()
            assert await asyncio.wait_for(tasks[0], 20) == "canceled"
            assert not tasks[1].done() and await active_queries(observer, markers[1]) == 1
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


def test_table_mode_other_sessions_read_a_written_table_fresh(
    make_proxy: Callable[..., ProxyThread], pg_primary: PgCluster, pg_replica: PgCluster,
) -> None:
    t, other = unique_name("phot"), unique_name("pcold")
    pg_primary.psql(
        f"CREATE TABLE {t} (id int PRIMARY KEY, v int); INSERT INTO {t} VALUES (1, 0);"
        f"CREATE TABLE {other} (id int PRIMARY KEY, v int); INSERT INTO {other} VALUES (1, 0)")
    pg_replica.set_apply_delay(0)
    pg_replica.wait_for_replay()
    p = make_proxy(routing={"enabled": True, "health_interval_ms": 50,
                            "read_your_writes": "table"},
                   replicas=[{"url": pg_replica.dsn(), "name": "r1"}],
                   pool={"mode": "transaction", "size": 3})
    wait_ready(p)
    pg_replica.set_apply_delay(300)
    try:
        with psycopg.connect(p.dsn(), autocommit=True) as writer, \
                psycopg.connect(p.dsn(), autocommit=True) as reader:
            for i in range(1, 8):
                writer.execute(f"UPDATE {t} SET v = %s WHERE id = 1", (i,))
                assert reader.execute(f"SELECT v FROM {t} WHERE id = 1").fetchone() == (i,)
                assert reader.execute(f"SELECT v FROM {other} WHERE id = 1").fetchone() == (0,)
        assert calls(pg_replica, f"SELECT v FROM {t}") == 0
        assert calls(pg_replica, f"SELECT v FROM {other}") == 7
    finally:
        pg_replica.set_apply_delay(0)
    pg_primary.psql(f"DROP TABLE {t}, {other}")


def _fast(p: ProxyThread) -> list[dict[str, int] | None]:
    assert p.runtime is not None
    server = p.runtime.proxy
    return p.call(lambda: [s.describe().get("fast_path") for s in server.sessions.values()])


def test_fast_routed_reads_are_recorded_under_the_replica(
    pooled_routed: ProxyThread, table: str, pg_primary: PgCluster, pg_replica: PgCluster,
) -> None:
    # The compiled path sends the reads it knows to an idle replica server and passes their
    # whole answers on; the statistics name the replica, as for the general path's reads.
    with psycopg.connect(pooled_routed.dsn(), autocommit=True) as conn:
        time.sleep(0.3)  # past the read-your-writes horizon of the session's setup
        for i in range(40):
            assert conn.execute(f"SELECT v AS fastmark FROM {table} WHERE id = {i % 10 + 1}"
                                ).fetchone() == (f"v{i % 10 + 1}",)
        (counts,) = _fast(pooled_routed)
        assert counts is not None and counts["to_replica"] >= 35, counts
    assert calls(pg_replica, "fastmark") == 40
    assert calls(pg_primary, "fastmark") == 0
    assert pooled_routed.runtime is not None
    profiler = pooled_routed.runtime.profiler
    assert profiler is not None
    rows, _ = pooled_routed.call(lambda: profiler.top(limit=500))
    mine = [r for r in rows if "fastmark" in r["query"]]
    assert [r["routes"] for r in mine] == [{"r1": 40}], mine
    router = router_of(pooled_routed)
    assert pooled_routed.call(lambda: (router.replicas[0].routed,
                                       router.replicas[0].outstanding)) == (40, 0)


def test_a_fast_replica_read_whose_answer_comes_in_pieces(
    pooled_routed: ProxyThread, pg_replica: PgCluster,
) -> None:
    # An answer larger than one read: the general path takes the unit over (held back until
    # complete, then released), and the session goes on on the fast path.
    query = "SELECT repeat('x', 1000) || g AS bigmark FROM generate_series(1, 2000) g"
    with psycopg.connect(pooled_routed.dsn(), autocommit=True) as conn:
        time.sleep(0.3)
        for _ in range(4):
            rows = conn.execute(query).fetchall()
            assert len(rows) == 2000 and rows[-1] == ("x" * 1000 + "2000",)
            assert conn.execute("SELECT 1 AS smallmark").fetchone() == (1,)
        (counts,) = _fast(pooled_routed)
        assert counts is not None and counts["to_replica"] == 6, counts
    assert calls(pg_replica, "bigmark") == 4
    by_backend = pools(pooled_routed)
    assert by_backend["r1"]["servers_closed"] == {}


def test_client_gone_during_a_fast_replica_read(
    pooled_routed: ProxyThread, pg_replica: PgCluster,
) -> None:
    # A client that leaves while the replica runs its read: the read is canceled and its
    # server is not lent again with the answer still coming (the next reads are right).
    async def main() -> None:
        marker = unique_name("fastgone")
        observer = await asyncpg.connect(pg_replica.dsn())
        try:
            conn = await psycopg.AsyncConnection.connect(pooled_routed.dsn(), autocommit=True)
            await asyncio.sleep(0.3)
            for _ in range(3):  # learnt, then sent by the fast path
                await conn.execute(f"SELECT pg_sleep(0.01), '{marker}'")
            task = asyncio.create_task(conn.execute(f"SELECT pg_sleep(60), '{marker}'"))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while not await active_queries(observer, marker):
                assert loop.time() < deadline, "the sleep never ran on the replica"
                await asyncio.sleep(0.05)
            (counts,) = _fast(pooled_routed)
            assert counts is not None and counts["to_replica"] >= 3, counts
            conn.pgconn.finish()  # gone, without a goodbye
            task.cancel()
            while await active_queries(observer, marker):
                assert loop.time() < deadline, "the sleep outlived its client"
                await asyncio.sleep(0.05)
            for k in range(6):
                async with await psycopg.AsyncConnection.connect(
                        pooled_routed.dsn(), autocommit=True) as other:
                    got = await (await other.execute(f"SELECT {k} AS nextmark")).fetchone()
                    assert got == (k,)
        finally:
            await observer.close()

    asyncio.run(main())
    router = router_of(pooled_routed)
    assert pooled_routed.call(lambda: router.replicas[0].outstanding) == 0
