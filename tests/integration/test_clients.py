"""Client compatibility: real PostgreSQL clients, unmodified, talking to PostgreSQL via sqlproxy.

Every case connects through the proxy. Where a case produces data, the same scenario also runs
on a direct connection to the primary (on its own table) and the two results must be equal, so
a test states "the proxy is invisible" rather than what PostgreSQL happens to answer.

Each test creates uniquely named tables, schemas or databases and drops them afterwards.

This module deliberately has no ``from __future__ import annotations``: SQLModel resolves
relationship annotations at class creation and does not cope with postponed ones.
"""

import asyncio
import contextlib
import csv
import io
import json
import re
import select as io_select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import psycopg
import pytest
from psycopg import pq, sql
from psycopg.pq.abc import PGconn, PGresult
from sqlalchemy import ForeignKey, String, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, joinedload, mapped_column, relationship
from sqlalchemy.orm import selectinload as sa_selectinload
from sqlmodel import Field, Relationship, Session, SQLModel, col, create_engine
from sqlmodel import select as sm_select

from tests.support import pg
from tests.support.clients import (
    JAVA_DIR,
    NODE_DIR,
    client_env,
    describe,
    ensure_node_modules,
    find_pgjdbc_jar,
    java_missing,
    node_missing,
    run,
    unique_name,
)
from tests.support.pg import PasswordUser, PgCluster
from tests.support.proxy import ProxyThread

T = TypeVar("T")

INVALID_PASSWORD = "28P01"
UNIQUE_VIOLATION = "23505"
ADMIN_SHUTDOWN = "57P01"



