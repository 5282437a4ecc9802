"""Client stacks' prepared statements in transaction pooling mode.

Each client runs its prepared-statement workload through a pooled proxy whose two server
connections are kept busy by other clients of the same (database, user) in the background,
so that the client's transactions land on either server connection: its named statements
must be prepared lazily wherever they run (and the extra ParseComplete swallowed).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.integration.test_clients import app_names, java_client, names, node_client
from tests.support import pg
from tests.support.clients import describe, run
from tests.support.pg import PgCluster
from tests.support.proxy import ProxyThread

__all__ = ["app_names", "java_client", "names", "node_client"]  # fixtures used here

USER = pg.APP_USER


@pytest.fixture
def pooled(make_proxy: Callable[..., ProxyThread]) -> Iterator[ProxyThread]:
    """A pooled proxy (2 server connections) with background clients rotating them."""
    p = make_proxy(pool={"mode": "transaction", "size": 2, "max_wait_ms": 30_000})
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            with psycopg.connect(p.dsn(USER.name, USER.password, pg.APP_DATABASE)) as c:
                while not stop.is_set():
                    c.execute("SELECT pg_sleep(0.002)")
                    c.commit()
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=churn, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    yield p
    stop.set()
    for t in threads:
        t.join(10)
    assert not errors, errors


def servers_used(p: ProxyThread) -> int:
    def get() -> int:
        rt = p.runtime
        assert rt is not None and rt.proxy.pools is not None
        return sum(pool["servers_opened"] for pool in rt.proxy.pools.describe())
    return p.call(get)


def test_asyncpg_statement_cache(pooled: ProxyThread, names: Callable[[str], str]) -> None:
    table = names("pool_apg")

    async def scenario() -> list[Any]:
        out: list[Any] = []
        conn = await asyncpg.connect(pooled.dsn(USER.name, USER.password, pg.APP_DATABASE),
                                     statement_cache_size=8)
        try:
            await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
            await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2)",
                                   [(i, f"v{i}") for i in range(50)])
            stmt = await conn.prepare(f"SELECT v FROM {table} WHERE id = $1")
            for i in range(50):
                out.append(await stmt.fetchval(i))
                await asyncio.sleep(0)
            for _ in range(3):  # beyond the cache of 8: asyncpg closes and re-prepares
                for k in range(20):
                    out.append(await conn.fetchval(f"SELECT $1::int + {k}", k))
            async with conn.transaction():
                out.append(await conn.fetchval(f"SELECT count(*) FROM {table}"))
            await conn.execute(f"DROP TABLE {table}")
        finally:
            await conn.close()
        return out

    out = asyncio.run(scenario())
    assert out[:50] == [f"v{i}" for i in range(50)]
    assert out[50:110] == [2 * k for k in range(20)] * 3
    assert out[110] == 50


@pytest.mark.parametrize("threshold", [0, 2])
def test_psycopg_prepared(pooled: ProxyThread, names: Callable[[str], str],
                          threshold: int) -> None:
    table = names("pool_pg")
    dsn = pooled.dsn(USER.name, USER.password, pg.APP_DATABASE)
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=threshold) as conn:
        conn.prepared_max = 4  # psycopg deallocates the older ones
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
        for i in range(20):
            conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (i, f"v{i}"))
        for _ in range(3):
            for i in range(20):
                assert conn.execute(f"SELECT v FROM {table} WHERE id = %s",
                                    (i,)).fetchone() == (f"v{i}",)
            for k in range(8):
                assert conn.execute(f"SELECT %s::int + {k}", (k,)).fetchone() == (2 * k,)
        with conn.transaction():
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (20,)
        conn.execute(f"DROP TABLE {table}")


def test_sqlalchemy(pooled: ProxyThread, names: Callable[[str], str]) -> None:
    sqlalchemy = pytest.importorskip("sqlalchemy")
    table = names("pool_sa")
    url = pooled.dsn(USER.name, USER.password, pg.APP_DATABASE).replace(
        "postgresql://", "postgresql+psycopg://")
    engine = sqlalchemy.create_engine(url, pool_size=3, connect_args={"prepare_threshold": 1})
    try:
        with engine.begin() as c:
            c.execute(sqlalchemy.text(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)"))
        for i in range(30):
            with engine.begin() as c:
                c.execute(sqlalchemy.text(f"INSERT INTO {table} VALUES (:i, :v)"),
                          {"i": i, "v": f"v{i}"})
        with engine.connect() as c:
            got = [c.execute(sqlalchemy.text(f"SELECT v FROM {table} WHERE id = :i"),
                             {"i": i}).scalar() for i in range(30)]
        assert got == [f"v{i}" for i in range(30)]
        with engine.begin() as c:
            c.execute(sqlalchemy.text(f"DROP TABLE {table}"))
    finally:
        engine.dispose()


def test_node_postgres_named_queries(node_client: Path, pooled: ProxyThread,
                                     pg_primary: PgCluster,
                                     app_names: Callable[[str], str]) -> None:
    table = app_names("pool_node")
    result = run(["node", node_client, pooled.dsn(USER.name, USER.password, pg.APP_DATABASE),
                  table], timeout=120)
    assert result.returncode == 0, describe(result)
    out = json.loads(result.stdout)
    assert out["named"] == [{"id": i, "name": f"name-{i}", "score": i * 10} for i in range(1, 11)]
    assert pg_primary.psql(
        f"SELECT string_agg(id || ':' || score, ',' ORDER BY id) FROM {table}",
        dbname=pg.APP_DATABASE) == "1:15,2:25,3:35,4:40,5:50,6:60,7:70,8:80"


def test_pgjdbc_server_prepared(java_client: tuple[Path, Path], pooled: ProxyThread,
                                app_names: Callable[[str], str]) -> None:
    classes, jar = java_client
    table = app_names("pool_jdbc")
    # prepareThreshold=1: every PreparedStatement is server-prepared (named) at once.
    url = (f"jdbc:postgresql://{pooled.host}:{pooled.port}/{pg.APP_DATABASE}"
           "?sslmode=disable&prepareThreshold=1")
    result = run(["java", "-cp", f"{classes}:{jar}", "Compat", url, USER.name,
                  USER.password, table], timeout=180)
    assert result.returncode == 0, describe(result)
    out = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert out["prepared"] == ",".join(f"name-{i}:{i * 20}" for i in range(1, 11))
    assert (out["count"], out["sum"], out["done"]) == ("15", "1205", "ok")
