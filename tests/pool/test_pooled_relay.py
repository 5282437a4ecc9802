"""The direct relay of pooled sessions (``DirectSocket`` in direct.py): the client's socket and
every pooled server's are read and written directly unless ``proxy.direct_relay`` is off,
a slow client stops the server it holds from being read (bounded buffering), and the
duplicated sockets are closed with their connections."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import uvloop

from sqlproxy.proxy.fastpool import PooledClientPump, PoolFast
from sqlproxy.proxy.pooled import DIRECT_AFTER_CHUNKS
from tests.pool.test_pooling import pooled
from tests.proxy.test_relay import _one_session, _sessions, _wait
from tests.reliability import rawclient
from tests.support.proxy import ProxyThread


def _servers(proxy: ProxyThread) -> list[Any]:
    def get() -> list[Any]:
        rt = proxy.runtime
        assert rt is not None and rt.proxy.pools is not None
        return [s for pool in rt.proxy.pools.pools.values() for s in pool.state.servers]
    return proxy.call(get)


def test_pooled_sessions_and_servers_are_relayed_unless_configured_off(
        make_proxy: Callable[..., ProxyThread]) -> None:
    for enabled in (True, False):
        proxy = make_proxy(pool={"mode": "transaction", "size": 1},
                           proxy={"direct_relay": enabled})
        sock = rawclient.connect(proxy.host, proxy.port)
        try:
            rawclient.startup(sock)
            session = _one_session(proxy)
            for i in range(6):
                if i == DIRECT_AFTER_CHUNKS - 1:  # a short-lived client never pays to set it up
                    assert proxy.call(lambda s=session: s.client_pump.fd) == -1
                rawclient.query(sock, f"select 'relayed {i}'")
                messages = rawclient.until_ready(sock)
                assert [t for t, _ in messages] == [b"T", b"D", b"C", b"Z"]
                assert f"relayed {i}".encode() in messages[1][1]
            assert proxy.call(lambda s=session: s.client_pump.fd >= 0) is enabled
            assert proxy.call(lambda s=session: s.describe()["direct_relay"]) is enabled
            (server,) = _servers(proxy)
            fd = proxy.call(lambda s=server: s.pump.fd)
            assert (fd >= 0) is enabled
            assert proxy.call(lambda s=session: s.fast.fast_units) >= 5
        finally:
            sock.close()
        _wait(lambda p=proxy: not _sessions(p), "session closed")  # type: ignore[misc]
        if enabled:
            # The client's duplicate is closed with it; the server's stays with the server.
            assert proxy.call(lambda s=session: s.client_pump.fd) == -1
            assert proxy.call(lambda s=server: s.pump.fd) == fd
            os.fstat(fd)  # still open: the server stays in the pool


def test_slow_pooled_client_stops_the_server_being_read(
        make_proxy: Callable[..., ProxyThread]) -> None:
    """A client that does not read a large result: the proxy stops reading the server it
    holds once the client's transport has its high-water mark waiting, instead of buffering
    the whole result; every row arrives once the client reads, and the server goes back."""
    proxy = pooled(make_proxy, size=1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect((proxy.host, proxy.port))
    try:
        rawclient.startup(sock)
        session = _one_session(proxy)
        rows, width = 20_000, 2000  # 40 MB
        rawclient.query(sock, f"select repeat('x', {width}) from generate_series(1, {rows})")
        most, paused = 0, False
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            waiting, held_paused = proxy.call(lambda: (
                session.client_transport.get_write_buffer_size(),
                session.held is not None and session.held.pump.paused))
            most = max(most, waiting)
            paused = paused or held_paused
            time.sleep(0.02)
        assert paused, "the proxy never stopped reading the server"
        assert most < 4 * 1024 * 1024, most  # not the 40 MB result
        messages = rawclient.until_ready(sock)
        data_rows = [body for t, body in messages if t == b"D"]
        assert len(data_rows) == rows
        assert all(body[-width:] == b"x" * width for body in data_rows)
        _wait(lambda: proxy.call(lambda: session.held is None), "server given back")
        (server,) = _servers(proxy)
        assert proxy.call(lambda: server.pump.paused) is False
        rawclient.query(sock, "select 2")
        assert [t for t, _ in rawclient.until_ready(sock)] == [b"T", b"D", b"C", b"Z"]
    finally:
        sock.close()


def test_client_gone_while_its_server_is_paused_leaves_a_clean_server(
        make_proxy: Callable[..., ProxyThread]) -> None:
    """The client leaves mid-result while the proxy is not reading its server: the server is
    read again (its answer drained, the transaction rolled back) and lent to the next."""
    proxy = pooled(make_proxy, size=1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect((proxy.host, proxy.port))
    rawclient.startup(sock)
    session = _one_session(proxy)
    rawclient.query(sock, "begin; select repeat('x', 2000) from generate_series(1, 20000)")
    _wait(lambda: proxy.call(lambda: session.held is not None and session.held.pump.paused),
          "server paused")
    sock.close()
    other = rawclient.connect(proxy.host, proxy.port, timeout=30)
    try:
        rawclient.startup(other)
        rawclient.query(other, "select 'next', now() = statement_timestamp()")
        messages = rawclient.until_ready(other)
        assert [t for t, _ in messages] == [b"T", b"D", b"C", b"Z"]
        assert messages[-1][1] == b"I"
        assert b"next" in messages[1][1]
    finally:
        other.close()


class _Owner:
    def __init__(self) -> None:
        self.events: list[str] = []

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")

    def data_received(self, data: bytes) -> None:
        self.events.append("data")


def test_direct_sends_wait_behind_what_the_transport_holds() -> None:
    """Whoever leaves bytes in the transport (the direct send's remainder, or the general path
    writing to the transport itself), later direct sends queue behind them until the
    transport has written them all: the other side reads every byte in the order sent."""
    async def run() -> None:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        b.setblocking(False)
        owner = _Owner()
        transport, pump = await loop.create_connection(
            lambda: PooledClientPump(owner, PoolFast(owner, 1 << 20, 10), None), sock=a)
        pump.transport = transport
        assert pump.start_direct(loop)
        sent = bytearray()
        for i in range(200):  # until the socket is full and the transport holds the rest
            chunk = bytes([i % 251]) * 50_000
            pump.send(chunk)
            sent += chunk
            if pump.spilled:
                break
        assert pump.spilled and owner.events == ["pause"]
        transport.write(b"general path")  # written by the session, not through the pump
        got = bytearray(b.recv(1 << 20))  # room in the socket again, the loop not run yet
        pump.send(b"fast path")
        sent += b"general path" + b"fast path"
        while len(got) < len(sent):
            try:
                got += b.recv(1 << 20)
            except BlockingIOError:
                await asyncio.sleep(0.001)
        assert bytes(got) == bytes(sent)
        for _ in range(100):
            if not pump.spilled:
                break
            await asyncio.sleep(0.01)
        assert not pump.spilled and owner.events == ["pause", "resume"]
        pump.send(b"direct again")
        assert transport.get_write_buffer_size() == 0
        await asyncio.sleep(0.01)
        assert b.recv(100) == b"direct again"
        pump.stop_direct()
        transport.close()
        b.close()

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(run())
    finally:
        loop.close()