def arun(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


class Names:
    """Hands out unique table names in one database and drops the tables after the test."""

    def __init__(self, cluster: PgCluster, dbname: str) -> None:
        self.cluster = cluster
        self.dbname = dbname
        self.created: list[str] = []

    def __call__(self, prefix: str = "t") -> str:
        name = unique_name(f"cc_{prefix}")
        self.created.append(name)
        return name

    def drop_all(self) -> None:
        if self.created:
            self.cluster.psql(
                "".join(f"DROP TABLE IF EXISTS {name} CASCADE;\n" for name in self.created),
                dbname=self.dbname,
            )


@pytest.fixture
def names(pg_primary: PgCluster) -> Iterator[Names]:
    """Unique table names in database ``postgres``; the tables are dropped after the test."""
    n = Names(pg_primary, "postgres")
    yield n
    n.drop_all()


@pytest.fixture
def app_names(pg_primary: PgCluster) -> Iterator[Names]:
    """Unique table names in database ``app`` (owned by user ``app``)."""
    n = Names(pg_primary, pg.APP_DATABASE)
    yield n
    n.drop_all()


@pytest.fixture
def schema(pg_primary: PgCluster) -> Iterator[str]:
    """A fresh schema in ``postgres``, dropped with everything in it after the test."""
    name = unique_name("cc_schema")
    pg_primary.psql(f"CREATE SCHEMA {name}")
    yield name
    pg_primary.psql(f"DROP SCHEMA IF EXISTS {name} CASCADE")


@pytest.fixture
def direct_dsn(pg_primary: PgCluster) -> str:
    return pg_primary.dsn()


@pytest.fixture
def proxy_dsn(proxy: ProxyThread) -> str:
    return proxy.dsn()


# --------------------------------------------------------------------------------------------
# psql
# --------------------------------------------------------------------------------------------

PSQL = shutil.which("psql")
PGBENCH = shutil.which("pgbench")
needs_psql = pytest.mark.skipif(PSQL is None, reason="psql not on PATH")
needs_pgbench = pytest.mark.skipif(PGBENCH is None, reason="pgbench not on PATH")


def conninfo(host: str, port: int, *, user: str = pg.SUPERUSER, dbname: str = "postgres",
             sslmode: str = "disable") -> str:
    return f"host={host} port={port} user={user} dbname={dbname} sslmode={sslmode}"


def psql(conn: str, *args: str, input: str | None = None,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert PSQL is not None
    return run([PSQL, "-X", "-A", "-t", "-w", "-d", conn, *args], input=input, cwd=cwd)


@pytest.fixture
def psql_targets(pg_primary: PgCluster, proxy: ProxyThread) -> dict[str, str]:
    return {
        "direct": conninfo(pg_primary.host, pg_primary.port),
        "proxy": conninfo(proxy.host, proxy.port),
    }


@needs_psql
@pytest.mark.parametrize(
    "command",
    [
        "select 1; select 2",
        "select 'a' as x, 1; select; select 'b'; values (1), (2), (3)",
        "create temp table tmp_cc (a int); insert into tmp_cc values (1), (2); "
        "select sum(a) from tmp_cc",
        "select 1; select 1/0; select 3",  # the error ends the string; nothing after it runs
        "",  # EmptyQueryResponse
        "select 1; copy (select g from generate_series(1, 3) g) to stdout; select 2",
        "begin; select 1; commit; select 2",
    ],
    ids=["two-selects", "mixed", "temp-table", "error-midway", "empty", "with-copy", "tx"],
)
def test_psql_multi_statement_command(psql_targets: dict[str, str], command: str) -> None:
    results = {name: psql(conn, "-c", command) for name, conn in psql_targets.items()}
    direct, proxied = results["direct"], results["proxy"]
    assert (proxied.returncode, proxied.stdout, proxied.stderr) == (
        direct.returncode, direct.stdout, direct.stderr,
    ), describe(proxied)
    if command == "select 1; select 2":
        assert proxied.stdout.split() == ["1", "2"]


def _copy_rows(n: int) -> list[list[str]]:
    rows = []
    for i in range(1, n + 1):
        text = f"row {i}"
        if i % 5 == 0:
            text = f'has "quotes", commas,\nand a newline {i}'
        rows.append([str(i), text, "" if i % 7 == 0 else f"{i * 1.5:g}"])
    return rows


@needs_psql
def test_psql_copy_both_directions(
    psql_targets: dict[str, str], names: Names, tmp_path: Path, pg_primary: PgCluster
) -> None:
    source = tmp_path / "in.csv"
    with source.open("w", newline="") as f:
        csv.writer(f).writerows(_copy_rows(3000))

    outputs: dict[str, bytes] = {}
    for target, conn in psql_targets.items():
        table = names(f"copy_{target}")
        out = tmp_path / f"out_{target}.csv"
        script = (
            f"CREATE TABLE {table} (id int PRIMARY KEY, body text NOT NULL, score float8);\n"
            f"\\copy {table} FROM '{source}' WITH (FORMAT csv)\n"
            f"\\copy (SELECT * FROM {table} ORDER BY id) TO '{out}' WITH (FORMAT csv)\n"
            f"SELECT count(*), sum(id), count(score) FROM {table};\n"
        )
        result = psql(conn, "-v", "ON_ERROR_STOP=1", "-f", "-", input=script)
        assert result.returncode == 0, describe(result)
        assert result.stdout.splitlines()[-3:] == ["COPY 3000", "COPY 3000", "3000|4501500|2572"]
        outputs[target] = out.read_bytes()
        # What went in is on the server.
        assert pg_primary.psql(f"SELECT count(*) FROM {table} WHERE body LIKE '%newline%'") == (
            "600"
        )
    assert outputs["proxy"] == outputs["direct"]
    with io.StringIO(outputs["proxy"].decode()) as f:
        assert list(csv.reader(f)) == _copy_rows(3000)


@needs_psql
def test_psql_script_with_transactions(
    psql_targets: dict[str, str], names: Names, tmp_path: Path, pg_primary: PgCluster
) -> None:
    outputs: dict[str, tuple[int, str, str]] = {}
    for target, conn in psql_targets.items():
        table = names(f"tx_{target}")
        script = tmp_path / f"{target}.sql"
        script.write_text(
            f"CREATE TABLE {table} (id int PRIMARY KEY, v text);\n"
            "BEGIN;\n"
            f"INSERT INTO {table} VALUES (1, 'a');\n"
            "SAVEPOINT s1;\n"
            f"INSERT INTO {table} VALUES (2, 'b');\n"
            "ROLLBACK TO SAVEPOINT s1;\n"
            f"INSERT INTO {table} VALUES (3, 'c');\n"
            "COMMIT;\n"
            "BEGIN;\n"
            f"INSERT INTO {table} VALUES (4, 'd');\n"
            "ROLLBACK;\n"
            # psql wraps each statement in its own savepoint: a failing statement is undone
            # and the transaction goes on.
            "\\set ON_ERROR_ROLLBACK on\n"
            "BEGIN;\n"
            f"INSERT INTO {table} VALUES (5, 'e');\n"
            f"INSERT INTO {table} VALUES (5, 'duplicate');\n"
            f"INSERT INTO {table} VALUES (6, 'f');\n"
            "COMMIT;\n"
            "\\set ON_ERROR_ROLLBACK off\n"
            # Without it, an error aborts the transaction and COMMIT rolls back.
            "BEGIN;\n"
            f"INSERT INTO {table} VALUES (7, 'g');\n"
            "SELECT 1/0;\n"
            f"INSERT INTO {table} VALUES (8, 'h');\n"
            "COMMIT;\n"
            # COPY data inline in the script, inside a transaction.
            "BEGIN;\n"
            f"COPY {table} FROM STDIN;\n"
            "10\tten\n11\t\\N\n\\.\n"
            "COMMIT;\n"
            f"SELECT id, v FROM {table} ORDER BY id;\n"
        )
        result = psql(conn, "-q", "-f", str(script))
        assert result.returncode == 0, describe(result)
        assert result.stdout.splitlines()[-6:] == ["1|a", "3|c", "5|e", "6|f", "10|ten", "11|"], (
            describe(result))
        assert pg_primary.psql(f"SELECT string_agg(id::text, ',' ORDER BY id) FROM {table}") == (
            "1,3,5,6,10,11"
        )
        stderr = result.stderr.replace(table, "TABLE").replace(str(script), "SCRIPT")
        outputs[target] = (result.returncode, result.stdout.replace(table, "TABLE"), stderr)
    assert outputs["proxy"] == outputs["direct"]
    assert "duplicate key value violates unique constraint" in outputs["proxy"][2]
    assert "current transaction is aborted" in outputs["proxy"][2]


@needs_psql
def test_psql_large_objects_use_function_calls(
    psql_targets: dict[str, str], tmp_path: Path, pg_primary: PgCluster
) -> None:
    """libpq's large-object API (\\lo_import, \\lo_export) speaks the FunctionCall protocol."""
    source = tmp_path / "blob.bin"
    source.write_bytes(bytes(range(256)) * 1200 + b"tail")
    for target, conn in psql_targets.items():
        out = tmp_path / f"{target}.bin"
        script = (
            f"\\lo_import '{source}'\n"
            "\\set blob :LASTOID\n"
            "SELECT length(lo_get(:blob));\n"
            f"\\lo_export :blob '{out}'\n"
            "\\lo_unlink :blob\n"
            "SELECT count(*) FROM pg_largeobject_metadata WHERE oid = :blob;\n"
        )
        result = psql(conn, "-v", "ON_ERROR_STOP=1", "-f", "-", input=script)
        assert result.returncode == 0, describe(result)
        lines = result.stdout.splitlines()
        assert re.fullmatch(r"lo_import \d+", lines[0]), describe(result)
        assert lines[1:] == ["307204", "lo_export", "lo_unlink " + lines[0].split()[1], "0"], (
            describe(result))
        assert out.read_bytes() == source.read_bytes()
    assert pg_primary.psql("SELECT 1") == "1"


@needs_psql
def test_psql_huge_statement_with_inlined_literals(psql_targets: dict[str, str]) -> None:
    """An ORM-style IN list of 20k literals in one simple-protocol Query (about 150 kB)."""
    in_list = ", ".join(str(i * 3) for i in range(20_000))
    strings = ", ".join(f"'s{i}'" for i in range(5_000))
    command = (
        f"SELECT count(*), sum(g) FROM generate_series(1, 100000) g WHERE g IN ({in_list}); "
        f"SELECT count(*) FROM unnest(ARRAY[{strings}]) s WHERE s IN ({strings})"
    )
    # Too long for a command-line argument: psql reads it from stdin.
    results = {name: psql(conn, "-f", "-", input=command) for name, conn in psql_targets.items()}
    assert results["proxy"].returncode == 0, describe(results["proxy"])
    assert results["proxy"].stdout == results["direct"].stdout
    assert results["proxy"].stdout.split() == [f"{19_999}|{3 * sum(range(20_000))}", "5000"]


def _active_with(cluster: PgCluster, marker: str) -> int:
    """How many server backends are running a statement whose text contains ``marker``."""
    return int(cluster.psql(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
        f"AND query LIKE '%{marker}%' AND pid <> pg_backend_pid()"))


def _wait_active(cluster: PgCluster, marker: str, timeout: float = 20.0) -> None:
    """Wait until the statement tagged ``marker`` runs on the server (the machine is shared: a
    fixed delay could fire a cancel or kill before the statement has even arrived)."""
    deadline = time.monotonic() + timeout
    while _active_with(cluster, marker) < 1:
        assert time.monotonic() < deadline, f"the statement tagged {marker} never started"
        time.sleep(0.05)


def _cancel_when_active(cancel: Callable[[], None], cluster: PgCluster,
                        marker: str) -> threading.Thread:
    def run() -> None:
        _wait_active(cluster, marker)
        cancel()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@needs_psql
def test_psql_ctrl_c_cancels_the_query(proxy: ProxyThread, pg_primary: PgCluster) -> None:
    """SIGINT makes psql send a CancelRequest (libpq's PQcancel) on a new connection."""
    assert PSQL is not None
    marker = unique_name("ctrl_c")
    proc = subprocess.Popen(
        [PSQL, "-X", "-A", "-t", "-d", conninfo(proxy.host, proxy.port, sslmode="prefer"),
         "-c", f"SELECT pg_sleep(60), '{marker}'"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=client_env(),
    )
    try:
        _wait_active(pg_primary, marker)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, (proc.returncode, stdout, stderr)
    assert "canceling statement due to user request" in stderr
    assert _active_with(pg_primary, marker) == 0


@needs_psql
def test_psql_session_terminated_by_server(psql_targets: dict[str, str]) -> None:
    results = {name: psql(conn, "-c", "SELECT pg_terminate_backend(pg_backend_pid())")
               for name, conn in psql_targets.items()}
    for result in results.values():
        assert result.returncode == 2, describe(result)
        assert result.stderr.startswith(
            "FATAL:  terminating connection due to administrator command\n"), describe(result)
        assert "connection to server was lost" in result.stderr


@needs_psql
def test_psql_session_terminated_by_server_reports_only_the_server_error(
    psql_targets: dict[str, str],
) -> None:
    results = {name: psql(conn, "-c", "SELECT pg_terminate_backend(pg_backend_pid())")
               for name, conn in psql_targets.items()}
    # Through the proxy psql also prints "FATAL:  server closed the connection unexpectedly"
    # and "DETAIL:  backend 127.0.0.1:<server port>".
    assert results["proxy"].stderr == results["direct"].stderr


@needs_psql
def test_psql_sslmode_prefer_falls_back_to_plaintext(proxy: ProxyThread) -> None:
    conn = conninfo(proxy.host, proxy.port, sslmode="prefer")
    result = psql(conn, "-c", "SELECT 'plaintext', ssl FROM pg_stat_ssl "
                              "WHERE pid = pg_backend_pid()")
    assert result.returncode == 0, describe(result)
    # Proxy-to-server is plaintext too in the default configuration.
    assert result.stdout.strip() == "plaintext|f"


@needs_psql
def test_psql_sslmode_require_fails_clearly(proxy: ProxyThread) -> None:
    result = psql(conninfo(proxy.host, proxy.port, sslmode="require"), "-c", "SELECT 1")
    assert result.returncode == 2, describe(result)
    assert "server does not support SSL, but SSL was required" in result.stderr
    assert result.stdout == ""


# --------------------------------------------------------------------------------------------
# pgbench
# --------------------------------------------------------------------------------------------


@pytest.fixture
def bench_db(pg_primary: PgCluster) -> Iterator[str]:
    name = unique_name("bench")
    pg_primary.psql(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        pg_primary.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _bench_totals(cluster: PgCluster, db: str) -> dict[str, int]:
    out = cluster.psql(
        "SELECT (SELECT coalesce(sum(abalance), 0) FROM pgbench_accounts),"
        " (SELECT coalesce(sum(tbalance), 0) FROM pgbench_tellers),"
        " (SELECT coalesce(sum(bbalance), 0) FROM pgbench_branches),"
        " (SELECT coalesce(sum(delta), 0) FROM pgbench_history),"
        " (SELECT count(*) FROM pgbench_history)",
        dbname=db,
    )
    accounts, tellers, branches, history, count = (int(v) for v in out.split("|"))
    return {"accounts": accounts, "tellers": tellers, "branches": branches,
            "history": history, "transactions": count}


@needs_pgbench
def test_pgbench_tpcb_in_every_query_mode(
    pg_primary: PgCluster, proxy: ProxyThread, bench_db: str
) -> None:
    assert PGBENCH is not None
    init = run([PGBENCH, "-i", "-s", "1", "-q", "-h", pg_primary.host,
                "-p", str(pg_primary.port), "-U", pg.SUPERUSER, bench_db])
    assert init.returncode == 0, describe(init)

    clients, threads, per_client = 4, 2, 200
    expected_total = 0
    for mode in ("simple", "extended", "prepared"):
        # The first run vacuums and truncates pgbench_history through the proxy (the balances
        # are still zero then); later runs skip that (-n) so the history adds up across runs.
        no_vacuum = [] if mode == "simple" else ["-n"]
        result = run(
            [PGBENCH, "-M", mode, *no_vacuum, "-c", str(clients), "-j", str(threads),
             "-t", str(per_client), "-h", proxy.host, "-p", str(proxy.port),
             "-U", pg.SUPERUSER, bench_db],
            timeout=300,
        )
        assert result.returncode == 0, describe(result)
        done = clients * per_client
        assert f"number of transactions actually processed: {done}/{done}" in result.stdout, (
            describe(result))
        assert re.search(r"number of failed transactions: 0\b", result.stdout), describe(result)
        assert "error" not in result.stderr.lower(), describe(result)
        expected_total += done
        totals = _bench_totals(pg_primary, bench_db)
        assert totals["transactions"] == expected_total, (mode, totals)
        assert totals["accounts"] == totals["history"], (mode, totals)
        assert totals["tellers"] == totals["history"], (mode, totals)
        assert totals["branches"] == totals["history"], (mode, totals)


@needs_pgbench
def test_pgbench_custom_script_with_pipeline(
    proxy: ProxyThread, names: Names, tmp_path: Path, pg_primary: PgCluster
) -> None:
    """pgbench's \\startpipeline: many Parse/Bind/Execute before one Sync, then errors."""
    assert PGBENCH is not None
    table = names("pipe")
    pg_primary.psql(f"CREATE TABLE {table} (client int, n int, v int)")
    script = tmp_path / "pipeline.sql"
    script.write_text(
        "\\set v random(1, 1000)\n"
        "\\startpipeline\n"
        f"INSERT INTO {table} VALUES (:client_id, 1, :v);\n"
        f"INSERT INTO {table} VALUES (:client_id, 2, :v);\n"
        f"SELECT count(*) FROM {table} WHERE client = :client_id;\n"
        f"UPDATE {table} SET v = v + 1 WHERE client = :client_id AND n = 1;\n"
        "\\endpipeline\n"
    )
    for mode in ("extended", "prepared"):
        result = run([PGBENCH, "-n", "-M", mode, "-c", "3", "-j", "1", "-t", "50",
                      "-f", str(script), "-h", proxy.host, "-p", str(proxy.port),
                      "-U", pg.SUPERUSER, "postgres"], timeout=120)
        assert result.returncode == 0, describe(result)
        assert "number of transactions actually processed: 150/150" in result.stdout, (
            describe(result))
    assert pg_primary.psql(f"SELECT count(*), count(DISTINCT client) FROM {table}") == "600|3"


# --------------------------------------------------------------------------------------------
# asyncpg
# --------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def apg(dsn: str, **kwargs: Any) -> AsyncIterator[Any]:
    conn = await asyncpg.connect(dsn, **kwargs)
    try:
        yield conn
    finally:
        await conn.close(timeout=10)


def test_asyncpg_prepared_statements(proxy_dsn: str, direct_dsn: str, names: Names) -> None:
    async def scenario(dsn: str, table: str) -> list[Any]:
        results: list[Any] = []
        # A small statement cache so that cached statements get evicted (and Closed) often.
        async with apg(dsn, statement_cache_size=8) as conn:
            await conn.execute(
                f"CREATE TABLE {table} (id int PRIMARY KEY, name text, score numeric)")
            await conn.execute(
                f"INSERT INTO {table} SELECT g, 'n' || g, g / 4.0 "
                "FROM generate_series(1, 300) g")
            stmt = await conn.prepare(
                f"SELECT id, name, score FROM {table} WHERE id = $1 OR name = $2")
            assert [p.name for p in stmt.get_parameters()] == ["int4", "text"]
            assert [a.name for a in stmt.get_attributes()] == ["id", "name", "score"]
            for i in range(1, 301):
                rows = await stmt.fetch(i, f"n{301 - i}")
                results.append([tuple(r) for r in rows])
            # 40 distinct statement shapes, three passes: far beyond the cache of 8.
            for _ in range(3):
                for k in range(40):
                    results.append(await conn.fetchval(f"SELECT $1::int + {k}", k))
            results.append(await stmt.fetchval(7, "none"))  # the explicit one still works
            results.append(await conn.fetchval(
                "SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql"))
        return results

    direct = arun(scenario(direct_dsn, names("prep_direct")))
    proxied = arun(scenario(proxy_dsn, names("prep_proxy")))
    assert proxied == direct
    assert proxied[0] == [(1, "n1", Decimal("0.25")), (300, "n300", Decimal("75"))]
    assert proxied[300:340] == [2 * k for k in range(40)]


def test_asyncpg_executemany(proxy_dsn: str, direct_dsn: str, names: Names) -> None:
    async def scenario(dsn: str, table: str) -> list[Any]:
        async with apg(dsn) as conn:
            await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
            await conn.executemany(
                f"INSERT INTO {table} VALUES ($1, $2)", [(i, f"v{i}") for i in range(2000)])
            # A failing row in the middle of a batch: the whole batch is rolled back.
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.executemany(
                    f"INSERT INTO {table} VALUES ($1, $2)",
                    [(i, "again") for i in range(5000, 5100)] + [(7, "dup")]
                    + [(i, "after") for i in range(6000, 6100)])
            await conn.executemany(
                f"UPDATE {table} SET v = $2 WHERE id = $1", [(i, f"u{i}") for i in range(10)])
            return [tuple(r) for r in await conn.fetch(
                f"SELECT count(*), sum(id), count(*) FILTER (WHERE v LIKE 'u%') FROM {table}")]

    direct = arun(scenario(direct_dsn, names("em_direct")))
    proxied = arun(scenario(proxy_dsn, names("em_proxy")))
    assert proxied == direct == [(2000, 1999000, 10)]


def test_asyncpg_copy(proxy_dsn: str, direct_dsn: str, names: Names) -> None:
    async def scenario(dsn: str, table: str) -> list[Any]:
        out: list[Any] = []
        async with apg(dsn) as conn:
            await conn.execute(
                f"CREATE TABLE {table} (id int PRIMARY KEY, name text, score float8, "
                "tags text[], raw bytea)")
            records = [
                (i, f"name {i}" if i % 9 else None, i / 3, ["a", str(i)], bytes([i % 256]) * 3)
                for i in range(5000)
            ]
            out.append(await conn.copy_records_to_table(table, records=records))
            out.append(await conn.copy_to_table(
                table, source=io.BytesIO(b"9000,from csv,1.5,\"{x,y}\",\\x00ff\n"),
                format="csv"))
            buf = io.BytesIO()
            out.append(await conn.copy_from_table(
                table, output=buf, columns=["id", "name", "tags"], format="csv"))
            out.append(sorted(buf.getvalue().splitlines()))
            buf = io.BytesIO()
            out.append(await conn.copy_from_query(
                f"SELECT * FROM {table} WHERE id < $1 ORDER BY id", 1000, output=buf))
            out.append(buf.getvalue())
            chunks: list[bytes] = []

            async def sink(chunk: bytes) -> None:
                chunks.append(bytes(chunk))

            out.append(await conn.copy_from_query(
                f"SELECT id, raw FROM {table} ORDER BY id", output=sink, format="binary"))
            out.append(b"".join(chunks))
            # COPY left the connection in a usable state.
            out.append(await conn.fetchval(f"SELECT sum(id) FROM {table}"))
        return out

    direct = arun(scenario(direct_dsn, names("copy_direct")))
    proxied = arun(scenario(proxy_dsn, names("copy_proxy")))
    assert proxied == direct
    assert proxied[:3] == ["COPY 5000", "COPY 1", "COPY 5001"]
    assert proxied[4] == "COPY 1000"
    assert proxied[-1] == sum(range(5000)) + 9000


def test_asyncpg_transactions_and_savepoints(
    proxy_dsn: str, names: Names, pg_primary: PgCluster
) -> None:
    table = names("tx")

    class Boom(Exception):
        pass

    async def scenario() -> None:
        async with apg(proxy_dsn) as conn:
            await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
            ins = f"INSERT INTO {table} VALUES ($1)"
            async with conn.transaction():
                await conn.execute(ins, 1)
                with pytest.raises(Boom):
                    async with conn.transaction():  # SAVEPOINT
                        await conn.execute(ins, 2)
                        raise Boom
                async with conn.transaction():
                    await conn.execute(ins, 3)
                    async with conn.transaction():  # a savepoint inside a savepoint
                        await conn.execute(ins, 4)
                    with pytest.raises(asyncpg.UniqueViolationError):
                        async with conn.transaction():
                            await conn.execute(ins, 4)
                    await conn.execute(ins, 5)
                assert conn.is_in_transaction()
            assert not conn.is_in_transaction()

            tr = conn.transaction()
            await tr.start()
            await conn.execute(ins, 6)
            await tr.rollback()

            with pytest.raises(asyncpg.DivisionByZeroError):
                async with conn.transaction():
                    await conn.execute(ins, 7)
                    await conn.execute("SELECT 1/0")
            assert not conn.is_in_transaction()

            tr = conn.transaction(isolation="serializable", readonly=True)
            await tr.start()
            assert await conn.fetchval("SHOW transaction_isolation") == "serializable"
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await conn.execute(ins, 8)
            await tr.rollback()
            assert [r[0] for r in await conn.fetch(f"SELECT id FROM {table} ORDER BY id")] == [
                1, 3, 4, 5,
            ]

    arun(scenario())
    assert pg_primary.psql(f"SELECT string_agg(id::text, ',' ORDER BY id) FROM {table}") == (
        "1,3,4,5"
    )


def test_asyncpg_server_side_cursors(proxy_dsn: str, direct_dsn: str) -> None:
    async def scenario(dsn: str) -> list[Any]:
        out: list[Any] = []
        async with apg(dsn) as conn:
            query = "SELECT g, md5(g::text) FROM generate_series(1, $1::int) g"
            async with conn.transaction():
                out.append([tuple(r) async for r in conn.cursor(query, 2500, prefetch=100)])
                cur = await conn.cursor(query, 500)
                out.append([tuple(r) for r in await cur.fetch(10)])
                out.append(await cur.forward(90))
                row = await cur.fetchrow()
                out.append(tuple(row) if row is not None else None)
                out.append([tuple(r) for r in await cur.fetch(1000)])
                out.append(await cur.fetchrow())
            # Cursors died with the transaction; the connection goes on.
            out.append(await conn.fetchval("SELECT count(*) FROM pg_cursors WHERE name <> ''"))
        return out

    direct = arun(scenario(direct_dsn))
    proxied = arun(scenario(proxy_dsn))
    assert proxied == direct
    assert len(proxied[0]) == 2500 and proxied[0][-1][0] == 2500
    assert [r[0] for r in proxied[1]] == list(range(1, 11))
    assert proxied[2] == 90
    assert proxied[3] is not None and proxied[3][0] == 101
    assert [r[0] for r in proxied[4]] == list(range(102, 501))
    assert proxied[5] is None
    assert proxied[6] == 0


def test_asyncpg_listen_notify(proxy_dsn: str) -> None:
    channel = unique_name("chan")

    async def scenario() -> None:
        got: list[tuple[int, str, str]] = []
        arrived = asyncio.Event()

        def on_notify(conn: Any, pid: int, chan: str, payload: str) -> None:
            got.append((pid, chan, payload))
            arrived.set()

        async def wait_for(n: int) -> None:
            async with asyncio.timeout(10):
                while len(got) < n:
                    arrived.clear()
                    await arrived.wait()

        async with apg(proxy_dsn) as listener, apg(proxy_dsn) as notifier:
            await listener.add_listener(channel, on_notify)
            notifier_pid = await notifier.fetchval("SELECT pg_backend_pid()")
            await notifier.execute(f"NOTIFY {channel}, 'plain'")
            await notifier.execute("SELECT pg_notify($1, $2)", channel, "function")
            await wait_for(2)
            async with notifier.transaction():
                await notifier.execute(f"NOTIFY {channel}, 'at commit'")
                await asyncio.sleep(0.2)
                assert len(got) == 2  # delivered only when the transaction commits
            await wait_for(3)
            assert [r[2] for r in got] == ["plain", "function", "at commit"]
            # The pid is the notifying *server* backend's: forwarded untouched.
            assert {r[0] for r in got} == {notifier_pid}
            assert {r[1] for r in got} == {channel}
            # The listener's connection still answers queries, and hears nothing more.
            assert await listener.fetchval("SELECT 1") == 1
            await listener.remove_listener(channel, on_notify)
            await notifier.execute(f"NOTIFY {channel}, 'unheard'")
            assert await listener.fetchval("SELECT 2") == 2
            await asyncio.sleep(0.1)
            assert len(got) == 3

    arun(scenario())


def test_asyncpg_timeout_cancels_the_query(proxy_dsn: str, direct_dsn: str) -> None:
    marker = unique_name("sleepy")

    async def scenario() -> None:
        async with apg(proxy_dsn) as conn, apg(direct_dsn) as observer:
            with pytest.raises((asyncio.TimeoutError, asyncpg.QueryCanceledError)):
                await conn.fetch(f"SELECT pg_sleep(60), '{marker}'", timeout=0.5)
            # The connection is usable afterwards, in a clean state.
            assert await conn.fetchval("SELECT 41 + 1") == 42
            assert not conn.is_in_transaction()
            # The proxy relayed asyncpg's CancelRequest: the sleep is gone from the server
            # (bounded wait; a missed cancel would leave it there for a minute).
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while True:
                active = await observer.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                    "AND query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()", marker)
                if active == 0:
                    break
                assert loop.time() < deadline, "pg_sleep is still running on the server"
                await asyncio.sleep(0.05)
            # A cancel with nothing running is harmless too.
            assert await conn.fetchval("SELECT $1::text", marker) == marker

    arun(scenario())


def test_asyncpg_notices_reach_log_listener(proxy_dsn: str) -> None:
    async def scenario() -> list[tuple[str, str, str]]:
        seen: list[tuple[str, str, str]] = []
        async with apg(proxy_dsn) as conn:
            conn.add_log_listener(
                lambda c, m: seen.append((m.severity, m.sqlstate, m.message)))
            await conn.execute(
                "DO $$ BEGIN RAISE NOTICE 'hello %', 42; RAISE WARNING 'careful'; END $$")
            # Notices in the middle of a result set too.
            await conn.fetch(
                "SELECT g FROM generate_series(1, 3) g "
                "WHERE g > 0 OR (SELECT 1 FROM pg_sleep(0)) IS NULL")
            await conn.execute(
                "CREATE OR REPLACE FUNCTION pg_temp.chatty(i int) RETURNS int "
                "LANGUAGE plpgsql AS $$ BEGIN RAISE NOTICE 'row %', i; RETURN i; END $$")
            assert [r[0] for r in await conn.fetch(
                "SELECT pg_temp.chatty(g) FROM generate_series(1, 3) g")] == [1, 2, 3]
            async with asyncio.timeout(10):
                while len(seen) < 5:
                    await asyncio.sleep(0.01)
        return seen

    assert arun(scenario()) == [
        ("NOTICE", "00000", "hello 42"),
        ("WARNING", "01000", "careful"),
        ("NOTICE", "00000", "row 1"),
        ("NOTICE", "00000", "row 2"),
        ("NOTICE", "00000", "row 3"),
    ]


def test_asyncpg_parameter_status(proxy_dsn: str) -> None:
    async def scenario() -> None:
        async with apg(proxy_dsn, server_settings={"application_name": "cc_startup"}) as conn:
            settings = conn.get_settings()
            assert settings.application_name == "cc_startup"
            assert settings.server_version.startswith("15")
            await conn.execute("SET application_name = 'cc_changed'")
            assert conn.get_settings().application_name == "cc_changed"
            await conn.execute("SET TimeZone = 'Asia/Tokyo'")
            assert conn.get_settings().TimeZone == "Asia/Tokyo"
            async with conn.transaction():
                await conn.execute("SET LOCAL application_name = 'cc_local'")
                assert conn.get_settings().application_name == "cc_local"
            assert conn.get_settings().application_name == "cc_changed"
            assert await conn.fetchval(
                "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()"
            ) == "cc_changed"

    arun(scenario())


def test_asyncpg_large_result(proxy_dsn: str, direct_dsn: str) -> None:
    query = ("SELECT g, md5(g::text) AS h, repeat('x', g % 50) AS pad, g * 0.5 AS half "
             "FROM generate_series(1, 100000) g")

    async def fetch(dsn: str) -> list[tuple[Any, ...]]:
        async with apg(dsn) as conn:
            rows = [tuple(r) for r in await conn.fetch(query)]
            rows.append((await conn.fetchval("SELECT 'still in sync'"),))
            return rows

    direct = arun(fetch(direct_dsn))
    proxied = arun(fetch(proxy_dsn))
    assert len(proxied) == 100_001
    assert proxied == direct


def test_asyncpg_huge_values(proxy_dsn: str, direct_dsn: str) -> None:
    """Messages far larger than a socket read: a 16 MB Bind parameter and DataRow."""
    blob = bytes(range(256)) * (16 * 4096)
    text = "é" * 3_000_000

    async def scenario(dsn: str) -> list[Any]:
        async with apg(dsn) as conn:
            row = await conn.fetchrow("SELECT $1::bytea AS b, length($1::bytea) AS n, "
                                      "md5($1::bytea) AS h, $2::text AS t", blob, text)
            assert row is not None
            rows = await conn.fetch("SELECT repeat(md5(g::text), 100000) FROM "
                                    "generate_series(1, 3) g")
            return [row["b"] == blob, row["n"], row["h"], row["t"] == text,
                    [len(r[0]) for r in rows], await conn.fetchval("SELECT 'after'")]

    direct = arun(scenario(direct_dsn))
    proxied = arun(scenario(proxy_dsn))
    assert proxied == direct
    assert proxied[:2] == [True, len(blob)] and proxied[3] is True


def test_asyncpg_pool(proxy_dsn: str) -> None:
    """A pool resets connections on release (RESET ALL, UNLISTEN *, CLOSE ALL, ...)."""

    async def scenario() -> None:
        async with asyncpg.create_pool(proxy_dsn, min_size=2, max_size=4) as pool:
            async def work(i: int) -> int:
                async with pool.acquire() as conn:
                    await conn.execute(f"SET application_name = 'cc_pool_{i}'")
                    async with conn.transaction():
                        value: int = await conn.fetchval("SELECT $1::int * 2", i)
                    return value

            assert await asyncio.gather(*(work(i) for i in range(60))) == [
                2 * i for i in range(60)]
            assert await pool.fetchval("SELECT current_setting('application_name')") == ""
            assert await pool.fetchval("SELECT 7") == 7

    arun(scenario())


TYPES_SETUP = """
CREATE TYPE {schema}.mood AS ENUM ('sad', 'ok', 'happy');
CREATE TYPE {schema}.pair AS (a int, b text);
CREATE DOMAIN {schema}.posint AS int CHECK (VALUE > 0);
"""
TYPES_QUERY = """
SELECT 'happy'::{schema}.mood AS mood, ROW(1, 'x')::{schema}.pair AS pair,
       5::{schema}.posint AS dom, ARRAY[1, NULL, 3] AS ints, '{{"a": [1, 2]}}'::jsonb AS doc,
       '6f1f6d34-6f28-4f05-9a2f-0ae2f3c6f7a1'::uuid AS id, 12345.6789::numeric AS num,
       '2024-02-29 12:34:56.789+00'::timestamptz AS ts, '1 day 02:03:04'::interval AS iv,
       '\\xdeadbeef'::bytea AS raw, int4range(1, 10) AS rng, 'NaN'::float8 AS nan,
       NULL::text AS nothing, '192.168.0.1/24'::inet AS addr, B'1011' AS bits
"""


def test_type_round_trips(proxy_dsn: str, direct_dsn: str, schema: str) -> None:
    """Binary and text results of many types, incl. asyncpg's introspection of custom ones."""
    psycopg.connect(direct_dsn, autocommit=True).execute(
        TYPES_SETUP.format(schema=schema)).connection.close()
    query = TYPES_QUERY.format(schema=schema)

    async def with_asyncpg(dsn: str) -> list[Any]:
        async with apg(dsn) as conn:
            row = await conn.fetchrow(query)
            assert row is not None
            return [repr(v) for v in row.values()]

    def with_psycopg(dsn: str, binary: bool) -> list[Any]:
        with psycopg.connect(dsn) as conn, conn.cursor(binary=binary) as cur:
            cur.execute(query)
            row = cur.fetchone()
            assert row is not None
            return [repr(v) for v in row]

    assert arun(with_asyncpg(proxy_dsn)) == arun(with_asyncpg(direct_dsn))
    for binary in (False, True):
        assert with_psycopg(proxy_dsn, binary) == with_psycopg(direct_dsn, binary)


async def _terminated_mid_query(dsn: str, cluster: PgCluster) -> BaseException:
    """Run a long query and have the server terminate the session under it."""
    async with apg(dsn) as conn:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        marker = unique_name("doomed")
        query = asyncio.ensure_future(conn.fetchval(f"SELECT pg_sleep(30), '{marker}'"))
        await asyncio.to_thread(_wait_active, cluster, marker)
        await asyncio.to_thread(cluster.psql, f"SELECT pg_terminate_backend({pid})")
        with pytest.raises(asyncpg.ConnectionDoesNotExistError) as excinfo:
            await asyncio.wait_for(query, 20)
        assert conn.is_closed()
        error: BaseException = excinfo.value
        return error


def test_asyncpg_session_terminated_by_server(pg_primary: PgCluster, proxy_dsn: str) -> None:
    error = arun(_terminated_mid_query(proxy_dsn, pg_primary))
    assert "connection was closed in the middle of operation" in str(error)


def test_asyncpg_session_terminated_by_server_reports_the_server_error(
    pg_primary: PgCluster, proxy_dsn: str, direct_dsn: str
) -> None:
    direct = arun(_terminated_mid_query(direct_dsn, pg_primary))
    proxied = arun(_terminated_mid_query(proxy_dsn, pg_primary))
    # direct: "...: terminating connection due to administrator command"
    # proxied: "...: server closed the connection unexpectedly"
    assert str(proxied) == str(direct)


def test_psycopg_sees_server_termination(pg_primary: PgCluster, proxy_dsn: str) -> None:
    with psycopg.connect(proxy_dsn, autocommit=True) as conn:
        pid = conn.info.backend_pid  # the server backend's own PID, as directly
        pg_primary.psql(f"SELECT pg_terminate_backend({pid})")
        with pytest.raises(psycopg.errors.AdminShutdown) as excinfo:
            for _ in range(100):  # until the FATAL has arrived
                conn.execute("SELECT 1")
                time.sleep(0.05)
        assert excinfo.value.sqlstate == ADMIN_SHUTDOWN
        assert conn.closed


@pytest.mark.parametrize(
    "user", [pg.SCRAM_USER, pg.MD5_USER, pg.PW_USER, pg.APP_USER], ids=lambda u: u.name
)
def test_asyncpg_password_auth(proxy: ProxyThread, user: PasswordUser) -> None:
    dbname = pg.APP_DATABASE if user is pg.APP_USER else "postgres"

    async def scenario() -> None:
        async with apg(proxy.dsn(user.name, user.password, dbname)) as conn:
            assert await conn.fetchval("SELECT current_user") == user.name
            assert await conn.fetchval("SELECT current_database()") == dbname
        with pytest.raises(asyncpg.InvalidPasswordError) as excinfo:
            await asyncpg.connect(proxy.dsn(user.name, "wrong", dbname))
        assert excinfo.value.sqlstate == INVALID_PASSWORD
        # A failed login leaves the proxy serving others.
        async with apg(proxy.dsn(user.name, user.password, dbname)) as conn:
            assert await conn.fetchval("SELECT 1") == 1
        with pytest.raises(asyncpg.InvalidCatalogNameError):
            await asyncpg.connect(proxy.dsn(user.name, user.password, unique_name("nodb")))

    arun(scenario())


# --------------------------------------------------------------------------------------------
# psycopg 3
# --------------------------------------------------------------------------------------------


def test_psycopg_pipeline(proxy_dsn: str, direct_dsn: str, names: Names) -> None:
    def scenario(dsn: str, table: str) -> list[Any]:
        out: list[Any] = []
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
            with conn.pipeline():
                for i in range(500):
                    conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (i, f"v{i}"))
                counts = conn.execute(f"SELECT count(*), sum(id) FROM {table}")
                lookups = [conn.execute(f"SELECT v FROM {table} WHERE id = %s", (i,))
                           for i in (3, 250, 499, 1000)]
            out.append(counts.fetchone())
            out.append([cur.fetchone() for cur in lookups])
            # An error in a pipeline aborts what follows it up to the next sync.
            with pytest.raises(psycopg.errors.UniqueViolation), conn.pipeline() as p:
                conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (1000, "ok"))
                p.sync()
                conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (1, "dup"))
                conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (1001, "skipped"))
            with conn.pipeline():
                cur = conn.execute(f"SELECT id FROM {table} WHERE id >= 1000 ORDER BY id")
            out.append(cur.fetchall())
            # Pipelined inside a transaction.
            with conn.transaction(), conn.pipeline():
                conn.execute(f"UPDATE {table} SET v = 'w' WHERE id < %s", (100,))
                cur = conn.execute(f"SELECT count(*) FROM {table} WHERE v = 'w'")
            out.append(cur.fetchone())
        return out

    direct = scenario(direct_dsn, names("pipe_direct"))
    proxied = scenario(proxy_dsn, names("pipe_proxy"))
    assert proxied == direct
    assert proxied == [
        (500, sum(range(500))), [("v3",), ("v250",), ("v499",), None], [(1000,)], (100,),
    ]


