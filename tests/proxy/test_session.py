"""Session behaviour against a real server: startup, auth relay, cancellation, bad input."""

from __future__ import annotations

import asyncio
import socket
import struct
import subprocess
import time
from collections.abc import Callable

import asyncpg
import pytest

from sqlproxy.wire.messages import parse_error_fields, startup_message
from tests.support import pg
from tests.support.proxy import ProxyThread


def _read_message(sock: socket.socket) -> tuple[bytes, bytes]:
    head = b""
    while len(head) < 5:
        chunk = sock.recv(5 - len(head))
        if not chunk:
            raise ConnectionError("closed")
        head += chunk
    length = struct.unpack("!I", head[1:5])[0]
    body = b""
    while len(body) < length - 4:
        chunk = sock.recv(length - 4 - len(body))
        if not chunk:
            raise ConnectionError("closed")
        body += chunk
    return head[:1], body


def _error_of(sock: socket.socket) -> dict[str, str]:
    """Read messages until an ErrorResponse; return its fields."""
    sock.settimeout(10)
    while True:
        t, body = _read_message(sock)
        if t == b"E":
            return parse_error_fields(body)


def _connect(proxy: ProxyThread) -> socket.socket:
    return socket.create_connection((proxy.host, proxy.port), timeout=10)


def _startup(sock: socket.socket, user: str = "postgres", database: str = "postgres") -> None:
    sock.sendall(startup_message({"user": user, "database": database}))
    while True:
        t, _ = _read_message(sock)
        if t == b"Z":
            return
        if t == b"E":
            raise AssertionError("startup failed")


def _assert_closed(sock: socket.socket) -> None:
    sock.settimeout(10)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass


async def _still_works(proxy: ProxyThread) -> None:
    conn = await asyncpg.connect(proxy.dsn())
    try:
        assert await conn.fetchval("select 41 + 1") == 42
    finally:
        await conn.close()


def test_basic_query(proxy: ProxyThread) -> None:
    async def main() -> None:
        conn = await asyncpg.connect(proxy.dsn())
        assert await conn.fetchval("select $1::int * 2", 21) == 42
        await conn.close()

    asyncio.run(main())


@pytest.mark.parametrize("user", pg.PASSWORD_USERS, ids=lambda u: u.auth_method)
def test_password_methods_are_relayed(proxy: ProxyThread, user: pg.PasswordUser) -> None:
    async def main() -> None:
        conn = await asyncpg.connect(proxy.dsn(user.name, user.password))
        assert await conn.fetchval("select current_user") == user.name
        await conn.close()
        with pytest.raises(asyncpg.InvalidPasswordError) as info:
            await asyncpg.connect(proxy.dsn(user.name, "wrong-" + user.password))
        assert info.value.sqlstate == "28P01"

    asyncio.run(main())


