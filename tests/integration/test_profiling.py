"""Statement profiling through the proxy with real clients, checked against the server."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from sqlproxy.analysis.normalize import normalize
from tests.support import pg
from tests.support.proxy import ProxyThread


def stats(proxy: ProxyThread, **filters: Any) -> dict[str, dict[str, Any]]:
    """The proxy's statistics as {fingerprint: item}."""
    def read() -> list[dict[str, Any]]:
        assert proxy.runtime is not None and proxy.runtime.profiler is not None
        return proxy.runtime.profiler.top(limit=100_000, **filters)[0]

    return {item["fingerprint"]: item for item in proxy.call(read)}


def fp(sql: str) -> str:
    return normalize(sql).fingerprint


@pytest.fixture
def db(pg_primary: pg.PgCluster) -> Iterator[str]:
    """A fresh database per test, so that statistics are easy to attribute."""
    name = f"prof_{uuid.uuid4().hex[:10]}"
    pg_primary.psql(f"create database {name}")
    pg_primary.psql("create extension if not exists pg_stat_statements", dbname=name)
    yield name
    pg_primary.psql(f"drop database {name} with (force)")


@pytest.fixture
def profiled(make_proxy: Callable[..., ProxyThread]) -> ProxyThread:
    return make_proxy(analysis={"slow_query_ms": 100})


def psql(proxy: ProxyThread, db: str, *commands: str) -> str:
    args = ["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", proxy.dsn(dbname=db)]
    for c in commands:
        args += ["-c", c]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_multi_statement_query_is_split(profiled: ProxyThread, db: str) -> None:
    psql(profiled, db, "select 1; select g from generate_series(1, 3) g; select 'x' as y")
    s = stats(profiled, database=db)
    assert s[fp("select 1")]["calls"] == 1
    assert s[fp("select 1")]["rows"] == 1
    assert s[fp("select g from generate_series(1, 3) g")]["rows"] == 3
    assert fp("select 1") == fp("select 'x' as y") or s[fp("select 'x' as y")]["calls"] == 1


def test_extended_protocol_and_parameters(profiled: ProxyThread, db: str) -> None:
    async def main() -> None:
        conn = await asyncpg.connect(profiled.dsn(dbname=db))
        await conn.execute("create table items (id int primary key, name text)")
        await conn.executemany("insert into items values ($1, $2)",
                               [(i, f"n{i}") for i in range(25)])
        for i in range(10):
            assert await conn.fetchval("select name from items where id = $1", i) == f"n{i}"
        rows = await conn.fetch("select * from items where id < $1", 7)
        assert len(rows) == 7
        await conn.close()

    asyncio.run(main())
    s = stats(profiled, database=db)
    ins = s[fp("insert into items values ($1, $2)")]
    assert (ins["calls"], ins["rows"], ins["kind"]) == (25, 25, "insert")
    sel = s[fp("select name from items where id = $1")]
    assert (sel["calls"], sel["rows"], sel["kind"]) == (10, 10, "select")
    assert s[fp("select * from items where id < $1")]["rows"] == 7
    item = sel
    for key in ("total_ms", "mean_ms", "min_ms", "max_ms", "stddev_ms", "p50_ms", "p95_ms",
                "p99_ms"):
        assert item[key] >= 0
    assert item["min_ms"] <= item["p50_ms"] * 1.02 + 1e-6
    assert item["p99_ms"] <= item["max_ms"] * 1.02 + 1e-6
    assert item["database"] == db and item["user"] == "postgres"
    assert item["first_seen"].endswith("Z") and item["last_seen"] >= item["first_seen"]


