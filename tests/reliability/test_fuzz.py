"""Hostile input: hypothesis drives random and mutated frontend byte streams at a running
proxy. It never crashes (no exception reaches the event loop), every stream ends in a close
(after an 08P01 ErrorResponse when the bytes were bad), and a well-behaved session running
alongside keeps getting correct results. Bounded: a few hundred streams, ~1 minute."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sqlproxy.wire.messages import parse_error_fields, startup_message
from tests.support import pg
from tests.support.proxy import ProxyThread

STARTUP = startup_message({"user": "postgres", "database": "postgres",
                           "application_name": "fuzz"})


def _msg(t: bytes, body: bytes) -> bytes:
    return t + struct.pack("!I", len(body) + 4) + body


def _cstr(s: str) -> bytes:
    return s.encode() + b"\x00"


VALID_MESSAGES = [
    _msg(b"Q", _cstr("select 1")),
    _msg(b"Q", _cstr("select 1; select 2")),
    _msg(b"P", b"s1\x00" + _cstr("select $1::int") + b"\x00\x00"),
    _msg(b"B", b"\x00s1\x00" + b"\x00\x00" + b"\x00\x01" + struct.pack("!I", 1) + b"7"
         + b"\x00\x00"),
    _msg(b"D", b"P\x00"),
    _msg(b"E", b"\x00" + struct.pack("!I", 0)),
    _msg(b"S", b""),
    _msg(b"H", b""),
    _msg(b"C", b"S" + b"s1\x00"),
    _msg(b"Q", _cstr("begin")),
    _msg(b"Q", _cstr("rollback")),
]


class Harness:
    def __init__(self, proxy: ProxyThread) -> None:
        self.proxy = proxy
        self.loop_errors: list[dict[str, Any]] = []
        self.streams = 0
        self.protocol_errors = 0
        self.closes = 0

    def send(self, payload: bytes) -> list[tuple[bytes, bytes]]:
        """Send ``payload``, half-close, read until the proxy closes. Returns the messages."""
        self.streams += 1
        sock = socket.create_connection((self.proxy.host, self.proxy.port), timeout=10)
        data = bytearray()
        try:
            # The proxy may already have closed on an early error: also fine.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(payload)
            # Read what the proxy answers; once it goes quiet, half-close (a client that has
            # nothing more to say) and expect the close.
            sock.settimeout(0.3)
            eof = False
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    eof = True
                    break
                except TimeoutError:
                    if sock.gettimeout() == 10:
                        break
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_WR)
                    sock.settimeout(10)
                    continue
                if not chunk:
                    eof = True
                    break
                data += chunk
            assert eof, f"the proxy neither answered nor closed; got {bytes(data[:200])!r}"
        finally:
            sock.close()
        self.closes += 1
        return _parse(bytes(data))


def _parse(data: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    pos = 0
    # A one-byte answer to an SSLRequest/GSSENCRequest in the stream.
    if data[:1] in (b"N", b"S") and (
        len(data) < 5 or struct.unpack("!I", data[1:5])[0] > len(data)
    ):
        out.append((data[:1], b""))
        pos = 1
    while len(data) - pos >= 5:
        t = data[pos:pos + 1]
        ln = struct.unpack("!I", data[pos + 1:pos + 5])[0]
        out.append((t, data[pos + 5:pos + 1 + ln]))
        pos += 1 + ln
    return out


@pytest.fixture(scope="module")
def harness(pg_primary: pg.PgCluster) -> Iterator[Harness]:
    proxy = ProxyThread.for_primary(
        pg_primary.dsn(), proxy={"startup_timeout": 3, "max_message_bytes": 1 << 20}
    ).start()
    h = Harness(proxy)
    assert proxy.loop is not None
    proxy.call(lambda: proxy.loop.set_exception_handler(  # type: ignore[union-attr]
        lambda loop, ctx: h.loop_errors.append(ctx)))
    yield h
    proxy.stop()


@pytest.fixture(scope="module")
def bystander(harness: Harness) -> Iterator[list[int]]:
    """A well-behaved session querying in a loop while the fuzzing runs."""
    results: list[int] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    async def loop() -> None:
        conn = await asyncpg.connect(harness.proxy.dsn())
        i = 0
        while not stop.is_set():
            i += 1
            assert await conn.fetchval("select $1::int * 2", i) == 2 * i
            rows = await conn.fetch("select g from generate_series(1, 50) g")
            assert [r[0] for r in rows] == list(range(1, 51))
            results.append(i)
            await asyncio.sleep(0.01)
        await conn.close()

    def run() -> None:
        try:
            asyncio.run(loop())
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    yield results
    stop.set()
    t.join(20)
    assert not errors, errors
    assert results, "the bystander never completed a round"


_SETTINGS = settings(max_examples=80, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.too_slow,
                                            HealthCheck.function_scoped_fixture])


@_SETTINGS
@given(st.binary(min_size=1, max_size=300))
def test_random_bytes_before_startup(harness: Harness, bystander: list[int], data: bytes) -> None:
    msgs = harness.send(data)
    for t, body in msgs:
        if t == b"E":
            fields = parse_error_fields(body)
            assert fields["C"] in ("08P01", "0A000", "28000", "3D000", "28P01", "53300"), fields
            harness.protocol_errors += fields["C"] == "08P01"
    assert not harness.loop_errors


@_SETTINGS
@given(st.binary(min_size=1, max_size=400))
def test_random_bytes_after_startup(harness: Harness, bystander: list[int], data: bytes) -> None:
    msgs = harness.send(STARTUP + data)
    codes = [parse_error_fields(b)["C"] for t, b in msgs if t == b"E"]
    harness.protocol_errors += codes.count("08P01")
    assert not harness.loop_errors


@st.composite
def mutated_stream(draw: st.DrawFn) -> bytes:
    msgs = draw(st.lists(st.sampled_from(VALID_MESSAGES), min_size=1, max_size=8))
    stream = bytearray(STARTUP + b"".join(msgs) + _msg(b"X", b""))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "length"]))
        pos = draw(st.integers(0, len(stream) - 1))
        if op == "flip":
            stream[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            stream[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and len(stream) > 1:
            del stream[pos]
        elif op == "truncate":
            del stream[max(1, pos):]
        elif op == "length" and pos + 4 <= len(stream):
            stream[pos:pos + 4] = struct.pack("!I", draw(st.sampled_from(
                [0, 1, 3, 4, 5, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 20, (1 << 20) + 1])))
    return bytes(stream)


@_SETTINGS
@given(mutated_stream())
def test_mutated_valid_streams(harness: Harness, bystander: list[int], data: bytes) -> None:
    harness.send(data)
    assert not harness.loop_errors


def test_after_fuzzing_nothing_leaked(harness: Harness, bystander: list[int],
                                      pg_primary: pg.PgCluster) -> None:
    deadline = time.monotonic() + 15
    while True:
        left = harness.proxy.call(lambda: len(harness.proxy.runtime.proxy.sessions))  # type: ignore[union-attr]
        servers = int(pg_primary.psql(
            "select count(*) from pg_stat_activity where application_name = 'fuzz'"))
        if left <= 1 and servers == 0:  # the bystander's own session may remain
            break
        assert time.monotonic() < deadline, f"{left} proxy sessions, {servers} server sessions"
        time.sleep(0.1)
    print(f"\nfuzz: {harness.streams} streams, {harness.protocol_errors} answered 08P01, "
          f"{harness.closes} closed, bystander rounds {len(bystander)}")
    assert not harness.loop_errors
    assert harness.protocol_errors > 0
