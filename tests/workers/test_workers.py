"""``[proxy] workers = 2`` against a real server: clients of every kind, cancel requests that
land on either worker, a killed worker, machine-wide limits, signals, merged statistics."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from sqlproxy.analysis.normalize import normalize
from tests.integration.test_profiling import agreement_workload, check_agreement
from tests.support import pg
from tests.workers.conftest import Served

PSQL = shutil.which("psql")
PGBENCH = shutil.which("pgbench")


@pytest.fixture
def db(pg_primary: pg.PgCluster) -> Iterator[str]:
    name = f"wk_{uuid.uuid4().hex[:10]}"
    pg_primary.psql(f"create database {name}")
    pg_primary.psql("create extension if not exists pg_stat_statements", dbname=name)
    yield name
    pg_primary.psql(f"drop database {name} with (force)")


def _psql(served: Served, db: str, *commands: str) -> str:
    assert PSQL is not None
    args = [PSQL, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", served.dsn(db)]
    for c in commands:
        args += ["-c", c]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _workers_of_sessions(served: Served) -> set[int]:
    return {int(e["worker"]) for e in served.events("client_connected")}


@pytest.mark.skipif(PSQL is None, reason="psql not on PATH")
def test_psql_asyncpg_psycopg_on_two_workers(serve_workers: Callable[..., Served],
                                            db: str) -> None:
    served = serve_workers(2)
    assert len(served.worker_pids()) == 2
    for i in range(6):
        assert _psql(served, db, f"select {i} + 1").strip() == str(i + 1)

    async def with_asyncpg() -> None:
        conns = [await asyncpg.connect(served.dsn(db)) for _ in range(12)]
        for i, c in enumerate(conns):
            assert await c.fetchval("select $1::int * 2", i) == 2 * i
        for c in conns:
            await c.close()

    asyncio.run(with_asyncpg())
    for i in range(12):
        with psycopg.connect(served.dsn(db), autocommit=True) as conn:
            assert conn.execute("select %s::int", (i,)).fetchone() == (i,)
    # The kernel spread 30 connections over both workers (the chance it did not: 2^-29).
    assert _workers_of_sessions(served) == {0, 1}
    assert served.stop() == 0


def test_cancel_reaches_the_right_query_whatever_worker(serve_workers: Callable[..., Served],
                                                        pg_primary: pg.PgCluster,
                                                        db: str) -> None:
    """20 sessions each run pg_sleep; a cancel sent for each cancels exactly that one, whether
    the kernel gives the cancel connection to the session's worker or the other."""
    served = serve_workers(2)
    tag = uuid.uuid4().hex[:8]
    conns = [psycopg.connect(served.dsn(db), autocommit=True) for _ in range(20)]
    outcome: dict[int, str] = {}

    def sleep(i: int) -> None:
        try:
            conns[i].execute(f"select pg_sleep(60) /* {tag} {i} */")
            outcome[i] = "finished"
        except psycopg.errors.QueryCanceled:
            outcome[i] = "canceled"
        except psycopg.Error as exc:
            outcome[i] = f"error: {exc}"

    threads = [threading.Thread(target=sleep, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()

    def running() -> set[int]:
        out = pg_primary.psql(f"select query from pg_stat_activity where query like "
                              f"'select pg_sleep(60) /* {tag} %' and state = 'active'")
        return {int(line.split()[-2]) for line in out.splitlines() if line.strip()}

    try:
        deadline = time.monotonic() + 30
        while running() != set(range(20)):
            assert time.monotonic() < deadline, running()
            time.sleep(0.1)
        for i in range(20):
            conns[i].cancel()
            threads[i].join(30)
            assert outcome.get(i) == "canceled", outcome
            assert running() == set(range(i + 1, 20))
    finally:
        for c in conns:
            c.cancel()
        for t in threads:
            t.join(30)
        for c in conns:
            c.close()
    # Some of the 20 landed on the other worker (the chance none did: about 2^-20).
    assert served.events("cancel_request_foreign")
    assert served.stop() == 0


def test_killed_worker_is_restarted_others_unaffected(serve_workers: Callable[..., Served],
                                                      db: str) -> None:
    served = serve_workers(2)
    pids = served.worker_pids()

    async def main() -> None:
        conns = [await asyncpg.connect(served.dsn(db)) for _ in range(16)]
        owner = {}
        for c in conns:
            await c.fetchval("select 1")
        for e in served.events("client_connected"):
            owner[int(e["session"]), int(e["worker"])] = True
        workers = {int(e["worker"]) for e in served.events("client_connected")}
        assert workers == {0, 1}
        os.kill(pids[0], signal.SIGKILL)
        ev = await asyncio.to_thread(served.wait_events, "worker_exited")
        assert ev[0]["worker"] == 0 and "SIGKILL" in str(ev[0]["status"])
        # Sessions on worker 1 go on; those on worker 0 are gone with it.
        alive = broken = 0
        for c in conns:
            try:
                assert await c.fetchval("select 41 + 1") == 42
                alive += 1
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError):
                broken += 1
        assert alive > 0 and broken > 0
        for c in conns:
            c.terminate()
        # A new worker 0, and new connections are served.
        await asyncio.to_thread(served.wait_events, "worker_started", 3)
        assert served.worker_pids()[0] != pids[0]
        assert served.worker_pids()[1] == pids[1]
        deadline = time.monotonic() + 30
        while True:  # until the new worker listens (its socket joins the port's group)
            started = [e for e in served.events("started") if e.get("worker") == 0]
            if len(started) >= 2:
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        for _ in range(10):
            c = await asyncpg.connect(served.dsn(db))
            assert await c.fetchval("select 7") == 7
            await c.close()
        # The admin API lists both workers, the restarted one with how its last process ended.
        workers = {w["worker"]: w for w in served.api("/api/workers")["items"]}
        assert sorted(workers) == [0, 1]
        assert workers[0]["restarts"] == 1 and workers[0]["last_exit"] == "signal SIGKILL"
        assert workers[0]["pid"] == served.worker_pids()[0] and workers[0]["alive"]
        assert workers[1]["restarts"] == 0 and workers[1]["last_exit"] is None
        metrics = served.api("/metrics")
        assert 'sqlproxy_worker_restarts_total{worker="0"} 1.0' in metrics
        assert 'sqlproxy_worker_up{worker="1"} 1.0' in metrics

    asyncio.run(main())
    assert served.stop() == 0


def test_max_client_connections_across_workers(serve_workers: Callable[..., Served],
                                               db: str) -> None:
    served = serve_workers(2, extra="max_client_connections = 6\nmax_connections_per_user = 0")

    async def main() -> None:
        conns = [await asyncpg.connect(served.dsn(db)) for _ in range(6)]
        assert {int(e["worker"]) for e in served.events("client_connected")} == {0, 1}
        for _ in range(4):  # whichever worker gets it
            with pytest.raises(asyncpg.TooManyConnectionsError) as info:
                await asyncpg.connect(served.dsn(db))
            assert "for all workers" in str(info.value.detail)
        await conns[0].close()
        await asyncio.sleep(0.2)
        conns[0] = await asyncpg.connect(served.dsn(db))  # a freed place is free machine-wide
        for c in conns:
            await c.close()

    asyncio.run(main())
    assert served.stop() == 0


def test_per_database_limit_across_workers(serve_workers: Callable[..., Served],
                                          db: str) -> None:
    served = serve_workers(2, extra="max_connections_per_database = 4")

    async def main() -> None:
        conns = [await asyncpg.connect(served.dsn(db)) for _ in range(4)]
        own = {w: sum(1 for e in served.events("client_connected")
                      if e["worker"] == w and e["database"] == db) for w in (0, 1)}
        for _ in range(30):  # until a worker with fewer than 4 of its own refuses
            with pytest.raises(asyncpg.TooManyConnectionsError) as info:
                await asyncpg.connect(served.dsn(db))
            assert f'too many connections for database "{db}"' in str(info.value)
            refused = {e["worker"] for e in served.events("connection_rejected")}
            if any(own[w] < 4 for w in refused):
                break
        else:
            raise AssertionError(f"no worker with fewer than 4 sessions refused: {own}")
        other = [await asyncpg.connect(served.dsn("postgres")) for _ in range(4)]
        for c in conns + other:
            await c.close()

    asyncio.run(main())
    assert served.stop() == 0


def test_sighup_reloads_all_sigterm_drains_all(serve_workers: Callable[..., Served],
                                               db: str) -> None:
    served = serve_workers(2)

    async def main() -> None:
        conns = [await asyncpg.connect(served.dsn(db)) for _ in range(8)]
        for _ in range(40):  # until each worker has sessions to drain (the kernel deals them)
            if {e["worker"] for e in served.events("client_connected")
                    if e["database"] == db} == {0, 1}:
                break
            conns.append(await asyncpg.connect(served.dsn(db)))
        served.popen.send_signal(signal.SIGHUP)
        reloaded = await asyncio.to_thread(served.wait_events, "config_reloaded", 2)
        assert {e["worker"] for e in reloaded} == {0, 1}
        for c in conns:
            assert await c.fetchval("select 3") == 3  # nothing dropped
        served.popen.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(served.popen.wait, 60) == 0
        for c in conns:
            with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
                await c.fetchval("select 1")

    asyncio.run(main())
    drained = served.events("sessions_drained")
    assert {e["worker"] for e in drained} == {0, 1}


@pytest.mark.skipif(PGBENCH is None or PSQL is None, reason="pgbench or psql not on PATH")
def test_merged_queries_agree_with_pg_stat_statements(serve_workers: Callable[..., Served],
                                                      pg_primary: pg.PgCluster,
                                                      db: str) -> None:
    """The agreement test of tests/integration/test_profiling.py through 2 workers, plus 200
    concurrent pgbench clients: the merged /api/queries calls and rows per fingerprint equal
    the server's pg_stat_statements."""
    assert PGBENCH is not None
    init = subprocess.run([PGBENCH, "-i", "-s", "1", "-q", "-h", pg_primary.host, "-p",
                           str(pg_primary.port), "-U", pg.SUPERUSER, db],
                          capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    served = serve_workers(2, extra="max_client_connections = 400")
    pg_primary.psql("select pg_stat_statements_reset()", dbname=db)
    agreement_workload(served.dsn(db))
    run = subprocess.run([PGBENCH, "-n", "-S", "-M", "extended", "-c", "200", "-j", "4",
                          "-t", "20", "-h", "127.0.0.1", "-p", str(served.port),
                          "-U", pg.SUPERUSER, db], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "number of transactions actually processed: 4000/4000" in run.stdout
    assert _workers_of_sessions(served) == {0, 1}
    items = served.api(f"/api/queries?database={db}&limit=1000")["items"]
    ours = {i["fingerprint"]: i for i in items}
    select = normalize("SELECT abalance FROM pgbench_accounts WHERE aid = $1").fingerprint
    assert ours[select]["calls"] == 4000
    check_agreement(ours, pg_primary, db)  # pgbench's SELECT included
    assert served.stop() == 0


def _statements_total(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith('sqlproxy_statements_total{route="primary"} '):
            return float(line.split()[-1])
    raise AssertionError(metrics[:2000])


def test_merged_admin_view_survives_a_killed_worker(serve_workers: Callable[..., Served],
                                                    db: str) -> None:
    """Connections show their worker; the merged calls and the Prometheus counters do not go
    down when a worker is killed and restarted; the state file holds the merged totals."""
    served = serve_workers(2)
    key = normalize("select $1::int + 100").fingerprint

    async def main() -> None:
        conns = [await asyncpg.connect(served.dsn(db)) for _ in range(12)]
        for c in conns:
            for i in range(5):
                await c.fetchval("select $1::int + 100", i)
        items = served.api("/api/connections?limit=1000")["items"]
        assert {i["worker"] for i in items if i.get("database") == db} == {0, 1}
        queries = {i["fingerprint"]: i for i in
                   served.api(f"/api/queries?database={db}&limit=1000")["items"]}
        assert queries[key]["calls"] == 60
        before = _statements_total(served.api("/metrics"))
        assert before >= 60
        os.kill(served.worker_pids()[0], signal.SIGKILL)
        await asyncio.to_thread(served.wait_events, "worker_exited")
        await asyncio.to_thread(served.wait_events, "worker_started", 3)
        queries = {i["fingerprint"]: i for i in
                   served.api(f"/api/queries?database={db}&limit=1000")["items"]}
        assert queries[key]["calls"] == 60  # worker 0's part is carried, not lost
        assert _statements_total(served.api("/metrics")) >= before
        for c in conns:
            c.terminate()
        c = await asyncpg.connect(served.dsn(db))
        for i in range(10):
            await c.fetchval("select $1::int + 100", i)
        await c.close()
        deadline = time.monotonic() + 10  # the view is at most MIN_REFRESH (0.5 s) old
        while True:
            queries = {i["fingerprint"]: i for i in
                       served.api(f"/api/queries?database={db}&limit=1000")["items"]}
            if queries[key]["calls"] == 70 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert queries[key]["calls"] == 70

    asyncio.run(main())
    assert served.stop() == 0
    state = served.log.parent / "state.sqlite"
    with sqlite3.connect(state) as conn:
        data = json.loads(conn.execute(
            "select data from sections where name = 'statistics'").fetchone()[0])
    calls = {(e["query"], e["database"]): e["calls"] for e in data["entries"]}
    assert calls["select $1::int + $2", db] == 70


def test_reset_reaches_every_worker(serve_workers: Callable[..., Served], db: str) -> None:
    served = serve_workers(2)
    key = normalize("select $1::int + 200").fingerprint

    async def main() -> None:
        conns = [await asyncpg.connect(served.dsn(db)) for _ in range(8)]
        for c in conns:
            await c.fetchval("select $1::int + 200", 1)
        assert {int(e["worker"]) for e in served.events("client_connected")} == {0, 1}

        def calls() -> int:
            items = served.api(f"/api/queries?database={db}&limit=1000")["items"]
            return sum(i["calls"] for i in items if i["fingerprint"] == key)

        assert calls() == 8
        req = urllib.request.Request(f"http://127.0.0.1:{served.admin_port}/api/reset",
                                     data=b"{}", method="POST",
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert json.loads(resp.read())["reset"] == "all"
        await asyncio.sleep(0.6)
        assert calls() == 0
        for c in conns:
            await c.fetchval("select $1::int + 200", 2)
            await c.close()
        await asyncio.sleep(0.6)
        assert calls() == 8

    asyncio.run(main())
    assert served.stop() == 0


def test_workers_stop_when_the_supervisor_is_killed(serve_workers: Callable[..., Served]) -> None:
    served = serve_workers(2)
    pids = list(served.worker_pids().values())
    served.popen.kill()
    served.popen.wait(10)
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids):
        assert time.monotonic() < deadline, "workers outlived their supervisor"
        time.sleep(0.1)
    assert len(served.events("supervisor_gone")) == 2


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def test_findings_merged_by_id_across_workers(serve_workers: Callable[..., Served],
                                              pg_primary: pg.PgCluster, db: str) -> None:
    """The same N+1 pattern on sessions of both workers is one finding, occurrences summed."""
    pg_primary.psql("create table item (id int primary key, v int)", dbname=db)
    pg_primary.psql("insert into item select g, g from generate_series(1, 100) g", dbname=db)
    # (A burst gap of 2 s: a stall of the loaded machine between two lookups must not split a
    # connection's burst in two, each too short for an N+1.)
    served = serve_workers(2, extra="[analysis]\nburst_gap_ms = 2000")

    async def main() -> None:
        conns = [await asyncpg.connect(served.dsn(db)) for _ in range(8)]
        for c in conns:
            for i in range(6):  # one burst of 6 lookups by id: an N+1 (threshold 5)
                await c.fetchrow("select v from item where id = $1", i)
        for c in conns:
            await c.close()

    asyncio.run(main())
    assert _workers_of_sessions(served) == {0, 1}
    deadline = time.monotonic() + 20  # a burst is judged once burst_gap_ms has passed
    while True:
        items = [f for f in served.api("/api/findings?limit=100")["items"]
                 if f["kind"] == "n_plus_one" and "from item" in f["query"]]
        if (items and items[0]["occurrences"] == 8) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert len(items) == 1, items
    assert items[0]["occurrences"] == 8
    assert served.stop() == 0


def test_transaction_pools_shared_across_workers(serve_workers: Callable[..., Served],
                                                 pg_primary: pg.PgCluster, db: str) -> None:
    """pool.size holds for the machine: each worker pools its share, and /api/pools shows the
    machine's pool (its figures summed over the workers)."""
    served = serve_workers(2, extra='[pool]\nmode = "transaction"\nsize = 4\n')

    async def client(i: int) -> int:
        c = await asyncpg.connect(served.dsn(db), statement_cache_size=0)
        total = 0
        for _ in range(10):
            async with c.transaction():
                total += await c.fetchval("select $1::int + count(*) from pg_sleep(0.005)", i)
        await c.close()
        return total

    async def main() -> list[int]:
        return await asyncio.gather(*(client(i) for i in range(24)))

    assert asyncio.run(main()) == [10 * (i + 1) for i in range(24)]
    assert _workers_of_sessions(served) == {0, 1}
    servers = pg_primary.psql(
        f"select count(*) from pg_stat_activity where datname = '{db}' "
        "and backend_type = 'client backend' and pid <> pg_backend_pid()", dbname=db)
    assert int(servers.strip()) <= 4
    pools = [p for p in served.api("/api/pools")["items"] if p["database"] == db]
    assert len(pools) == 1
    pool = pools[0]
    assert pool["workers"] == 2 and pool["size"] == 4
    assert pool["servers"] <= 4 and pool["checkouts"] >= 240
    assert pool["advice"]
    assert f'sqlproxy_pool_size{{backend="primary",database="{db}",user="postgres"}} 4.0' \
        in served.api("/metrics")
    assert served.stop() == 0
