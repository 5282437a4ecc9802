"""Load: 1,000 concurrent clients held through a real ``sqlproxy serve`` process with a light
query mix (no errors, no leaks, RSS per idle session printed), and 10,000 distinct statement
shapes streamed through (statistics and caches stay within their configured bounds).

Sized for a 2-core machine: connections are held for a few seconds, not minutes."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg

from sqlproxy.proxy.server import ensure_fd_limit
from tests.support import pg
from tests.support.proxy import ProxyThread

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = 1000
HOLD_SECONDS = 4.0


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_thousand_clients(tmp_path: Path, pg_primary: pg.PgCluster) -> None:
    ensure_fd_limit(4 * CLIENTS + 256)  # client sockets here + the proxy's two per session
    port = pg.free_port()
    cfg = tmp_path / "load.toml"
    cfg.write_text(f"""
[proxy]
listen = "127.0.0.1:{port}"
primary = "{pg_primary.dsn()}"
max_client_connections = {CLIENTS + 50}
[admin]
enabled = false
[state]
enabled = false
[log]
format = "json"
level = "warning"
""")
    log = tmp_path / "proxy.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sqlproxy", "serve", "--config", str(cfg)], cwd=tmp_path,
            stdout=out, stderr=subprocess.STDOUT,
            env={**{k: v for k, v in os.environ.items() if not k.startswith("SQLPROXY_")},
                 "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline
                time.sleep(0.1)
        asyncio.run(_load(port, proc.pid, pg_primary))
        assert proc.poll() is None, "the proxy died under load"
        errors = [line for line in log.read_text().splitlines() if '"level": "error"' in line]
        assert not errors, errors[:5]
    finally:
        proc.terminate()
        proc.wait(30)


async def _load(port: int, pid: int, primary: pg.PgCluster) -> None:
    dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    settings = {"application_name": "load"}
    warm = await asyncpg.connect(dsn, server_settings=settings)
    await warm.fetchval("select 1")
    rss_before = _rss_kib(pid)
    t0 = time.monotonic()
    conns: list[asyncpg.Connection] = [warm]
    sem = asyncio.Semaphore(50)

    async def connect() -> asyncpg.Connection:
        async with sem:
            return await asyncpg.connect(dsn, server_settings=settings, timeout=60)

    conns += await asyncio.gather(*(connect() for _ in range(CLIENTS - 1)))
    connect_s = time.monotonic() - t0
    rss_idle = _rss_kib(pid)
    per_session = (rss_idle - rss_before) * 1024 / (CLIENTS - 1)
    servers = int(await asyncio.to_thread(
        primary.psql, "select count(*) from pg_stat_activity where application_name = 'load'"))
    assert servers == CLIENTS

    done = 0
    stop = time.monotonic() + HOLD_SECONDS

    async def work(i: int, conn: asyncpg.Connection) -> None:
        nonlocal done
        n = 0
        while time.monotonic() < stop:
            if n % 3 == 0:
                assert await conn.fetchval("select $1::int + 1", i) == i + 1
            elif n % 3 == 1:
                assert await conn.fetchval("select 1") == 1
            else:
                async with conn.transaction():
                    await conn.execute("select pg_advisory_xact_lock_shared(1)")
                    assert await conn.fetchval("select $1::text", str(i)) == str(i)
            n += 1
            done += 1
            await asyncio.sleep(0.05)

    await asyncio.gather(*(work(i, c) for i, c in enumerate(conns)))
    rss_busy = _rss_kib(pid)
    await asyncio.gather(*(c.close() for c in conns))
    deadline = time.monotonic() + 30
    while True:
        left = int(await asyncio.to_thread(
            primary.psql,
            "select count(*) from pg_stat_activity where application_name = 'load'"))
        if left == 0:
            break
        assert time.monotonic() < deadline, f"{left} server sessions leaked"
        await asyncio.sleep(0.2)
    print(f"\nload: {CLIENTS} clients connected in {connect_s:.1f} s, held "
          f"{HOLD_SECONDS:g} s, {done} statements/transactions, 0 errors; proxy RSS "
          f"{rss_before // 1024} MiB -> {rss_idle // 1024} MiB idle "
          f"({per_session / 1024:.1f} KiB per idle session) -> {rss_busy // 1024} MiB busy -> "
          f"{_rss_kib(pid) // 1024} MiB after close")


def test_ten_thousand_shapes_stay_bounded(make_proxy: Callable[..., ProxyThread]) -> None:
    max_fp = 1000
    proxy = make_proxy(analysis={"max_fingerprints": max_fp, "max_findings": 100,
                                 "slow_log_size": 50})

    async def main() -> None:
        conn = await asyncpg.connect(proxy.dsn())
        for i in range(10_000):
            await conn.execute(f"select {i} as c{i}")
        await conn.close()

    asyncio.run(main())
    rt = proxy.runtime
    assert rt is not None and rt.profiler is not None
    prof = rt.profiler

    def sizes() -> dict[str, int]:
        cache = prof.cache
        return {"statistics": len(prof.stats.entries), "evictions": prof.stats.evictions,
                "raw_cache": len(cache._raw), "raw_cache_max": cache.max_raw,
                "shape_cache": len(cache._shapes), "shape_cache_max": cache.max_shapes,
                "slow_log": len(prof.slow.entries), "findings": len(prof.detector.findings),
                "executions": prof.executions}

    s = proxy.call(sizes)
    print(f"\nshapes: {s}")
    assert s["executions"] >= 10_000
    assert s["statistics"] <= max_fp
    assert s["evictions"] >= 10_000 - max_fp
    assert s["raw_cache"] <= s["raw_cache_max"]
    assert s["shape_cache"] <= s["shape_cache_max"]
    assert s["slow_log"] <= 50
    assert s["findings"] <= 100
