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


def eventually(proxy: ProxyThread, ok: Callable[[dict[str, Any]], bool],
               timeout: float = 10.0) -> dict[str, Any]:
    """The (only) pool's description once ``ok`` holds for it (the proxy hears of a client's
    departure a moment after the client has gone)."""
    deadline = time.monotonic() + timeout
    while True:
        (pool,) = pools_of(proxy)
        if ok(pool) or time.monotonic() > deadline:
            return pool
        time.sleep(0.02)


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
        out = _pgbench(p, bench_db, "-n", "-c", "500", "-j", "4", "-t", "10", "-M", mode)
    assert "number of transactions actually processed: 5000/5000" in out, out
    assert peak.peak <= 10, f"{peak.peak} server connections seen"
    for sql in MISMATCHES:
        assert pg_primary.psql(sql, dbname=bench_db) == "", sql
    count = pg_primary.psql("SELECT count(*) FROM pgbench_history", dbname=bench_db)
    assert int(count) == 5000
    (pool,) = pools_of(p)
    assert pool["servers"] <= 10


KILLED_CLIENT = """
import sys, time, psycopg
conn = psycopg.connect(sys.argv[1])
conn.execute("INSERT INTO killed VALUES (1)")
print("inserted", flush=True)
if sys.argv[2] == "busy":
    conn.execute("SELECT pg_sleep(60)")
time.sleep(60)
"""


@pytest.mark.parametrize("state", ["idle", "busy"])
def test_client_killed_mid_transaction_leaves_nothing_behind(
    make_proxy: Callable[..., ProxyThread], pg_primary: PgCluster, bench_db: str, state: str,
) -> None:
    import sys

    pg_primary.psql("CREATE TABLE killed (id int)", dbname=bench_db)
    p = pooled(make_proxy, size=1)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, p.dsn(dbname=bench_db), state],
                            stdout=subprocess.PIPE, text=True, env=client_env())
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "inserted"
        time.sleep(0.2 if state == "busy" else 0)
    finally:
        proc.kill()
        proc.wait(10)
    # The next client gets the pool's only slot: a fresh server, none of the killed writes.
    with psycopg.connect(p.dsn(dbname=bench_db), autocommit=True) as c:
        assert c.execute("SELECT count(*) FROM killed").fetchone() == (0,)
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = pg_primary.psql("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                               f"'{bench_db}' AND state LIKE '%in transaction%' "
                               "OR (datname = '{bench_db}' AND query LIKE '%pg_sleep(60)%' "
                               "AND state = 'active')")
        if left == "0":
            break
        time.sleep(0.05)
    assert left == "0"
    if state == "idle":  # rolled back, and the same server connection reused
        pool = eventually(p, lambda pool: pool["rolled_back"] == 1)
        assert pool["rolled_back"] == 1 and pool["servers_closed"] == {}
    else:  # a statement running: cancelled and the connection closed
        pool = eventually(p, lambda pool: "client_gone_in_transaction" in pool["servers_closed"])
        assert pool["servers_closed"].get("client_gone_in_transaction") == 1


def test_max_wait_gives_53300_and_the_session_stays_usable(
    make_proxy: Callable[..., ProxyThread], bench_db: str,
) -> None:
    p = pooled(make_proxy, size=1, max_wait_ms=200)
    with psycopg.connect(p.dsn(dbname=bench_db)) as holder, \
            psycopg.connect(p.dsn(dbname=bench_db), autocommit=True) as waiter:
        holder.execute("SELECT 1")  # opens a transaction: holds the only server
        with pytest.raises(psycopg.errors.TooManyConnections) as err:
            waiter.execute("SELECT 2")
        assert "pool.size is 1" in str(err.value)
        holder.commit()
        assert waiter.execute("SELECT 3").fetchone() == (3,)  # a retry works
    (pool,) = pools_of(p)
    assert pool["wait_timeouts"] == 1


def test_cancel_reaches_the_query_of_the_client_that_asked(
    make_proxy: Callable[..., ProxyThread], bench_db: str,
) -> None:
    p = pooled(make_proxy, size=2)
    with psycopg.connect(p.dsn(dbname=bench_db), autocommit=True) as a, \
            psycopg.connect(p.dsn(dbname=bench_db), autocommit=True) as b:
        results: dict[str, Any] = {}

        def run(name: str, conn: psycopg.Connection[Any], sql: str) -> None:
            try:
                conn.execute(sql)
                results[name] = "done"
            except psycopg.Error as exc:
                results[name] = exc.sqlstate

        tb = threading.Thread(target=run, args=("b", b, "SELECT pg_sleep(1.5)"))
        ta = threading.Thread(target=run, args=("a", a, "SELECT pg_sleep(30)"))
        tb.start()
        ta.start()
        time.sleep(0.5)
        a.cancel_safe()  # (cancel() holds the GIL: the proxy thread would stall)
        ta.join(10)
        tb.join(10)
        assert results == {"a": "57014", "b": "done"}
        assert a.execute("SELECT 1").fetchone() == (1,)  # usable after the cancel


