"""Limits and timeouts: each violation is an ErrorResponse with a real SQLSTATE naming the
setting, and the proxy keeps serving everyone else."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable

import asyncpg
import pytest

from tests.reliability import rawclient
from tests.support import pg
from tests.support.proxy import ProxyThread


async def _works(proxy: ProxyThread, **kw: str) -> None:
    conn = await asyncpg.connect(proxy.dsn(**kw))
    try:
        assert await conn.fetchval("select 41 + 1") == 42
    finally:
        await conn.close()


def test_per_user_limit(make_proxy: Callable[..., ProxyThread]) -> None:
    proxy = make_proxy(proxy={"max_connections_per_user": 2})

    async def main() -> None:
        held = [await asyncpg.connect(proxy.dsn()) for _ in range(2)]
        with pytest.raises(asyncpg.TooManyConnectionsError) as info:
            await asyncpg.connect(proxy.dsn())
        assert "postgres" in str(info.value)
        assert "proxy.max_connections_per_user" in (info.value.detail or "")
        # Another role is not affected.
        await _works(proxy, user=pg.SCRAM_USER.name, password=pg.SCRAM_USER.password)
        await held[0].close()
        await asyncio.sleep(0.1)
        await _works(proxy)  # the slot is free again
        await held[1].close()

    asyncio.run(main())
    assert proxy.call(lambda: proxy.runtime.proxy.admitted) == 0  # type: ignore[union-attr]


def test_per_database_limit(make_proxy: Callable[..., ProxyThread]) -> None:
    proxy = make_proxy(proxy={"max_connections_per_database": 1})

    async def main() -> None:
        held = await asyncpg.connect(proxy.dsn())
        with pytest.raises(asyncpg.TooManyConnectionsError) as info:
            await asyncpg.connect(proxy.dsn())
        assert "proxy.max_connections_per_database" in (info.value.detail or "")
        await _works(proxy, user=pg.APP_USER.name, password=pg.APP_USER.password,
                     dbname=pg.APP_DATABASE)
        await held.close()

    asyncio.run(main())


def test_idle_client_timeout(make_proxy: Callable[..., ProxyThread]) -> None:
    proxy = make_proxy(proxy={"idle_client_timeout": 0.4})
    with rawclient.connect(proxy.host, proxy.port) as idle, \
            rawclient.connect(proxy.host, proxy.port) as busy:
        rawclient.startup(idle)
        rawclient.startup(busy)
        rawclient.query(busy, "select pg_sleep(1.2)")  # busy longer than the timeout: kept
        err = rawclient.error_of(idle)
        assert err["C"] == "57P05"
        assert "proxy.idle_client_timeout" in err["D"]
        assert rawclient.closed(idle)
        msgs = rawclient.until_ready(busy)
        assert [t for t, _ in msgs][-2:] == [b"C", b"Z"]
    assert proxy.call(
        lambda: proxy.runtime.proxy.timeouts["idle_client_timeout"]  # type: ignore[union-attr]
    ) >= 1


def test_idle_in_transaction_timeout(
    make_proxy: Callable[..., ProxyThread], pg_primary: pg.PgCluster
) -> None:
    proxy = make_proxy(proxy={"idle_in_transaction_timeout": 0.4})
    marker = "idle_tx_marker_31337"
    with rawclient.connect(proxy.host, proxy.port) as intx, \
            rawclient.connect(proxy.host, proxy.port) as idle:
        rawclient.startup(intx)
        rawclient.startup(idle)
        rawclient.query(intx, f"begin; select 1 /* {marker} */")
        rawclient.until_ready(intx)
        err = rawclient.error_of(intx)
        assert err["C"] == "25P03"
        assert "proxy.idle_in_transaction_timeout" in err["D"]
        assert rawclient.closed(intx)
        # Idle outside a transaction is fine with only this timeout set.
        rawclient.query(idle, "select 1")
        rawclient.until_ready(idle)
    _wait_no_server_session(pg_primary, marker)


def _wait_no_server_session(primary: pg.PgCluster, marker: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        n = int(primary.psql(
            f"select count(*) from pg_stat_activity where query like '%{marker}%' "
            "and pid <> pg_backend_pid()"))
        if n == 0:
            return
        assert time.monotonic() < deadline, f"{n} server sessions left with {marker}"
        time.sleep(0.05)


def test_backend_that_never_answers(make_proxy: Callable[..., ProxyThread]) -> None:
    """A server that accepts TCP connections and then says nothing: connect_timeout."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        silent.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(silent.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        port = silent.getsockname()[1]
        proxy = make_proxy(f"postgresql://postgres@127.0.0.1:{port}/postgres",
                           proxy={"connect_timeout": 0.5})
        with rawclient.connect(proxy.host, proxy.port) as sock:
            sock.sendall(rawclient.startup_message({"user": "postgres", "database": "x"}))
            err = rawclient.error_of(sock)
            assert err["C"] == "08006"
            assert "proxy.connect_timeout" in err["M"]
            assert rawclient.closed(sock)
        assert accepted  # the TCP connection was made: it is the silence that timed out
    finally:
        stop.set()
        t.join(5)
        silent.close()
        for s in accepted:
            s.close()


def test_slow_reader_does_not_make_the_proxy_buffer(
    make_proxy: Callable[..., ProxyThread], pg_primary: pg.PgCluster
) -> None:
    """A client reading a 100 MB result slowly: the proxy's buffered bytes (the transports' and
    the direct relay's) stay bounded, and when the client goes away mid-result the server's
    query is cancelled."""
    proxy = make_proxy()
    marker = "slow_reader_marker_2718"

    def buffered() -> int:
        rt = proxy.runtime
        assert rt is not None
        total = 0
        for s in rt.proxy.sessions.values():
            if s.client_transport is not None:
                total += s.client_transport.get_write_buffer_size()
            b = s.backend
            if b is not None and b.transport is not None:
                total += b.transport.get_write_buffer_size()
            if s.relay is not None:  # the direct relay's own waiting bytes (pump.py)
                total += len(s.relay.client.pending or b"") + len(s.relay.backend.pending or b"")
        return total

    sock = rawclient.connect(proxy.host, proxy.port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    rawclient.startup(sock)
    rawclient.query(sock, f"select repeat('x', 1000) /* {marker} */ "
                    "from generate_series(1, 100000)")
    peak = 0
    got = 0
    for _ in range(60):  # read ~1 MB, slowly
        got += len(sock.recv(16384))
        time.sleep(0.01)
        peak = max(peak, proxy.call(buffered))
    print(f"\nslow reader: read {got} bytes of ~100 MB, proxy buffered at most {peak} bytes")
    assert peak < 4 * 1024 * 1024
    sock.close()  # mid-result
    _wait_no_server_session(pg_primary, marker)
    asyncio.run(_works(proxy))
