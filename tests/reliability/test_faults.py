"""Faults: the primary killed mid-transaction (clients get a connection error, the proxy serves
again once the server is back), a client killed mid-COPY and mid-result (the server session is
cancelled and closed: nothing left in pg_stat_activity), no session leaked in the proxy."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from sqlproxy.wire.messages import startup_message
from tests.reliability import rawclient
from tests.support import pg
from tests.support.proxy import ProxyThread

CONNECTION_LOST = ("08006", "08003", "08000", "57P01", "57P02", "57P03")


@pytest.fixture(scope="module")
def fault_primary(pg_bindir: Path, pg_base_dir: Path) -> Iterator[pg.PgCluster]:
    """A cluster of its own: these tests kill it."""
    cluster = pg.start_primary(pg_base_dir, "faultprimary", bindir=pg_bindir)
    yield cluster
    cluster.stop("immediate")


def _sessions(proxy: ProxyThread) -> int:
    return proxy.call(lambda: len(proxy.runtime.proxy.sessions))  # type: ignore[union-attr]


def _wait(cond: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _server_count(primary: pg.PgCluster, application: str) -> int:
    return int(primary.psql("select count(*) from pg_stat_activity "
                            f"where application_name = '{application}'"))


def test_primary_killed_mid_transaction(make_proxy: Callable[..., ProxyThread],
                                        fault_primary: pg.PgCluster) -> None:
    proxy = make_proxy(fault_primary.dsn())
    # (synchronous_commit is off on test clusters: make the table durable before the crash)
    fault_primary.psql("create table if not exists fault_t (x int); checkpoint")

    async def main() -> None:
        in_tx = await asyncpg.connect(proxy.dsn())
        busy = await asyncpg.connect(proxy.dsn())
        tx = in_tx.transaction()
        await tx.start()
        await in_tx.execute("insert into fault_t values (1)")
        running = asyncio.ensure_future(busy.fetchval("select pg_sleep(30)"))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(fault_primary.kill)
        # The running query and the open transaction both fail with a connection error.
        second = asyncio.ensure_future(in_tx.execute("insert into fault_t values (2)"))
        for fut in (running, second):
            with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError,
                                ConnectionError)) as info:
                await asyncio.wait_for(fut, 20)
            err = info.value
            if isinstance(err, asyncpg.PostgresError):
                assert err.sqlstate in CONNECTION_LOST, (err.sqlstate, str(err))
        # While the server is down, a new client gets 08006 from the proxy, not a hang.
        with pytest.raises(asyncpg.PostgresError) as down:
            await asyncpg.connect(proxy.dsn(), timeout=20)
        assert down.value.sqlstate in ("08006", "57P03"), str(down.value)
        await asyncio.to_thread(fault_primary.start)
        conn = await asyncpg.connect(proxy.dsn())
        # The killed transaction was rolled back; the table (committed) is there and empty.
        assert await conn.fetchval("select count(*) from fault_t") == 0
        await conn.close()
        for c in (in_tx, busy):
            c.terminate()

    asyncio.run(main())
    _wait(lambda: _sessions(proxy) == 0, "proxy sessions left after the crash")


def _copy_marker_sessions(primary: pg.PgCluster, app: str) -> int:
    return _server_count(primary, app)


def test_client_killed_mid_copy_in(make_proxy: Callable[..., ProxyThread],
                                   pg_primary: pg.PgCluster) -> None:
    proxy = make_proxy()
    app = "copy_in_killed"
    pg_primary.psql("create table if not exists copy_kill (x int)")
    sock = rawclient.connect(proxy.host, proxy.port)
    sock.sendall(startup_message({"user": "postgres", "database": "postgres",
                                  "application_name": app}))
    rawclient.until_ready(sock)
    rawclient.query(sock, "copy copy_kill from stdin")
    t, _ = rawclient.read_message(sock)
    assert t == b"G"  # CopyInResponse
    for i in range(1000):
        line = f"{i}\n".encode()
        sock.sendall(b"d" + struct.pack("!I", len(line) + 4) + line)
    _wait(lambda: _server_count(pg_primary, app) == 1, "COPY did not start")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST: the client is gone mid-COPY
    _wait(lambda: _server_count(pg_primary, app) == 0, "server session survived the client")
    assert pg_primary.psql("select count(*) from copy_kill") == "0"  # nothing half-copied
    _wait(lambda: _sessions(proxy) == 0, "proxy session leaked")


def test_client_killed_mid_copy_out(make_proxy: Callable[..., ProxyThread],
                                    pg_primary: pg.PgCluster) -> None:
    proxy = make_proxy()
    app = "copy_out_killed"
    sock = rawclient.connect(proxy.host, proxy.port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    sock.sendall(startup_message({"user": "postgres", "database": "postgres",
                                  "application_name": app}))
    rawclient.until_ready(sock)
    rawclient.query(sock, "copy (select repeat('y', 500) from generate_series(1, 2000000)) "
                    "to stdout")
    assert sock.recv(4096)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    _wait(lambda: _server_count(pg_primary, app) == 0, "COPY OUT survived the client")
    _wait(lambda: _sessions(proxy) == 0, "proxy session leaked")


def test_client_killed_mid_result(make_proxy: Callable[..., ProxyThread],
                                  pg_primary: pg.PgCluster) -> None:
    proxy = make_proxy()
    app = "result_killed"

    async def main() -> None:
        conn = await asyncpg.connect(proxy.dsn(), server_settings={"application_name": app})
        task = asyncio.ensure_future(
            conn.fetch("select repeat('z', 1000) from generate_series(1, 3000000)"))
        await asyncio.sleep(0.5)
        conn.terminate()  # drop the socket with the result streaming
        with pytest.raises((asyncpg.InterfaceError, asyncpg.PostgresError,
                            asyncpg.exceptions.ConnectionDoesNotExistError, ConnectionError,
                            asyncio.CancelledError)):
            await task

    asyncio.run(main())
    _wait(lambda: _server_count(pg_primary, app) == 0, "query survived the client")
    _wait(lambda: _sessions(proxy) == 0, "proxy session leaked")