def test_psycopg_copy(proxy_dsn: str, direct_dsn: str, names: Names) -> None:
    def scenario(dsn: str, table: str) -> list[Any]:
        out: list[Any] = []
        with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, name text, score float8, "
                        "raw bytea)")
            with cur.copy(f"COPY {table} (id, name, score, raw) FROM STDIN") as copy:
                for i in range(3000):
                    copy.write_row((i, None if i % 11 == 0 else f"tab\there {i}\n", i / 7,
                                    bytes([i % 256])))
            out.append(cur.rowcount)
            with cur.copy(f"COPY {table} (id, name, score, raw) FROM STDIN (FORMAT BINARY)"
                          ) as copy:
                copy.set_types(["int4", "text", "float8", "bytea"])
                for i in range(3000, 3500):
                    copy.write_row((i, f"binary {i}", -i / 3, b"\x00\xff"))
            out.append(cur.rowcount)
            with cur.copy(f"COPY (SELECT * FROM {table} ORDER BY id) TO STDOUT") as copy:
                out.append(b"".join(bytes(chunk) for chunk in copy))
            with cur.copy(f"COPY (SELECT id, name, raw FROM {table} ORDER BY id) TO STDOUT "
                          "(FORMAT BINARY)") as copy:
                copy.set_types(["int4", "text", "bytea"])
                out.append([(r[0], r[1], bytes(r[2])) for r in copy.rows()])
            # A COPY FROM that fails on the server: CopyFail/error, then the connection works.
            with pytest.raises(psycopg.errors.UniqueViolation), cur.copy(
                f"COPY {table} (id) FROM STDIN"
            ) as copy:
                copy.write_row((5,))
            # The client gives up mid-COPY: psycopg sends CopyFail and re-raises.
            with pytest.raises(ZeroDivisionError), cur.copy(
                f"COPY {table} (id) FROM STDIN"
            ) as copy:
                copy.write_row((99_999,))
                raise ZeroDivisionError("client-side failure")
            # The server fails midway through a COPY TO.
            with pytest.raises(psycopg.errors.DivisionByZero), cur.copy(
                "COPY (SELECT 1 / (2000 - g) FROM generate_series(1, 5000) g) TO STDOUT"
            ) as copy:
                out.append(sum(len(bytes(chunk)) for chunk in copy))
            cur.execute(f"SELECT count(*), sum(id) FROM {table}")
            out.append(cur.fetchone())
        return out

    direct = scenario(direct_dsn, names("pcopy_direct"))
    proxied = scenario(proxy_dsn, names("pcopy_proxy"))
    assert proxied == direct
    assert proxied[0:2] == [3000, 500]
    assert proxied[3][5] == (5, "tab\there 5\n", b"\x05")
    assert proxied[-1] == (3500, sum(range(3500)))


