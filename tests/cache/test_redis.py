"""The Redis store: shared by proxies, invalidated across them, never in the way when down."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import httpx
import psycopg
import pytest

from tests.cache.conftest import Raw, cache_of, totals, wait_catalog
from tests.cache.redis_server import RedisServer, redis_missing
from tests.support.proxy import ProxyThread

pytestmark = pytest.mark.skipif(redis_missing() is not None, reason=str(redis_missing()))


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


def _proxy(make_proxy: Callable[..., ProxyThread], table: str, url: str,
           **extra: object) -> ProxyThread:
    p = make_proxy(cache={"rules": [{"table": table, "ttl_s": 300}], "url": url,
                          "redis_timeout_ms": 200, "redis_retry_s": 0.3, **extra})
    wait_catalog(p)
    return p


def _until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_two_proxies_share_entries_and_invalidate_each_other(
        table: str, make_proxy: Callable[..., ProxyThread],
        redis_server: RedisServer) -> None:
    a = _proxy(make_proxy, table, redis_server.url)
    b = _proxy(make_proxy, table, redis_server.url)
    sql = f"SELECT id, v FROM {table} WHERE id = 1"
    ra, rb = Raw(a), Raw(b)
    first = ra.query(sql)  # a miss through A, stored in Redis (in the background)
    _until(lambda: totals(a)["stores"] == 1)
    assert rb.query(sql) == first  # a hit through B, from Redis
    assert totals(b)["hits"] == 1
    wb = Raw(b)
    wb.query("BEGIN")
    wb.query(f"UPDATE {table} SET v = 'from b' WHERE id = 1")
    assert ra.query(sql) == first  # not committed: still served
    wb.query("COMMIT")  # invalidated in Redis before B answers the COMMIT
    fresh = ra.query(sql)
    assert b"from b" in fresh
    remote = cache_of(a).remote
    _until(lambda: a.call(lambda: remote.remote_invalidations) >= 1)  # the pub/sub message
    for r in (ra, rb, wb):
        r.close()


def test_redis_stopped_mid_run(table: str, make_proxy: Callable[..., ProxyThread],
                               redis_server: RedisServer) -> None:
    p = _proxy(make_proxy, table, redis_server.url)
    with psycopg.connect(p.dsn(), autocommit=True) as conn:
        q = f"SELECT v FROM {table} WHERE id = %s"
        assert conn.execute(q, (2,)).fetchone() == ("v2",)
        _until(lambda: totals(p)["stores"] == 1)
        assert conn.execute(q, (2,)).fetchone() == ("v2",)
        assert totals(p)["hits"] == 1
        redis_server.stop()
        for i in range(30):  # every query still answered, and answered right
            assert conn.execute(q, (2,)).fetchone() == (("v2",) if i < 10 else (f"w{i}",))
            if i >= 9:
                conn.execute(f"UPDATE {table} SET v = %s WHERE id = 2", (f"w{i + 1}",))
        remote = cache_of(p).remote
        d = p.call(remote.describe)
        assert not d["up"] and d["errors"] + d["timeouts"] >= 1
        assert d["pending_invalidations"] >= 1
        health = httpx.get(f"http://127.0.0.1:{p.runtime.admin.port}/healthz").json()
        assert health["details"]["cache_redis"]["up"] is False
        assert health["status"] == "ok"  # a cache down never takes the proxy out
        redis_server.start()  # back (empty): the kept invalidations go first, then hits again
        _until(lambda: p.call(lambda: remote.available()) and not p.call(
            lambda: remote.pending), timeout=15)
        hits = totals(p)["hits"]
        assert conn.execute(q, (2,)).fetchone() == ("w30",)
        _until(lambda: totals(p)["stores"] >= 2)
        assert conn.execute(q, (2,)).fetchone() == ("w30",)
        assert totals(p)["hits"] == hits + 1
