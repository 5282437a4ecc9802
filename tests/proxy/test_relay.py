"""The direct relay of plain sessions (``Relay`` in pump.py): used when it may be, bounded
buffering both ways, every socket given back or closed, and off with ``proxy.direct_relay``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import asyncpg

from sqlproxy.proxy._sockio import RECV_SIZE
from sqlproxy.proxy.pump import HAVE_RELAY, HIGH_WATER
from sqlproxy.proxy.server import ensure_fd_limit
from tests.reliability import rawclient
from tests.support import pg
from tests.support.proxy import ProxyThread


def _sessions(proxy: ProxyThread) -> list[Any]:
    return proxy.call(lambda: list(proxy.runtime.proxy.sessions.values()))  # type: ignore[union-attr]


def _wait(cond: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _one_session(proxy: ProxyThread) -> Any:
    _wait(lambda: len(_sessions(proxy)) == 1, "one session")
    return _sessions(proxy)[0]


def _watch(proxy: ProxyThread, probe: Callable[[], tuple[int, bool]],
           seconds: float) -> tuple[int, bool]:
    """Sample ``probe`` (bytes waiting, source still read) in the proxy's loop for ``seconds``:
    the most bytes seen waiting, and whether the source was ever paused."""
    most, paused = 0, False
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pending, reading = proxy.call(probe)
        most = max(most, pending)
        paused = paused or not reading
        time.sleep(0.02)
    return most, paused


def _query_message(sql: str) -> bytes:
    body = sql.encode() + b"\x00"
    return b"Q" + struct.pack("!I", len(body) + 4) + body


def test_the_build_has_the_relay() -> None:
    assert HAVE_RELAY  # _sockio.c is built with the package; without it no session is relayed


def test_plain_sessions_are_relayed_unless_configured_off(
        make_proxy: Callable[..., ProxyThread]) -> None:
    for enabled in (True, False):
        proxy = make_proxy(proxy={"direct_relay": enabled})
        sock = rawclient.connect(proxy.host, proxy.port)
        try:
            rawclient.startup(sock)
            session = _one_session(proxy)
            assert (session.relay is not None) is enabled
            rawclient.query(sock, "select 'relayed'")
            messages = rawclient.until_ready(sock)
            assert [t for t, _ in messages] == [b"T", b"D", b"C", b"Z"]
            assert b"relayed" in messages[1][1]
        finally:
            sock.close()
        _wait(lambda p=proxy: not _sessions(p), "session closed")  # type: ignore[misc]


def test_slow_client_large_result_is_buffered_within_bounds(
        make_proxy: Callable[..., ProxyThread]) -> None:
    """A client that does not read: the relay stops reading the server once HIGH_WATER bytes
    wait for the client, and every row arrives once it reads."""
    proxy = make_proxy()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect((proxy.host, proxy.port))
    try:
        rawclient.startup(sock)
        session = _one_session(proxy)
        relay = session.relay
        assert relay is not None
        rows, width = 20_000, 2000
        rawclient.query(sock, f"select repeat('x', {width}) from generate_series(1, {rows})")
        most, paused = _watch(proxy, lambda: (len(relay.client.pending or b""),
                                              relay.backend.reading), 1.5)
        assert paused, "the relay never stopped reading the server"
        assert HIGH_WATER < most <= HIGH_WATER + RECV_SIZE
        messages = rawclient.until_ready(sock)
        data_rows = [body for t, body in messages if t == b"D"]
        assert len(data_rows) == rows
        assert all(body[-width:] == b"x" * width for body in data_rows)
        assert (b"C", b"SELECT %d\x00" % rows) in messages
        # Reading resumed: the session goes on as usual.
        assert proxy.call(lambda: (relay.backend.reading, relay.client.pending)) == (True, None)
        rawclient.query(sock, "select 2")
        assert [t for t, _ in rawclient.until_ready(sock)] == [b"T", b"D", b"C", b"Z"]
    finally:
        sock.close()


def test_client_flooding_a_busy_server_is_buffered_within_bounds(
        make_proxy: Callable[..., ProxyThread]) -> None:
    """A pipeline much larger than the socket buffers sent while the server sleeps: the relay
    holds at most HIGH_WATER (plus one read) for the server, and every statement runs."""
    proxy = make_proxy()
    sock = rawclient.connect(proxy.host, proxy.port, timeout=60)
    try:
        rawclient.startup(sock)
        relay = _one_session(proxy).relay
        assert relay is not None
        count, pad = 4000, "y" * 4000
        flood = _query_message("select pg_sleep(1.5)") + b"".join(
            _query_message(f"select {i} as n, '{pad}' as pad") for i in range(count))
        sender = threading.Thread(target=sock.sendall, args=(flood,))
        sender.start()
        most, paused = _watch(proxy, lambda: (len(relay.backend.pending or b""),
                                              relay.client.reading), 1.2)
        assert paused, "the relay never stopped reading the client"
        assert HIGH_WATER < most <= HIGH_WATER + RECV_SIZE
        seen: list[bytes] = []
        for _ in range(count + 1):
            for t, body in rawclient.until_ready(sock):
                if t == b"D":
                    seen.append(body)
                assert t != b"E", body
        sender.join(30)
        assert len(seen) == count + 1
        assert [_columns(body) for body in seen[1:]] == [
            [str(i).encode(), pad.encode()] for i in range(count)]
    finally:
        sock.close()


def _columns(data_row: bytes) -> list[bytes]:
    n, pos, out = struct.unpack_from("!h", data_row)[0], 2, []
    for _ in range(n):
        length = struct.unpack_from("!i", data_row, pos)[0]
        out.append(data_row[pos + 4 : pos + 4 + length])
        pos += 4 + length
    return out


def _fd_targets() -> set[str]:
    """What this process's descriptors point to ("socket:[inode]", paths)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
    return out


