"""Fixtures of the result cache tests: a table to read, a proxy with rules on it."""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from tests.support import pg
from tests.support.clients import unique_name
from tests.support.proxy import ProxyThread


@pytest.fixture
def table(pg_primary: pg.PgCluster) -> Iterator[str]:
    """A fresh table ``name(id int primary key, v text)`` with rows 1..10."""
    name = unique_name("cache_t")
    with psycopg.connect(pg_primary.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, v text)")
        conn.execute(f"INSERT INTO {name} SELECT g, 'v' || g FROM generate_series(1, 10) g")
    yield name
    with psycopg.connect(pg_primary.dsn(), autocommit=True) as conn:
        conn.execute("SET lock_timeout = '10s'")
        conn.execute(f"DROP TABLE IF EXISTS {name} CASCADE")


@pytest.fixture
def cache_proxy(table: str,
                make_proxy: Callable[..., ProxyThread]) -> Callable[..., ProxyThread]:
    """A proxy with a table rule on ``table`` (ttl 300 s unless given), catalog loaded."""

    def make(ttl_s: float = 300.0, **cache: Any) -> ProxyThread:
        rules = cache.pop("rules", [{"table": table, "ttl_s": ttl_s}])
        p = make_proxy(cache={"rules": rules, **cache})
        wait_catalog(p)
        return p

    return make


def cache_of(p: ProxyThread) -> Any:
    assert p.runtime is not None
    cache = p.runtime.proxy.cache
    assert cache is not None
    return cache


def wait_catalog(p: ProxyThread, database: str = "postgres") -> None:
    """Ask for the database's catalog and wait until it is loaded."""
    import time

    cache = cache_of(p)
    p.call(lambda: cache.catalog(database))
    deadline = time.monotonic() + 20
    while not p.call(lambda: cache.catalog(database).loaded):
        if time.monotonic() > deadline:
            raise AssertionError("cache catalog not loaded")
        time.sleep(0.05)


def totals(p: ProxyThread) -> dict[str, Any]:
    cache = cache_of(p)
    return dict(p.call(lambda: cache.stats.total.as_dict()))


# ------------------------------------------------------------------ a raw frontend
class Raw:
    """Exact bytes in, exact bytes out."""

    def __init__(self, p: ProxyThread | pg.PgCluster, port: int | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port or p.port), timeout=10)
        params = {"user": "postgres", "database": "postgres"}
        body = struct.pack("!I", 196608) + b"".join(
            k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
        self.sock.sendall(struct.pack("!I", len(body) + 4) + body)
        self.until_ready()

    def read(self) -> tuple[int, bytes]:
        head = self._exact(5)
        (length,) = struct.unpack("!I", head[1:5])
        return head[0], head + self._exact(length - 4)

    def _exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed")
            out += chunk
        return bytes(out)

    def until_ready(self, count: int = 1) -> bytes:
        out = bytearray()
        while count:
            t, msg = self.read()
            out += msg
            if t == ord("Z"):
                count -= 1
        return bytes(out)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def query(self, sql: str) -> bytes:
        self.send(msg(b"Q", sql.encode() + b"\0"))
        return self.until_ready()

    def close(self) -> None:
        self.send(b"X\0\0\0\4")
        self.sock.close()


def msg(t: bytes, body: bytes) -> bytes:
    return t + struct.pack("!I", len(body) + 4) + body


def parse(sql: str, name: bytes = b"", types: tuple[int, ...] = ()) -> bytes:
    return msg(b"P", name + b"\0" + sql.encode() + b"\0" + struct.pack("!H", len(types))
               + b"".join(struct.pack("!I", t) for t in types))


def bind(params: list[bytes | None], name: bytes = b"", formats: tuple[int, ...] = (),
         result_formats: tuple[int, ...] = ()) -> bytes:
    body = b"\0" + name + b"\0" + struct.pack("!H", len(formats))
    body += b"".join(struct.pack("!H", f) for f in formats)
    body += struct.pack("!H", len(params))
    for p in params:
        body += struct.pack("!i", -1) if p is None else struct.pack("!I", len(p)) + p
    body += struct.pack("!H", len(result_formats))
    body += b"".join(struct.pack("!H", f) for f in result_formats)
    return msg(b"B", body)


DESCRIBE_PORTAL = msg(b"D", b"P\0")
EXECUTE = msg(b"E", b"\0" + struct.pack("!I", 0))
SYNC = msg(b"S", b"")
FLUSH = msg(b"H", b"")
