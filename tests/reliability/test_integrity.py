"""Data integrity with routing on: a concurrent pgbench TPC-B-like run through the proxy, with a
streaming replica taking the reads, ends with every balance matching the history.

pgbench's TPC-B-like transaction updates an account, a teller and a branch by the same delta and
inserts that delta into ``pgbench_history``; all balances start at 0. So, whatever the
interleaving, each account's, teller's and branch's balance equals the sum of its history rows,
and the history has exactly one row per transaction pgbench counted. A transaction lost, applied
twice, half-applied, or a write sent to the replica (which would fail: it is read-only) breaks
one of these. A select-only pgbench runs alongside, so that reads are really routed to the
replica while the writes go on.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Iterator

import pytest

from tests.routing.test_routing import router_of, wait_for, wait_ready
from tests.support import pg
from tests.support.clients import client_env, describe, run, unique_name
from tests.support.pg import PgCluster
from tests.support.proxy import ProxyThread

CLIENTS = "8"
THREADS = "2"
SECONDS = "10"
REPLICA_READS = "SELECT abalance FROM pgbench_accounts"


@pytest.fixture
def routed(make_proxy: Callable[..., ProxyThread], pg_replica: PgCluster) -> ProxyThread:
    pg_replica.set_apply_delay(0)
    return make_proxy(routing={"enabled": True, "health_interval_ms": 50},
                      replicas=[{"url": pg_replica.dsn(), "name": "r1"}])


@pytest.fixture
def bench_db(pg_primary: PgCluster, pg_replica: PgCluster) -> Iterator[str]:
    name = unique_name("tpcb")
    pg_primary.psql(f"CREATE DATABASE {name}")
    yield name
    pg_primary.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _pgbench_cmd(proxy: ProxyThread, db: str, *args: str) -> list[str]:
    return [str(pg.find_pg_bindir() / "pgbench"), *args, "-h", proxy.host,
            "-p", str(proxy.port), "-U", pg.SUPERUSER, db]


def _check(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, describe(result)
    out = result.stdout + result.stderr
    assert "aborted" not in out and "error" not in result.stderr.lower(), describe(result)
    failed = re.search(r"number of failed transactions: (\d+)", result.stdout)
    assert failed is None or failed.group(1) == "0", describe(result)
    return result.stdout


def _pgbench_concurrently(*cmds: list[str]) -> list[str]:
    """Run pgbench commands at the same time; each must end without a client error."""
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=client_env()) for cmd in cmds]
    results = []
    for cmd, proc in zip(cmds, procs, strict=True):
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return [_check(r) for r in results]


def _replica_calls(replica: PgCluster, db: str) -> int:
    out = replica.psql(
        "SELECT coalesce(sum(s.calls), 0) FROM pg_stat_statements s "
        f"JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = '{db}' "
        f"AND s.query LIKE '{REPLICA_READS}%'")
    return int(out or 0)


# Every balance against its history, and the totals; each query returns 0 rows when consistent.
MISMATCHES = {
    "accounts": "SELECT a.aid FROM pgbench_accounts a LEFT JOIN (SELECT aid, sum(delta) d "
                "FROM pgbench_history GROUP BY aid) h USING (aid) "
                "WHERE a.abalance <> coalesce(h.d, 0)",
    "tellers": "SELECT t.tid FROM pgbench_tellers t LEFT JOIN (SELECT tid, sum(delta) d "
               "FROM pgbench_history GROUP BY tid) h USING (tid) "
               "WHERE t.tbalance <> coalesce(h.d, 0)",
    "branches": "SELECT b.bid FROM pgbench_branches b LEFT JOIN (SELECT bid, sum(delta) d "
                "FROM pgbench_history GROUP BY bid) h USING (bid) "
                "WHERE b.bbalance <> coalesce(h.d, 0)",
}
TOTALS = ("SELECT (SELECT sum(abalance) FROM pgbench_accounts), "
          "(SELECT sum(tbalance) FROM pgbench_tellers), "
          "(SELECT sum(bbalance) FROM pgbench_branches), "
          "(SELECT coalesce(sum(delta), 0) FROM pgbench_history), "
          "(SELECT count(*) FROM pgbench_history)")


@pytest.mark.parametrize("mode", ["extended", "prepared"])
def test_tpcb_through_routing_keeps_balances(
    routed: ProxyThread, bench_db: str, pg_primary: PgCluster, pg_replica: PgCluster, mode: str
) -> None:
    # The schema and data go in through the proxy too (DDL, COPY, VACUUM on the primary).
    _pgbench_concurrently(_pgbench_cmd(routed, bench_db, "-i", "-s", "1", "-q"))
    wait_ready(routed, bench_db)
    pg_replica.wait_for_replay()
    router = router_of(routed)
    routed_before = routed.call(lambda: router.replicas[0].routed)
    replica_before = _replica_calls(pg_replica, bench_db)

    # The TPC-B-like writers, and alongside them read-only clients: a writing session's own
    # reads stay on the primary (read-your-writes), the readers' go to the replica.
    out, reads = _pgbench_concurrently(
        _pgbench_cmd(routed, bench_db, "-n", "-M", mode, "-c", CLIENTS, "-j", THREADS,
                     "-T", SECONDS),
        _pgbench_cmd(routed, bench_db, "-n", "-S", "-M", mode, "-c", "2", "-j", "1",
                     "-T", SECONDS))
    processed = re.search(r"number of transactions actually processed: (\d+)", out)
    assert processed is not None, out
    committed = int(processed.group(1))
    assert committed > 0, out
    # On the primary itself: every balance equals its history, one history row per transaction.
    for table, sql in MISMATCHES.items():
        assert pg_primary.psql(sql, dbname=bench_db) == "", f"{table} do not match the history"
    accounts, tellers, branches, deltas, rows = pg_primary.psql(
        TOTALS, dbname=bench_db).split("|")
    assert accounts == tellers == branches == deltas, (accounts, tellers, branches, deltas)
    assert int(rows) == committed, f"history has {rows} rows, pgbench committed {committed}"
    # Reads really went to the replica meanwhile.
    assert routed.call(lambda: router.replicas[0].routed) > routed_before
    assert _replica_calls(pg_replica, bench_db) > replica_before
    # The replica converges to the same state, and a read through the proxy sees it.
    pg_replica.wait_for_replay()
    assert pg_replica.psql(TOTALS, dbname=bench_db) == f"{accounts}|{tellers}|{branches}|" \
        f"{deltas}|{rows}"
    res = run([pg.find_pg_bindir() / "psql", "-X", "-At", "-h", routed.host,
               "-p", str(routed.port), "-U", pg.SUPERUSER, "-d", bench_db, "-c", TOTALS])
    assert res.returncode == 0, describe(res)
    assert res.stdout.strip() == f"{accounts}|{tellers}|{branches}|{deltas}|{rows}"
    # Nothing left behind: every proxy session closed once its client left.
    wait_for(lambda: routed.call(lambda: len(routed.runtime.proxy.sessions)) == 0,  # type: ignore[union-attr]
             what="the proxy's sessions to close")
    print(f"\n[integrity] -M {mode}: {committed} TPC-B transactions, {rows} history rows, "
          f"sum(delta) = {deltas}; replica reads "
          f"{_replica_calls(pg_replica, bench_db) - replica_before}\n{out}\n{reads}")