def test_psycopg_named_cursor(proxy_dsn: str, direct_dsn: str) -> None:
    query = "SELECT g, md5(g::text) FROM generate_series(1, %s) g"

    def scenario(dsn: str) -> list[Any]:
        out: list[Any] = []
        with psycopg.connect(dsn) as conn:
            with conn.cursor(name="cc_named") as cur:
                cur.itersize = 77
                cur.execute(query, (5000,))
                out.append(list(cur))
            with conn.cursor(name="cc_scroll", scrollable=True) as cur:
                cur.execute(query, (100,))
                out.append(cur.fetchmany(5))
                cur.scroll(50, mode="absolute")
                out.append(cur.fetchone())
                cur.scroll(-10)
                out.append(cur.fetchone())
            conn.commit()
            # WITH HOLD: the cursor survives the commit.
            with conn.cursor(name="cc_hold", withhold=True) as cur:
                cur.itersize = 10
                cur.execute(query, (30,))
                conn.commit()
                out.append([r[0] for r in cur])
            out.append(conn.execute("SELECT count(*) FROM pg_cursors WHERE name <> ''").fetchone())
        return out

    direct = scenario(direct_dsn)
    proxied = scenario(proxy_dsn)
    assert proxied == direct
    assert len(proxied[0]) == 5000 and proxied[0][-1][0] == 5000
    assert [r[0] for r in proxied[1]] == [1, 2, 3, 4, 5]
    assert proxied[2][0] == 51 and proxied[3][0] == 42
    assert proxied[4] == list(range(1, 31))
    assert proxied[5] == (0,)