def test_every_socket_is_closed_whichever_side_ends(
        make_proxy: Callable[..., ProxyThread], pg_primary: pg.PgCluster) -> None:
    """Clean goodbyes, dropped clients and terminated server connections: the relay's
    duplicated sockets are closed with the session (no descriptor of the process points to
    them any more), and the server sees every session end."""
    proxy = make_proxy()
    app = "relay_fds"
    sockets: set[str] = set()  # what the relays' duplicated descriptors point to

    async def main() -> None:
        conns = [await asyncpg.connect(proxy.dsn(), server_settings={"application_name": app})
                 for _ in range(12)]
        relays = [s.relay for s in _sessions(proxy)]
        assert len(relays) == 12 and None not in relays
        for relay in relays:
            sockets.update(os.readlink(f"/proc/self/fd/{fd}")
                           for fd in (relay.client.fd, relay.backend.fd))
        for c in conns:
            assert await c.fetchval("select 1") == 1
        for c in conns[:4]:
            await c.close()  # Terminate
        for c in conns[4:8]:
            c.terminate()  # the socket just closes
        pids = [await c.fetchval("select pg_backend_pid()") for c in conns[8:]]
        await asyncio.to_thread(pg_primary.psql, "select pg_terminate_backend(pid) from "
                                f"unnest(array{pids}) as pid")
        for c in conns[8:]:
            try:
                await c.fetchval("select 1")
            except (asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError,
                    asyncpg.InternalClientError):  # asyncpg's way with a FATAL out of turn
                pass
            else:
                raise AssertionError("a terminated backend still answered")
            c.terminate()

    asyncio.run(main())
    _wait(lambda: not _sessions(proxy), "proxy sessions leaked")
    _wait(lambda: int(pg_primary.psql(
        f"select count(*) from pg_stat_activity where application_name = '{app}'")) == 0,
        "server sessions survived")
    _wait(lambda: not _fd_targets() & sockets,
          "a session's socket is still open in the proxy")


def test_open_files_limit_is_raised_for_the_configured_clients() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(soft, 1024)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        want = low + 100 if hard == resource.RLIM_INFINITY else min(hard, low + 100)
        assert ensure_fd_limit(low + 100) == want
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == want
        assert ensure_fd_limit(10) == want  # never lowered
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