def test_psycopg_pipeline_is_attributed_per_execute(profiled: ProxyThread, db: str) -> None:
    with psycopg.connect(profiled.dsn(dbname=db), autocommit=True) as conn:
        conn.execute("create table p (id int, v text)")
        with conn.pipeline():
            for i in range(30):
                conn.execute("insert into p values (%s, %s)", (i, "v"))
            conn.execute("update p set v = 'w' where id < %s", (10,))
            cur = conn.execute("select count(*) from p")
        assert cur.fetchone() == (30,)
    s = stats(profiled, database=db)
    assert s[fp("insert into p values ($1, $2)")]["calls"] == 30
    assert s[fp("insert into p values ($1, $2)")]["rows"] == 30
    assert s[fp("update p set v = 'w' where id < $1")]["rows"] == 10


def test_errors_are_counted_by_sqlstate(profiled: ProxyThread, db: str) -> None:
    with psycopg.connect(profiled.dsn(dbname=db), autocommit=True) as conn:
        for _ in range(3):
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute("select 1 / 0")
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("select * from no_such_table")
        assert conn.execute("select 2").fetchone() == (2,)
    s = stats(profiled, database=db)
    div = s[fp("select 1 / 0")]
    assert div["errors"] == 3 and div["errors_by_sqlstate"] == {"22012": 3}
    assert s[fp("select * from no_such_table")]["errors_by_sqlstate"] == {"42P01": 1}


def test_in_lists_of_any_length_share_a_fingerprint(profiled: ProxyThread, db: str) -> None:
    psql(profiled, db, "create table t (id int)",
         "select * from t where id in (1, 2, 3)",
         "select * from t where id in (" + ", ".join(str(i) for i in range(30)) + ")")
    s = stats(profiled, database=db)
    assert fp("select * from t where id in (1, 2, 3)") == fp("select * from t where id in (7)")
    assert s[fp("select * from t where id in (1, 2, 3)")]["calls"] == 2


def test_copy_is_counted(profiled: ProxyThread, db: str) -> None:
    with psycopg.connect(profiled.dsn(dbname=db), autocommit=True) as conn:
        conn.execute("create table c (a int, b text)")
        with conn.cursor().copy("copy c from stdin") as copy:
            for i in range(500):
                copy.write_row((i, "x"))
        out = bytearray()
        with conn.cursor().copy("copy c to stdout") as copy:
            for chunk in copy:
                out += chunk
        assert out.count(b"\n") == 500
    s = stats(profiled, database=db)
    assert s[fp("copy c from stdin")]["rows"] == 500
    assert s[fp("copy c to stdout")]["rows"] == 500


def test_slow_log_and_transactions(profiled: ProxyThread, db: str) -> None:
    with psycopg.connect(profiled.dsn(dbname=db)) as conn:
        conn.execute("select pg_sleep(0.15)")
        conn.execute("select 1")
        conn.commit()
    def read() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        assert profiled.runtime is not None and profiled.runtime.profiler is not None
        prof = profiled.runtime.profiler
        return prof.slow_log()[0], prof.transaction_summary()

    slow, txs = profiled.call(read)
    assert len(slow) == 1
    assert slow[0]["fingerprint"] == fp("select pg_sleep(0.15)")
    assert slow[0]["duration_ms"] >= 150
    assert slow[0]["parameters"] is None  # redacted by default
    assert slow[0]["database"] == db and slow[0]["client"].startswith("127.0.0.1:")
    tx = next(t for t in txs if t["database"] == db)
    assert tx["transactions"] == 1
    assert tx["statements_per_transaction"] == 2  # the two selects; BEGIN/COMMIT not counted
    assert tx["total_ms"] >= 150


def test_bounded_fingerprints_evict(make_proxy: Callable[..., ProxyThread], db: str) -> None:
    proxy = make_proxy(analysis={"max_fingerprints": 10})
    psql(proxy, db, *[f"select {i} as c{i}" for i in range(40)])
    def read() -> tuple[int, int]:
        assert proxy.runtime is not None and proxy.runtime.profiler is not None
        st = proxy.runtime.profiler.stats
        return len(st.entries), st.evictions

    n, evictions = proxy.call(read)
    assert n <= 10
    assert evictions >= 30