@pytest.mark.parametrize("threshold", [1, 5, 0])
def test_psycopg_prepared_statements(
    proxy_dsn: str, direct_dsn: str, names: Names, threshold: int
) -> None:
    def scenario(dsn: str, table: str) -> list[Any]:
        out: list[Any] = []
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=threshold) as conn:
            conn.prepared_max = 4  # forces DEALLOCATE of older statements
            conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
            for i in range(10):
                conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (i, f"v{i}"))
            for i in range(10):
                out.append(conn.execute(
                    f"SELECT v, id * 2 FROM {table} WHERE id = %s", (i,)).fetchone())
            out.append(conn.execute(
                "SELECT count(*) FROM pg_prepared_statements "
                "WHERE statement LIKE 'SELECT v, id * 2 FROM%'").fetchone())
            # More distinct statements than prepared_max, twice: psycopg deallocates the
            # least recently used ones and prepares them again.
            for _ in range(2):
                for k in range(8):
                    out.append(conn.execute(f"SELECT %s::int + {k}", (k,)).fetchone())
            out.append(conn.execute(
                "SELECT count(*) <= 5 FROM pg_prepared_statements").fetchone())
            # An explicitly prepared statement that fails on some executions.
            for divisor in (2, 1, 0, 2, 1, 0):
                if divisor == 0:
                    with pytest.raises(psycopg.errors.DivisionByZero):
                        conn.execute("SELECT 10 / %s::int", (divisor,), prepare=True)
                else:
                    out.append(conn.execute(
                        "SELECT 10 / %s::int", (divisor,), prepare=True).fetchone())
            out.append(conn.execute("SELECT 'still fine'").fetchone())
        return out

    direct = scenario(direct_dsn, names("pprep_direct"))
    proxied = scenario(proxy_dsn, names("pprep_proxy"))
    assert proxied == direct
    assert proxied[:10] == [(f"v{i}", i * 2) for i in range(10)]
    assert proxied[10] == (1,)  # the repeated query became a server-side prepared statement
    assert proxied[11:27] == [(2 * k,) for k in range(8)] * 2
    assert proxied[27] == (True,)
    assert proxied[28:] == [(5,), (10,), (5,), (10,), ("still fine",)]