PINS = {
    "LISTEN pool_channel": "listen",
    "SET work_mem = '8MB'": "set outside a transaction",
    "CREATE TEMP TABLE pool_tmp (id int)": "temporary table",
    "SELECT pg_advisory_lock(42)": "function pg_advisory_lock",
    "PREPARE pool_p AS SELECT 1": "sql prepare",
}


@pytest.mark.parametrize("sql", list(PINS))
def test_session_state_pins_the_client_and_is_reported(
    make_proxy: Callable[..., ProxyThread], bench_db: str, sql: str,
) -> None:
    p = pooled(make_proxy, size=2)
    with psycopg.connect(p.dsn(dbname=bench_db), autocommit=True) as c:
        c.execute(sql)
        pid = c.execute("SELECT pg_backend_pid()").fetchone()
        (pool,) = pools_of(p)
        (pinned,) = pool["pinned_clients"]
        assert pinned["reason"] == PINS[sql] and pinned["statement"] == sql
        # Pinned: the same server connection for the rest of the session.
        with psycopg.connect(p.dsn(dbname=bench_db), autocommit=True) as other:
            other.execute("SELECT 1")
        for _ in range(3):
            assert c.execute("SELECT pg_backend_pid()").fetchone() == pid
    pool = eventually(p, lambda pool: not pool["pinned_clients"])
    assert pool["servers_closed"].get("pinned_client_left") == 1


def test_set_local_does_not_pin_but_set_in_a_transaction_does(
    make_proxy: Callable[..., ProxyThread], bench_db: str,
) -> None:
    p = pooled(make_proxy, size=2)
    with psycopg.connect(p.dsn(dbname=bench_db)) as c:
        c.execute("SET LOCAL work_mem = '8MB'")
        c.execute("SELECT 1")
        c.commit()
        (pool,) = pools_of(p)
        assert pool["pinned_clients"] == []
        c.execute("SET statement_timeout = '5s'")  # outlives the COMMIT
        c.commit()
        (pool,) = pools_of(p)
        assert [x["reason"] for x in pool["pinned_clients"]] == [
            "set in a transaction (kept after commit)"]


def _admin(p: ProxyThread, path: str) -> Any:
    import httpx

    assert p.runtime is not None
    r = httpx.get(f"http://127.0.0.1:{p.runtime.admin_port}{path}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json() if path.startswith("/api") else r.text


def test_api_pools_metrics_and_advice(
    make_proxy: Callable[..., ProxyThread], bench_db: str,
) -> None:
    p = pooled(make_proxy, size=3)
    conns = [psycopg.connect(p.dsn(dbname=bench_db), autocommit=True,
                             application_name="web") for _ in range(8)]
    try:
        for c in conns:
            c.execute("SELECT 1")
        conns[0].execute("LISTEN pool_api")
        body = _admin(p, "/api/pools")
        (pool,) = body["items"]
        assert (pool["database"], pool["user"], pool["size"]) == (bench_db, "postgres", 3)
        assert pool["clients"] == 8 and pool["checkouts"] >= 8
        assert [x["reason"] for x in pool["pinned_clients"]] == ["listen"]
        kinds = [f["kind"] for f in pool["findings"]]
        assert "session_state_in_pool" in kinds
        assert any(a.startswith("application web: at most") for a in pool["advice"]), pool
        metrics = _admin(p, "/metrics")
        assert (f'sqlproxy_pool_size{{backend="primary",database="{bench_db}",user="postgres"}} '
                "3.0") in metrics
        assert "sqlproxy_pool_checkouts_total" in metrics
        assert "sqlproxy_pool_pinned_clients" in metrics
    finally:
        for c in conns:
            c.close()


def _workload(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True, application_name="same") as c:
        c.execute("CREATE TABLE IF NOT EXISTS items (id int PRIMARY KEY, owner int)")
        c.execute("TRUNCATE items")
        c.execute("INSERT INTO items SELECT g, g % 7 FROM generate_series(1, 40) g")
        owners = c.execute("SELECT DISTINCT owner FROM items ORDER BY owner").fetchall()
        for (owner,) in owners:  # an N+1 burst
            c.execute("SELECT id FROM items WHERE owner = %s", (owner,)).fetchall()
        with c.transaction():
            for i in range(1, 6):
                c.execute("UPDATE items SET owner = owner WHERE id = %s", (i,))
        c.execute("SELECT pg_sleep(0.12)")  # a slow query (analysis.slow_query_ms = 100)


def test_analysis_is_the_same_in_session_and_transaction_mode(
    make_proxy: Callable[..., ProxyThread], bench_db: str,
) -> None:
    seen = {}
    for mode in ("session", "transaction"):
        p = make_proxy(pool={"mode": mode, "size": 2})
        _workload(p.dsn(dbname=bench_db))
        time.sleep(0.3)  # the burst detector closes the burst after analysis.burst_gap_ms
        queries = _admin(p, "/api/queries?limit=1000")["items"]
        slow = _admin(p, "/api/slow")["items"]
        findings = _admin(p, "/api/findings")["items"]
        seen[mode] = (
            sorted((q["query"], q["calls"], q["rows"]) for q in queries),
            sorted(s["query"] for s in slow),
            sorted((f["kind"], f["query"]) for f in findings),
        )
    assert seen["session"] == seen["transaction"]
    assert any(kind == "n_plus_one" for kind, _ in seen["transaction"][2])
