"""Signals on a real ``sqlproxy serve`` process: SIGHUP reloads without dropping connections
(an invalid file keeps the old configuration and names the key), SIGTERM drains, writes a
final snapshot and exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.support import pg

ROOT = Path(__file__).resolve().parents[2]


def _write_config(path: Path, port: int, primary: str, state: Path, slow_ms: float | str,
                  extra: str = "") -> None:
    path.write_text(f"""
[proxy]
listen = "127.0.0.1:{port}"
primary = "{primary}"
shutdown_grace_seconds = 5
[admin]
enabled = false
[analysis]
slow_query_ms = {slow_ms}
[state]
path = "{state}"
snapshot_seconds = 3600
[log]
format = "json"
{extra}
""")


class Proc:
    def __init__(self, popen: subprocess.Popen[str], log: Path, port: int) -> None:
        self.popen = popen
        self.log = log
        self.port = port

    def events(self) -> list[dict[str, object]]:
        out = []
        for line in self.log.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def wait_event(self, name: str, timeout: float = 15, nth: int = 1) -> dict[str, object]:
        """The ``nth`` event called ``name``, once logged."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = [e for e in self.events() if e.get("event") == name]
            if len(seen) >= nth:
                return seen[nth - 1]
            time.sleep(0.05)
        raise AssertionError(f"no {name} event; log:\n{self.log.read_text()[-3000:]}")


@pytest.fixture
def served(tmp_path: Path, pg_primary: pg.PgCluster) -> Iterator[tuple[Proc, Path, Path]]:
    port = pg.free_port()
    cfg = tmp_path / "sqlproxy.toml"
    state = tmp_path / "state.sqlite"
    _write_config(cfg, port, pg_primary.dsn(), state, 100)
    log = tmp_path / "sqlproxy.log"
    with log.open("w") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", "sqlproxy", "serve", "--config", str(cfg)],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, text=True,
            env={**{k: v for k, v in os.environ.items() if not k.startswith("SQLPROXY_")},
                 "PYTHONPATH": str(ROOT)},
        )
    proc = Proc(popen, log, port)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert popen.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "sqlproxy did not start"
                time.sleep(0.1)
        yield proc, cfg, state
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait(10)


def test_sighup_reload_and_sigterm_snapshot(
    served: tuple[Proc, Path, Path], pg_primary: pg.PgCluster
) -> None:
    proc, cfg, state = served
    dsn = f"postgresql://postgres@127.0.0.1:{proc.port}/postgres"

    async def main() -> None:
        conn = await asyncpg.connect(dsn)
        for i in range(10):
            await conn.fetchval("select $1::int", i)
        # A good reload: a threshold changes, the connection stays.
        _write_config(cfg, proc.port, pg_primary.dsn(), state, 1)
        proc.popen.send_signal(signal.SIGHUP)
        ev = await asyncio.to_thread(proc.wait_event, "config_reloaded")
        assert "analysis.slow_query_ms" in ev["changed"]  # type: ignore[operator]
        await conn.execute("select pg_sleep(0.01)")  # now slow (1 ms threshold)
        await asyncio.to_thread(proc.wait_event, "slow_query")
        # log.connections off (reloadable): new clients are no longer logged.
        logged = len([e for e in proc.events() if e.get("event") == "client_connected"])
        assert logged >= 1
        _write_config(cfg, proc.port, pg_primary.dsn(), state, 1, "connections = false")
        proc.popen.send_signal(signal.SIGHUP)
        ev = await asyncio.to_thread(proc.wait_event, "config_reloaded", 15, 2)
        assert "log.connections" in ev["changed"]  # type: ignore[operator]
        quiet = await asyncpg.connect(dsn)
        assert await quiet.fetchval("select 8") == 8
        await quiet.close()
        await asyncio.sleep(0.3)
        assert len([e for e in proc.events() if e.get("event") in (
            "client_connected", "client_disconnected")]) == logged
        # An invalid file: rejected as a whole, the error names the key, nothing dropped.
        _write_config(cfg, proc.port, pg_primary.dsn(), state, -5)
        proc.popen.send_signal(signal.SIGHUP)
        ev = await asyncio.to_thread(proc.wait_event, "config_reload_failed")
        assert "analysis.slow_query_ms" in str(ev["error"])
        assert await conn.fetchval("select 7") == 7
        # SIGTERM with an idle client: it is told why (57P01) and the process exits 0.
        proc.popen.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(proc.popen.wait, 20)
        assert rc == 0, proc.log.read_text()[-3000:]
        assert conn.is_closed() or await _closed(conn)

    asyncio.run(main())
    with sqlite3.connect(state) as db:
        data = json.loads(db.execute(
            "select data from sections where name = 'statistics'").fetchone()[0])
    calls = {e["query"]: e["calls"] for e in data["entries"]}
    assert calls["select $1::int"] == 10


async def _closed(conn: asyncpg.Connection) -> bool:
    try:
        await conn.fetchval("select 1")
    except (asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError, OSError):
        return True
    return False


def test_sigterm_drains_an_open_transaction(
    served: tuple[Proc, Path, Path],
) -> None:
    proc, _, _ = served
    dsn = f"postgresql://postgres@127.0.0.1:{proc.port}/postgres"

    async def main() -> None:
        conn = await asyncpg.connect(dsn)
        tx = conn.transaction()
        await tx.start()
        await conn.execute("create temp table drain_t (x int)")
        proc.popen.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        # Still inside the grace period: the transaction can finish.
        await conn.execute("insert into drain_t values (1)")
        await tx.commit()
        rc = await asyncio.to_thread(proc.popen.wait, 20)
        assert rc == 0
        assert await _closed(conn)

    asyncio.run(main())