def test_psycopg_executemany(proxy_dsn: str, direct_dsn: str, names: Names) -> None:
    def scenario(dsn: str, table: str) -> list[Any]:
        out: list[Any] = []
        with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(f"CREATE TABLE {table} (id serial PRIMARY KEY, name text, n int)")
            cur.executemany(f"INSERT INTO {table} (name, n) VALUES (%s, %s)",
                            [(f"n{i}", i) for i in range(1000)])
            out.append(cur.rowcount)
            cur.executemany(f"INSERT INTO {table} (name, n) VALUES (%s, %s) RETURNING id, n",
                            [(f"r{i}", i) for i in range(5)], returning=True)
            returned = []
            while True:
                returned.append(cur.fetchone())
                if not cur.nextset():
                    break
            out.append(returned)
            cur.executemany(f"UPDATE {table} SET n = n + %(delta)s WHERE name = %(name)s",
                            [{"delta": 100, "name": f"n{i}"} for i in range(10)])
            out.append(cur.rowcount)
            with pytest.raises(psycopg.errors.NotNullViolation):
                cur.executemany(f"INSERT INTO {table} (id, name) VALUES (%s, %s)",
                                [(5000, "a"), (None, "b"), (5001, "c")])
            cur.execute(f"SELECT count(*), sum(n) FROM {table}")
            out.append(cur.fetchone())
        return out

    direct = scenario(direct_dsn, names("pem_direct"))
    proxied = scenario(proxy_dsn, names("pem_proxy"))
    assert proxied == direct
    assert proxied[0] == 1000
    assert proxied[1] == [(1001 + i, i) for i in range(5)]
    assert proxied[2] == 10


def test_psycopg_transactions(proxy_dsn: str, names: Names, pg_primary: PgCluster) -> None:
    table = names("ptx")
    with psycopg.connect(proxy_dsn) as conn:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        conn.commit()
        ins = f"INSERT INTO {table} VALUES (%s)"
        with conn.transaction():
            conn.execute(ins, (1,))
            with conn.transaction():  # SAVEPOINT
                conn.execute(ins, (2,))
                raise psycopg.Rollback()
            with pytest.raises(psycopg.errors.UniqueViolation), conn.transaction():
                conn.execute(ins, (1,))
            with conn.transaction(), conn.transaction():
                conn.execute(ins, (3,))
        with conn.transaction():
            conn.execute(ins, (4,))
            raise psycopg.Rollback()
        # Implicit transactions (autocommit off): commit and rollback.
        conn.execute(ins, (5,))
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        conn.commit()
        conn.execute(ins, (6,))
        conn.rollback()
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        conn.rollback()
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        rows = conn.execute(f"SELECT id FROM {table} ORDER BY id").fetchall()
        assert rows == [(1,), (3,), (5,)]
    assert pg_primary.psql(f"SELECT string_agg(id::text, ',' ORDER BY id) FROM {table}") == (
        "1,3,5"
    )


def test_psycopg_async(proxy_dsn: str, direct_dsn: str, names: Names) -> None:
    async def scenario(dsn: str, table: str) -> list[Any]:
        out: list[Any] = []
        async with await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, prepare_threshold=2
        ) as conn:
            await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
            async with conn.pipeline():
                for i in range(200):
                    await conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (i, f"v{i}"))
                cur = await conn.execute(f"SELECT count(*) FROM {table}")
            out.append(await cur.fetchone())
            async with conn.cursor() as cur:
                async with cur.copy(f"COPY {table} FROM STDIN") as copy:
                    for i in range(200, 700):
                        await copy.write_row((i, f"c{i}"))
                async with cur.copy(
                    f"COPY (SELECT * FROM {table} ORDER BY id) TO STDOUT"
                ) as copy:
                    out.append(b"".join([bytes(c) async for c in copy]))
            async with conn.cursor() as cur:
                await cur.executemany(f"UPDATE {table} SET v = %s WHERE id = %s",
                                      [(f"u{i}", i) for i in range(0, 700, 7)])
            for i in range(6):
                cur = await conn.execute(f"SELECT v FROM {table} WHERE id = %s", (i * 7,))
                out.append(await cur.fetchone())
            async with conn.transaction():
                await conn.execute(f"DELETE FROM {table} WHERE id < 100")
                with contextlib.suppress(psycopg.Rollback):
                    async with conn.transaction():
                        await conn.execute(f"DELETE FROM {table}")
                        raise psycopg.Rollback()
            async with conn.transaction(), conn.cursor(name="cc_async") as named:
                named.itersize = 50
                await named.execute(f"SELECT id, v FROM {table} ORDER BY id")
                out.append([row async for row in named])
        return out

    direct = arun(scenario(direct_dsn, names("pasync_direct")))
    proxied = arun(scenario(proxy_dsn, names("pasync_proxy")))
    assert proxied == direct
    assert proxied[0] == (200,)
    assert proxied[2:8] == [(f"u{i * 7}",) for i in range(6)]
    assert len(proxied[8]) == 600 and proxied[8][0] == (100, "v100")


@pytest.mark.parametrize("sslmode", ["disable", "prefer"])
def test_psycopg_cancel(proxy_dsn: str, pg_primary: PgCluster, sslmode: str) -> None:
    """libpq's cancel connection (PQcancelCreate; with sslmode=prefer it asks for TLS first)."""
    marker = unique_name("cancel_me")
    with psycopg.connect(proxy_dsn, sslmode=sslmode, autocommit=True) as conn:
        canceller = _cancel_when_active(conn.cancel_safe, pg_primary, marker)
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute(f"SELECT pg_sleep(30), '{marker}'")
        canceller.join(20)
        assert conn.execute("SELECT 'usable'").fetchone() == ("usable",)
        # Not conn.cancel() (blocking PQcancel): psycopg holds the GIL during that call, which
        # would starve the in-process proxy thread; test_psql_ctrl_c_cancels covers PQcancel.