def _server_stats(primary: pg.PgCluster, db: str) -> list[tuple[str, int, int]]:
    out = primary.psql(
        "select query, calls, rows from pg_stat_statements s join pg_database d "
        f"on d.oid = s.dbid where d.datname = '{db}'", dbname=db,
    )
    rows = []
    for line in out.splitlines():
        query, calls, nrows = line.rsplit("|", 2)
        rows.append((query, int(calls), int(nrows)))
    return rows


def test_agrees_with_pg_stat_statements(profiled: ProxyThread, pg_primary: pg.PgCluster,
                                        db: str) -> None:
    """Calls and rows per fingerprint equal the server's sums over the matching queryids."""
    pg_primary.psql("select pg_stat_statements_reset()", dbname=db)
    agreement_workload(profiled.dsn(dbname=db))
    check_agreement(stats(profiled, database=db), pg_primary, db)


def agreement_workload(dsn: str) -> None:
    """asyncpg (extended protocol, executemany, a transaction), psql (simple protocol, a
    multi-statement query, IN lists) and psycopg (with a pipeline), through ``dsn``. Also run
    through worker processes (tests/workers/test_workers.py)."""
    async def extended() -> None:
        conn = await asyncpg.connect(dsn)
        await conn.execute("create table acc (id int primary key, owner text, balance int)")
        await conn.executemany("insert into acc values ($1, $2, $3)",
                               [(i, f"o{i % 7}", i * 10) for i in range(200)])
        for i in range(50):
            await conn.fetchrow("select * from acc where id = $1", i)
        for owner in ("o1", "o2", "o3"):
            await conn.fetch("select id, balance from acc where owner = $1 order by id", owner)
        async with conn.transaction():
            await conn.execute("update acc set balance = balance + 1 where id < $1", 20)
            await conn.execute("delete from acc where id >= $1", 190)
        await conn.close()

    asyncio.run(extended())
    args = ["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", dsn]
    for c in ("select count(*) from acc; select max(balance) from acc where id in (1, 2, 3)",
              "select max(balance) from acc where id in (4, 5, 6, 7, 8, 9, 10)",
              "update acc set owner = 'x' where id = 5",
              "select owner, count(*) from acc group by owner"):
        args += ["-c", c]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(12):
            conn.execute("select balance from acc where id = %s", (i,)).fetchone()
        with conn.pipeline():
            for i in range(15):
                conn.execute("update acc set balance = %s where id = %s", (i, i))


def check_agreement(ours: dict[str, dict[str, Any]], pg_primary: pg.PgCluster,
                    db: str) -> None:
    """``ours`` (fingerprint -> /api/queries item) against the server's pg_stat_statements,
    after ``agreement_workload``."""
    theirs: dict[str, list[int]] = {}
    for query, calls, nrows in _server_stats(pg_primary, db):
        if "pg_stat_statements" in query:
            continue
        key = normalize(query).fingerprint
        acc = theirs.setdefault(key, [0, 0])
        acc[0] += calls
        acc[1] += nrows
    compared = 0
    for key, item in ours.items():
        if item["kind"] in ("transaction",):
            continue  # BEGIN/COMMIT: asyncpg's and the server's texts differ in form
        if key not in theirs:
            continue
        successful = item["calls"] - item["errors"]
        assert [successful, item["rows"]] == theirs[key], item["query"]
        compared += 1
    expected = {fp("select * from acc where id = $1"), fp("insert into acc values ($1, $2, $3)"),
                fp("select max(balance) from acc where id in (1)"),
                fp("update acc set balance = $1 where id = $2"),
                fp("select balance from acc where id = $1")}
    assert expected <= set(ours) & set(theirs)
    assert compared >= 8
    # An IN list of 3 and of 7 is one fingerprint for us, two queryids for PostgreSQL 15.
    assert ours[fp("select max(balance) from acc where id in (1)")]["calls"] == 2