def test_sslrequest_is_declined_and_prefer_continues(proxy: ProxyThread) -> None:
    out = subprocess.run(
        ["psql", proxy.dsn(sslmode="prefer"), "-XAtc", "select 'plain'"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "plain"
    out = subprocess.run(
        ["psql", proxy.dsn(sslmode="require"), "-XAtc", "select 1"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode != 0
    assert "SSL" in out.stderr


def test_gssenc_request_is_declined(proxy: ProxyThread) -> None:
    with _connect(proxy) as sock:
        sock.sendall(struct.pack("!II", 8, 80877104))
        assert sock.recv(1) == b"N"
        _startup(sock)


def test_garbage_startup_gets_08P01(proxy: ProxyThread) -> None:
    with _connect(proxy) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        err = _error_of(sock)
        assert err["C"] == "08P01"
        assert "startup packet" in err["M"]
        _assert_closed(sock)
    asyncio.run(_still_works(proxy))


def test_unsupported_protocol_gets_08P01(proxy: ProxyThread) -> None:
    with _connect(proxy) as sock:
        sock.sendall(struct.pack("!II", 8, 2 << 16))
        err = _error_of(sock)
        assert err["C"] == "08P01" and "protocol" in err["M"]


def test_unknown_message_type_gets_08P01(proxy: ProxyThread) -> None:
    with _connect(proxy) as sock:
        _startup(sock)
        sock.sendall(b"~\x00\x00\x00\x04")
        err = _error_of(sock)
        assert err["C"] == "08P01"
        assert "message type" in err["M"]
        _assert_closed(sock)
    asyncio.run(_still_works(proxy))


def test_oversized_message_gets_08P01(make_proxy: Callable[..., ProxyThread]) -> None:
    proxy = make_proxy(proxy={"max_message_bytes": 4096})
    with _connect(proxy) as sock:
        _startup(sock)
        sock.sendall(b"Q" + struct.pack("!I", 100_000) + b"x" * 100)
        err = _error_of(sock)
        assert err["C"] == "08P01"
        assert "max_message_bytes" in err["M"]
    asyncio.run(_still_works(proxy))


def test_malformed_length_gets_08P01(proxy: ProxyThread) -> None:
    with _connect(proxy) as sock:
        _startup(sock)
        sock.sendall(b"Q\x00\x00\x00\x01")
        assert _error_of(sock)["C"] == "08P01"


def test_startup_timeout(make_proxy: Callable[..., ProxyThread]) -> None:
    proxy = make_proxy(proxy={"startup_timeout": 0.5})
    with _connect(proxy) as sock:
        sock.sendall(b"\x00\x00")  # half a length word, then silence
        err = _error_of(sock)
        assert err["C"] == "08P01"
        assert "startup_timeout" in err["M"]
        _assert_closed(sock)


def test_unreachable_primary_gets_08006(make_proxy: Callable[..., ProxyThread]) -> None:
    port = pg.free_port()
    proxy = make_proxy(f"postgresql://postgres@127.0.0.1:{port}/postgres")
    with _connect(proxy) as sock:
        sock.sendall(startup_message({"user": "postgres", "database": "postgres"}))
        err = _error_of(sock)
        assert err["C"] == "08006"
        assert f"127.0.0.1\", port {port}" in err["M"]


def test_too_many_clients(make_proxy: Callable[..., ProxyThread]) -> None:
    proxy = make_proxy(proxy={"max_client_connections": 2})

    async def main() -> None:
        conns = [await asyncpg.connect(proxy.dsn()) for _ in range(2)]
        with pytest.raises(asyncpg.TooManyConnectionsError) as info:
            await asyncpg.connect(proxy.dsn())
        assert "max_client_connections" in (info.value.detail or "")
        for c in conns:
            await c.close()
        await _still_works(proxy)

    asyncio.run(main())


def test_cancel_request_reaches_the_right_backend(
    proxy: ProxyThread, pg_primary: pg.PgCluster
) -> None:
    # asyncpg cancels a timed-out query with a CancelRequest carrying the key the proxy gave it
    # (psycopg's blocking cancel() would hold the GIL the in-process proxy needs).
    marker = "cancel_marker_777"

    async def main() -> None:
        conn = await asyncpg.connect(proxy.dsn())
        other = await asyncpg.connect(proxy.dsn())
        task = asyncio.ensure_future(other.fetchval("select pg_sleep(1.5) is null"))
        with pytest.raises((asyncio.TimeoutError, asyncpg.QueryCanceledError)):
            await conn.fetchval(f"select pg_sleep(30) /* {marker} */", timeout=0.5)
        assert await conn.fetchval("select 1") == 1  # usable: the query was cancelled
        assert _server_sessions(pg_primary, marker) == 0
        assert await task is False  # the other session was not cancelled
        await conn.close()
        await other.close()

    asyncio.run(main())


def _server_sessions(primary: pg.PgCluster, marker: str) -> int:
    out = primary.psql(
        f"select count(*) from pg_stat_activity where query like '%{marker}%' "
        "and pid <> pg_backend_pid()"
    )
    return int(out)


def test_client_disconnect_mid_query_cancels_and_closes(
    proxy: ProxyThread, pg_primary: pg.PgCluster
) -> None:
    marker = "disconnect_marker_4242"
    with _connect(proxy) as sock:
        _startup(sock)
        sql = f"select pg_sleep(60) /* {marker} */".encode()
        sock.sendall(b"Q" + struct.pack("!I", len(sql) + 5) + sql + b"\x00")
        deadline = time.monotonic() + 10
        while _server_sessions(pg_primary, marker) == 0:
            assert time.monotonic() < deadline, "query never started"
            time.sleep(0.05)
    deadline = time.monotonic() + 10
    while _server_sessions(pg_primary, marker) != 0:
        assert time.monotonic() < deadline, "backend query survived the client"
        time.sleep(0.05)


def test_listen_notify_and_notices(proxy: ProxyThread) -> None:
    async def main() -> None:
        listener = await asyncpg.connect(proxy.dsn())
        sender = await asyncpg.connect(proxy.dsn())
        got: asyncio.Queue[str] = asyncio.Queue()
        await listener.add_listener("chan_x", lambda *a: got.put_nowait(a[3]))
        await sender.execute("select pg_notify('chan_x', 'hello')")
        assert await asyncio.wait_for(got.get(), 10) == "hello"
        notices: list[str] = []
        listener.add_log_listener(lambda c, m: notices.append(m.message))
        await listener.execute("do $$ begin raise notice 'note %', 7; end $$")
        await asyncio.sleep(0.1)
        assert notices == ["note 7"]
        await listener.execute("set application_name = 'renamed'")
        assert listener.get_settings().application_name == "renamed"
        await listener.close()
        await sender.close()

    asyncio.run(main())


def test_negotiate_protocol_version_passes_through(proxy: ProxyThread) -> None:
    """A client asking for 3.2 with an unknown _pq_ option gets the server's answer."""
    with _connect(proxy) as sock:
        sock.sendall(startup_message({"user": "postgres", "database": "postgres",
                                      "_pq_.test_option": "x"}, protocol=(3 << 16) | 2))
        sock.settimeout(10)
        seen = []
        while True:
            t, _ = _read_message(sock)
            seen.append(t)
            if t in (b"Z", b"E"):
                break
        assert b"v" in seen  # NegotiateProtocolVersion from the PostgreSQL 15 server
        assert seen[-1] == b"Z"