@pytest.mark.skipif(psycopg.pq.version() < 180000, reason="needs libpq 18 (protocol 3.2)")
def test_psycopg_protocol_negotiation(proxy_dsn: str, pg_primary: PgCluster) -> None:
    """libpq 18 asks for protocol 3.2; PostgreSQL 15 answers NegotiateProtocolVersion (3.0)."""
    marker = unique_name("cancel_me")
    with psycopg.connect(proxy_dsn, max_protocol_version="3.2", sslmode="prefer") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.info.pgconn.protocol_version == 3
        canceller = _cancel_when_active(conn.cancel_safe, pg_primary, marker)
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute(f"SELECT pg_sleep(30), '{marker}'")
        canceller.join(20)
        conn.rollback()
        assert conn.execute("SELECT 2").fetchone() == (2,)


def _libpq_results(pgconn: PGconn) -> list[PGresult]:
    """Results of the current libpq request, up to a COPY or the end (non-blocking libpq calls:
    a blocking one would hold the GIL and starve the in-process proxy thread)."""
    results: list[PGresult] = []
    while True:
        while pgconn.flush():
            io_select.select([], [pgconn.socket], [], 1.0)
        pgconn.consume_input()
        while pgconn.is_busy():
            io_select.select([pgconn.socket], [], [], 1.0)
            pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:
            return results
        results.append(result)
        if result.status in (pq.ExecStatus.COPY_IN, pq.ExecStatus.COPY_OUT):
            return results


def _extended_copy_in(conn: psycopg.Connection[Any], table: str, data: bytes) -> list[Any]:
    """COPY FROM STDIN sent with PQsendQueryParams, as libpq programs and tokio-postgres do.

    On the wire: Parse, Bind, Describe, Execute, Sync, then CopyData..., CopyDone and a second
    Sync (the server ignores the first one while in copy-in mode).
    """
    pgconn = conn.pgconn
    pgconn.nonblocking = 1
    out: list[Any] = []

    def summary(results: list[PGresult]) -> list[Any]:
        return [(pq.ExecStatus(r.status).name, r.command_status,
                 r.get_value(0, 0) if r.ntuples else None) for r in results]

    pgconn.send_query_params(f"COPY {table} FROM STDIN".encode(), None)
    out += summary(_libpq_results(pgconn))
    pgconn.put_copy_data(data)
    pgconn.put_copy_end()
    out += summary(_libpq_results(pgconn))
    for query in (f"SELECT count(*) FROM {table}", "SELECT 42"):
        pgconn.send_query_params(query.encode(), None)
        out += summary(_libpq_results(pgconn))
    pgconn.nonblocking = 0
    return out


@pytest.mark.parametrize("bad_row", [False, True], ids=["ok", "bad-row"])
def test_libpq_extended_protocol_copy_in(
    proxy_dsn: str, direct_dsn: str, names: Names, bad_row: bool
) -> None:
    data = b"1\tone\n2\ttwo\n" + (b"x\tbad\n" if bad_row else b"")
    outputs = []
    for dsn, table in ((direct_dsn, names("xcopy_direct")), (proxy_dsn, names("xcopy_proxy"))):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE {table} (a int, b text)")
            outputs.append(_extended_copy_in(conn, table, data))
            assert conn.execute("SELECT 'in sync'").fetchone() == ("in sync",)
    assert outputs[1] == outputs[0]
    expected_copy = ("FATAL_ERROR", b"", None) if bad_row else ("COMMAND_OK", b"COPY 2", None)
    assert outputs[1] == [
        ("COPY_IN", b"", None), expected_copy,
        ("TUPLES_OK", b"SELECT 1", b"0" if bad_row else b"2"), ("TUPLES_OK", b"SELECT 1", b"42"),
    ]




def test_libpq_extended_protocol_copy_in_keeps_the_proxy_in_step(
    proxy: ProxyThread, names: Names
) -> None:
    app = unique_name("cc_xcopy")
    table = names("xcopy_step")
    with psycopg.connect(proxy.dsn(), autocommit=True, application_name=app) as conn:
        conn.execute(f"CREATE TABLE {table} (a int, b text)")
        _extended_copy_in(conn, table, b"1\tone\n")
        assert conn.execute("SELECT 'idle now'").fetchone() == ("idle now",)

        def pending() -> list[list[str]]:
            sessions = proxy.runtime.proxy.sessions.values()  # type: ignore[union-attr]
            return [[p.sql for p in s.conv.pending()] for s in sessions
                    if s.application_name == app and s.conv is not None]

        # The client waits for nothing, so the proxy must not think a request is in flight.
        assert proxy.call(pending) == [[]]


@pytest.mark.parametrize("user", [pg.SCRAM_USER, pg.MD5_USER, pg.PW_USER], ids=lambda u: u.name)
def test_psycopg_password_auth(proxy: ProxyThread, user: PasswordUser) -> None:
    with psycopg.connect(proxy.dsn(user.name, user.password), sslmode="prefer") as conn:
        assert conn.execute("SELECT current_user").fetchone() == (user.name,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(proxy.dsn(user.name, "wrong"))


# --------------------------------------------------------------------------------------------
# SQLAlchemy 2 (async, asyncpg) and SQLModel (sync, psycopg)
# --------------------------------------------------------------------------------------------


class SABase(DeclarativeBase):
    pass


class SATeam(SABase):
    __tablename__ = "team"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50), unique=True)
    players: Mapped[list["SAPlayer"]] = relationship(
        back_populates="team", cascade="all, delete-orphan", order_by="SAPlayer.name")


class SAPlayer(SABase):
    __tablename__ = "player"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    score: Mapped[int] = mapped_column(default=0)
    team_id: Mapped[int] = mapped_column(ForeignKey("team.id"))
    team: Mapped[SATeam] = relationship(back_populates="players")


EXPECTED_AFTER_CRUD = [
    ("Ants", "a1-renamed", 11),
    ("Ants", "a2", 12),
    ("Ants", "a3", 3),
    ("Ants", "b2", 5),
]


def _rows_in_schema(dsn: str, schema: str, team: str, player: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            sql.SQL("SELECT t.name, p.name, p.score FROM {} p JOIN {} t ON t.id = p.team_id "
                    "ORDER BY t.name, p.name").format(
                sql.Identifier(schema, player), sql.Identifier(schema, team))
        ).fetchall()


def test_sqlalchemy_async_orm(proxy: ProxyThread, direct_dsn: str, schema: str) -> None:
    url = f"postgresql+asyncpg://{pg.SUPERUSER}@{proxy.host}:{proxy.port}/postgres"

    async def scenario() -> list[Any]:
        engine = create_async_engine(
            url, connect_args={"server_settings": {"search_path": schema}})
        out: list[Any] = []
        try:
            async with engine.begin() as conn:
                await conn.run_sync(SABase.metadata.create_all)
            make_session = async_sessionmaker(engine, expire_on_commit=False)
            session: AsyncSession
            async with make_session() as session, session.begin():
                session.add_all([
                    SATeam(name="Ants", players=[SAPlayer(name=f"a{i}", score=i)
                                                 for i in (1, 2, 3)]),
                    SATeam(name="Bees", players=[SAPlayer(name=f"b{i}", score=i * 5)
                                                 for i in (1, 2)]),
                ])
            async with make_session() as session:
                teams = (await session.scalars(
                    select(SATeam).options(sa_selectinload(SATeam.players))
                    .order_by(SATeam.name))).all()
                out.append([(t.name, [p.name for p in t.players]) for t in teams])
                players = (await session.scalars(
                    select(SAPlayer).options(joinedload(SAPlayer.team))
                    .where(SAPlayer.score >= 2).order_by(SAPlayer.name))).all()
                out.append([(p.name, p.team.name) for p in players])
                joined = (await session.scalars(
                    select(SATeam).options(joinedload(SATeam.players))
                    .order_by(SATeam.name))).unique().all()
                out.append([len(t.players) for t in joined])
            async with make_session() as session, session.begin():
                a1 = (await session.scalars(
                    select(SAPlayer).where(SAPlayer.name == "a1"))).one()
                a1.name = "a1-renamed"
                ants = (await session.scalars(
                    select(SATeam).where(SATeam.name == "Ants"))).one()
                b2 = (await session.scalars(
                    select(SAPlayer).where(SAPlayer.name == "b2"))).one()
                b2.team = ants
                b2.score = 5
                await session.execute(
                    update(SAPlayer).where(SAPlayer.name.in_(["a1-renamed", "a2"]))
                    .values(score=SAPlayer.score + 10))
            async with make_session() as session, session.begin():
                bees = (await session.scalars(
                    select(SATeam).options(sa_selectinload(SATeam.players))
                    .where(SATeam.name == "Bees"))).one()
                await session.delete(bees)  # cascades to b1
            async with make_session() as session:
                rows = await session.execute(
                    select(SATeam.name, SAPlayer.name, SAPlayer.score)
                    .join(SAPlayer.team).order_by(SATeam.name, SAPlayer.name))
                out.append([tuple(r) for r in rows])
        finally:
            await engine.dispose()
        return out

    out = arun(scenario())
    assert out[0] == [("Ants", ["a1", "a2", "a3"]), ("Bees", ["b1", "b2"])]
    assert out[1] == [("a2", "Ants"), ("a3", "Ants"), ("b1", "Bees"), ("b2", "Bees")]
    assert out[2] == [3, 2]
    assert out[3] == EXPECTED_AFTER_CRUD
    assert _rows_in_schema(direct_dsn, schema, "team", "player") == EXPECTED_AFTER_CRUD


