"""The routed fast paths (proxy/fastroute.py; in transaction pooling mode, fastpool.py's
routed units) against a real primary and replica: they serve the common reads, and
everything they do not handle still behaves as the general path does. Each test runs in
both pool modes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.routing.test_routing import calls, wait_ready
from tests.support.clients import unique_name
from tests.support.pg import PgCluster
from tests.support.proxy import ProxyThread


@pytest.fixture(params=["session", "transaction"])
def routed(request: pytest.FixtureRequest, make_proxy: Callable[..., ProxyThread],
           pg_replica: PgCluster) -> Iterator[ProxyThread]:
    pg_replica.set_apply_delay(0)
    p = make_proxy(routing={"enabled": True, "health_interval_ms": 50,
                            "read_only_functions": ["fp_sneaky_writer"]},
                   replicas=[{"url": pg_replica.dsn(), "name": "r1"}],
                   pool={"mode": request.param, "size": 3})
    wait_ready(p)
    yield p


@pytest.fixture
def table(pg_primary: PgCluster, pg_replica: PgCluster) -> Iterator[str]:
    name = unique_name("fp")
    pg_primary.psql(f"CREATE TABLE {name} (id int PRIMARY KEY, v text);"
                    f"INSERT INTO {name} SELECT g, 'v' || g FROM generate_series(1, 10) g")
    pg_replica.wait_for_replay()
    yield name
    pg_primary.psql(f"DROP TABLE IF EXISTS {name}")


def fast_counts(proxy: ProxyThread) -> list[dict[str, int] | None]:
    assert proxy.runtime is not None
    server = proxy.runtime.proxy
    return proxy.call(lambda: [s.describe().get("fast_path") for s in server.sessions.values()])


def test_simple_and_prepared_reads_take_the_fast_path(
    routed: ProxyThread, table: str, pg_replica: PgCluster
) -> None:
    before = calls(pg_replica, f"FROM {table} WHERE id")
    with psycopg.connect(routed.dsn(), autocommit=True) as conn:
        for i in range(1, 31):  # inlined literals: one statement, many texts
            assert conn.execute(f"SELECT v FROM {table} WHERE id = {i % 10 + 1}").fetchone() \
                == (f"v{i % 10 + 1}",)
        (counts,) = fast_counts(routed)
        assert counts is not None and counts["to_replica"] >= 25, counts

    async def prepared() -> None:
        conn = await asyncpg.connect(routed.dsn())
        try:
            stmt = await conn.prepare(f"SELECT v FROM {table} WHERE id = $1")
            for i in range(30):
                assert await stmt.fetchval(i % 10 + 1) == f"v{i % 10 + 1}"
            (counts,) = fast_counts(routed)
            assert counts is not None and counts["to_replica"] >= 25, counts
        finally:
            await conn.close()

    asyncio.run(prepared())
    assert calls(pg_replica, f"FROM {table} WHERE id") >= before + 55


def test_a_setting_reaches_the_replica_before_the_next_fast_read(routed: ProxyThread) -> None:
    with psycopg.connect(routed.dsn(), autocommit=True) as conn:
        for _ in range(5):
            assert conn.execute("SHOW work_mem").fetchone() == ("4MB",)
        conn.execute("SET work_mem = '7MB'")
        for _ in range(5):
            assert conn.execute("SHOW work_mem").fetchone() == ("7MB",)
        conn.execute("RESET work_mem")
        assert conn.execute("SHOW work_mem").fetchone() == ("4MB",)


def test_transactions_and_read_your_writes(routed: ProxyThread, table: str) -> None:
    with psycopg.connect(routed.dsn(), autocommit=True) as conn:
        for i in range(20):
            conn.execute("BEGIN")
            conn.execute(f"UPDATE {table} SET v = 'x{i}' WHERE id = 2")
            assert conn.execute(f"SELECT v FROM {table} WHERE id = 2").fetchone() == (f"x{i}",)
            conn.execute("COMMIT")
            # After the commit, the session's own write is visible wherever the read goes.
            assert conn.execute(f"SELECT v FROM {table} WHERE id = 2").fetchone() == (f"x{i}",)
            conn.execute("BEGIN")
            conn.execute(f"UPDATE {table} SET v = 'never' WHERE id = 2")
            conn.execute("ROLLBACK")
            assert conn.execute(f"SELECT v FROM {table} WHERE id = 2").fetchone() == (f"x{i}",)


def test_errors_and_writes_in_disguise_still_take_the_general_path(
    routed: ProxyThread, table: str, pg_primary: PgCluster, pg_replica: PgCluster
) -> None:
    pg_primary.psql(
        f"CREATE OR REPLACE FUNCTION fp_sneaky_writer() RETURNS int LANGUAGE plpgsql AS $$ "
        f"BEGIN INSERT INTO {table} VALUES ((SELECT max(id) + 1 FROM {table}), 's'); "
        f"RETURN 1; END $$")
    pg_replica.wait_for_replay()
    try:
        with psycopg.connect(routed.dsn(), autocommit=True) as conn:
            for _ in range(3):  # a replica error is the client's: 22012, then usable
                with pytest.raises(psycopg.errors.DivisionByZero):
                    conn.execute(f"SELECT 1 / (id - id) FROM {table} WHERE id = 1")
                assert conn.execute(f"SELECT v FROM {table} WHERE id = 1").fetchone() \
                    == ("v1",)
            # Allow-listed as read-only but writing: the replica refuses (25006) and the
            # statement is retried on the primary, every time, fast path or not.
            for _ in range(4):
                assert conn.execute("SELECT fp_sneaky_writer()").fetchone() == (1,)
        assert pg_primary.psql(f"SELECT count(*) FROM {table} WHERE v = 's'") == "4"
    finally:
        pg_primary.psql("DROP FUNCTION IF EXISTS fp_sneaky_writer()")


def test_pipelined_reads_behind_a_fast_read(routed: ProxyThread, table: str) -> None:
    with psycopg.connect(routed.dsn(), autocommit=True) as conn:
        for _ in range(3):
            conn.execute(f"SELECT v FROM {table} WHERE id = 1")
        with conn.pipeline():
            cursors = [conn.execute(f"SELECT v FROM {table} WHERE id = {i}")
                       for i in range(1, 11)]
        assert [c.fetchone() for c in cursors] == [(f"v{i}",) for i in range(1, 11)]
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (10,)


def test_a_statement_prepared_in_a_transaction_later_reads_from_the_replica(
    routed: ProxyThread, table: str, pg_replica: PgCluster
) -> None:
    async def main() -> Any:
        conn = await asyncpg.connect(routed.dsn())
        try:
            async with conn.transaction():  # prepared on the primary only
                stmt = await conn.prepare(f"SELECT v AS prepmark FROM {table} WHERE id = $1")
                assert await stmt.fetchval(3) == "v3"
            before = calls(pg_replica, "prepmark")
            for i in range(10):
                assert await stmt.fetchval(i % 10 + 1) == f"v{i % 10 + 1}"
            return calls(pg_replica, "prepmark") - before
        finally:
            await conn.close()

    assert asyncio.run(main()) >= 9