class CCTeam(SQLModel, table=True):
    __tablename__ = "cc_team"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True)
    players: list["CCPlayer"] = Relationship(
        back_populates="team", sa_relationship_kwargs={"cascade": "all, delete-orphan"})


class CCPlayer(SQLModel, table=True):
    __tablename__ = "cc_player"

    id: int | None = Field(default=None, primary_key=True)
    name: str
    score: int = 0
    team_id: int | None = Field(default=None, foreign_key="cc_team.id")
    team: CCTeam | None = Relationship(back_populates="players")


def test_sqlmodel_sync_orm(proxy: ProxyThread, direct_dsn: str, schema: str) -> None:
    url = f"postgresql+psycopg://{pg.SUPERUSER}@{proxy.host}:{proxy.port}/postgres"
    engine = create_engine(url, connect_args={"options": f"-csearch_path={schema}"})
    try:
        SQLModel.metadata.create_all(
            engine, tables=[CCTeam.__table__, CCPlayer.__table__])  # type: ignore[attr-defined]
        with Session(engine) as session:
            session.add(CCTeam(name="Ants", players=[CCPlayer(name=f"a{i}", score=i)
                                                     for i in (1, 2, 3)]))
            session.add(CCTeam(name="Bees", players=[CCPlayer(name=f"b{i}", score=i * 5)
                                                     for i in (1, 2)]))
            session.commit()
        with Session(engine) as session:
            teams = session.exec(
                sm_select(CCTeam).options(sa_selectinload(CCTeam.players))  # type: ignore[arg-type]
                .order_by(CCTeam.name)).all()
            assert [(t.name, sorted(p.name for p in t.players)) for t in teams] == [
                ("Ants", ["a1", "a2", "a3"]), ("Bees", ["b1", "b2"])]
            players = session.exec(
                sm_select(CCPlayer).options(joinedload(CCPlayer.team))  # type: ignore[arg-type]
                .where(CCPlayer.score >= 2).order_by(CCPlayer.name)).all()
            assert [(p.name, p.team.name if p.team else None) for p in players] == [
                ("a2", "Ants"), ("a3", "Ants"), ("b1", "Bees"), ("b2", "Bees")]
        with Session(engine) as session:
            a1 = session.exec(sm_select(CCPlayer).where(CCPlayer.name == "a1")).one()
            a1.name = "a1-renamed"
            ants = session.exec(sm_select(CCTeam).where(CCTeam.name == "Ants")).one()
            b2 = session.exec(sm_select(CCPlayer).where(CCPlayer.name == "b2")).one()
            b2.team = ants
            b2.score = 5
            session.add_all([a1, b2])
            session.commit()
            for p in session.exec(sm_select(CCPlayer).where(
                    col(CCPlayer.name).in_(["a1-renamed", "a2"]))):
                p.score += 10
                session.add(p)
            session.commit()
        with Session(engine) as session:
            bees = session.exec(sm_select(CCTeam).where(CCTeam.name == "Bees")).one()
            session.delete(bees)
            session.commit()
        with Session(engine) as session:
            rows = session.exec(
                sm_select(CCTeam.name, CCPlayer.name, CCPlayer.score)
                .join(CCPlayer).order_by(CCTeam.name, CCPlayer.name)).all()
            assert [tuple(r) for r in rows] == EXPECTED_AFTER_CRUD
    finally:
        engine.dispose()
    assert _rows_in_schema(direct_dsn, schema, "cc_team", "cc_player") == EXPECTED_AFTER_CRUD


# --------------------------------------------------------------------------------------------
# node-postgres and pgjdbc
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def node_client() -> Path:
    reason = node_missing()
    if reason is not None:
        pytest.skip(f"node-postgres: {reason}")
    ensure_node_modules()
    return NODE_DIR / "compat.js"


def test_node_postgres(
    node_client: Path, proxy: ProxyThread, pg_primary: PgCluster, app_names: Names
) -> None:
    user = pg.APP_USER
    outputs: dict[str, dict[str, Any]] = {}
    for target, dsn in (("direct", pg_primary.dsn(user.name, user.password, pg.APP_DATABASE)),
                        ("proxy", proxy.dsn(user.name, user.password, pg.APP_DATABASE))):
        table = app_names(f"node_{target}")
        result = run(["node", node_client, dsn, table], timeout=60)
        assert result.returncode == 0, describe(result)
        outputs[target] = json.loads(result.stdout)
        assert pg_primary.psql(
            f"SELECT string_agg(id || ':' || score, ',' ORDER BY id) FROM {table}",
            dbname=pg.APP_DATABASE) == "1:15,2:25,3:35,4:40,5:50,6:60,7:70,8:80"
    assert outputs["proxy"] == outputs["direct"]
    out = outputs["proxy"]
    assert (out["user"], out["two"]) == ("app", 2)
    assert out["named"] == [{"id": i, "name": f"name-{i}", "score": i * 10} for i in range(1, 11)]
    assert (out["updated"], out["deleted"], out["duplicate"]) == (3, 2, UNIQUE_VIOLATION)
    assert out["rows"][0] == [1, "name-1", 15] and len(out["rows"]) == 8
    assert out["multi"] == [{"a": 1}, {"b": 2}]


@pytest.fixture(scope="session")
def java_client(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(classes dir, pgjdbc jar) with Compat.java compiled."""
    reason = java_missing()
    if reason is not None:
        pytest.skip(f"pgjdbc: {reason}")
    jar = find_pgjdbc_jar()
    assert jar is not None
    classes = tmp_path_factory.mktemp("java-classes")
    result = run(["javac", "-d", classes, "-cp", jar, JAVA_DIR / "Compat.java",
                  JAVA_DIR / "Pid.java"], env=client_env(), timeout=120)
    assert result.returncode == 0, describe(result)
    return classes, jar


def test_pgjdbc(
    java_client: tuple[Path, Path], proxy: ProxyThread, pg_primary: PgCluster, app_names: Names
) -> None:
    classes, jar = java_client
    user = pg.APP_USER
    outputs: dict[str, dict[str, str]] = {}
    for target, host, port in (("direct", pg_primary.host, pg_primary.port),
                               ("proxy", proxy.host, proxy.port)):
        table = app_names(f"jdbc_{target}")
        # sslmode=prefer (the default): the driver asks for TLS first and gets 'N'.
        url = f"jdbc:postgresql://{host}:{port}/{pg.APP_DATABASE}?sslmode=prefer"
        result = run(["java", "-cp", f"{classes}:{jar}", "Compat", url, user.name,
                      user.password, table], timeout=120)
        assert result.returncode == 0, describe(result)
        lines = result.stdout.splitlines()
        outputs[target] = dict(line.split("=", 1) for line in lines)
    assert outputs["proxy"] == outputs["direct"]
    assert outputs["proxy"] == {
        "user": "app",
        "answer": "42",
        "batch": "10",
        "prepared": ",".join(f"name-{i}:{i * 20}" for i in range(1, 11)),
        "updated": "5",
        "deleted": "5",
        "duplicate": UNIQUE_VIOLATION,
        "count": "15",
        "sum": "1205",
        "done": "ok",
    }



# --------------------------------------------------------------------------------------------
# The backend PID a driver reports (see also tests/integration/test_transparency.py)
# --------------------------------------------------------------------------------------------


def test_node_postgres_backend_pid(
    node_client: Path, proxy: ProxyThread, pg_primary: PgCluster
) -> None:
    user = pg.APP_USER
    outputs: dict[str, dict[str, Any]] = {}
    for target, dsn in (("direct", pg_primary.dsn(user.name, user.password, pg.APP_DATABASE)),
                        ("proxy", proxy.dsn(user.name, user.password, pg.APP_DATABASE))):
        result = run(["node", node_client.parent / "pid.js", dsn, unique_name("chan")],
                     timeout=60)
        assert result.returncode == 0, describe(result)
        outputs[target] = json.loads(result.stdout)
    assert outputs["proxy"] == outputs["direct"]
    assert outputs["proxy"] == {"pid_matches": True, "notify_pid_matches": True,
                                "terminated": True, "victim_error": ADMIN_SHUTDOWN,
                                "other_alive": True}


def test_pgjdbc_backend_pid(
    java_client: tuple[Path, Path], proxy: ProxyThread, pg_primary: PgCluster
) -> None:
    classes, jar = java_client
    user = pg.APP_USER
    outputs: dict[str, dict[str, str]] = {}
    for target, host, port in (("direct", pg_primary.host, pg_primary.port),
                               ("proxy", proxy.host, proxy.port)):
        url = f"jdbc:postgresql://{host}:{port}/{pg.APP_DATABASE}?sslmode=disable"
        result = run(["java", "-cp", f"{classes}:{jar}", "Pid", url, user.name,
                      user.password, unique_name("chan")], timeout=120)
        assert result.returncode == 0, describe(result)
        outputs[target] = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert outputs["proxy"] == outputs["direct"]
    assert outputs["proxy"]["pid_matches"] == "true"
    assert outputs["proxy"]["notify_pid_matches"] == "true"
    assert outputs["proxy"]["terminated"] == "true"
    assert outputs["proxy"]["victim_error"] in (ADMIN_SHUTDOWN, "08006")
    assert outputs["proxy"]["other_alive"] == "true"
