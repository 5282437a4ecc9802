"""Hits answered by the proxy with the server's own bytes; misses stored on the way back."""

from __future__ import annotations

import time
from collections.abc import Callable

from tests.cache.conftest import (
    DESCRIBE_PORTAL,
    EXECUTE,
    SYNC,
    Raw,
    bind,
    parse,
    totals,
)
from tests.support import pg
from tests.support.proxy import ProxyThread


def test_simple_query_hit_is_byte_identical(cache_proxy: Callable[..., ProxyThread],
                                            table: str, pg_primary: pg.PgCluster) -> None:
    p = cache_proxy()
    raw = Raw(p)
    sql = f"SELECT id, v FROM {table} WHERE id <= 3 ORDER BY id"
    first = raw.query(sql)
    assert totals(p)["misses"] == 1 and totals(p)["hits"] == 0
    second = raw.query(sql)
    assert totals(p)["hits"] == 1
    assert second == first
    direct = Raw(pg_primary, pg_primary.port)
    assert direct.query(sql) == first  # and what PostgreSQL itself answers
    direct.close()
    other = Raw(p)  # another session, same user / database / settings: shares it
    assert other.query(sql) == first
    assert totals(p)["hits"] == 2
    raw.close()
    other.close()


def test_extended_hit_and_pipeline(cache_proxy: Callable[..., ProxyThread],
                                   table: str) -> None:
    p = cache_proxy()
    raw = Raw(p)
    sql = f"SELECT id, v FROM {table} WHERE id = $1"
    unit = parse(sql, types=(23,)) + bind([b"4"]) + DESCRIBE_PORTAL + EXECUTE + SYNC
    raw.send(unit)
    miss = raw.until_ready()
    raw.send(unit)
    hit = raw.until_ready()
    assert hit == miss
    assert totals(p)["hits"] == 1
    # Binary result format: another key.
    unit_bin = parse(sql, types=(23,)) + bind([b"4"], result_formats=(1,)) \
        + DESCRIBE_PORTAL + EXECUTE + SYNC
    raw.send(unit_bin)
    miss_bin = raw.until_ready()
    assert miss_bin != miss
    # Pipelined: hit, miss, hit, miss, hit in one write; answers in order.
    other = parse(sql, types=(23,)) + bind([b"5"]) + DESCRIBE_PORTAL + EXECUTE + SYNC
    raw.send(unit + other + unit_bin + unit + other)
    answers = raw.until_ready(5)
    ref = Raw(p)
    ref.send(other)
    other_answer = ref.until_ready()
    assert answers == miss + other_answer + miss_bin + miss + other_answer
    raw.close()
    ref.close()


def test_named_statement_then_unnamed_after_hit(cache_proxy: Callable[..., ProxyThread],
                                                table: str) -> None:
    """A hit that parsed the unnamed statement leaves the server's unnamed statement behind:
    a later Bind of it without Parse must still bind what the client parsed."""
    p = cache_proxy()
    raw = Raw(p)
    q1 = f"SELECT v FROM {table} WHERE id = $1"
    q2 = f"SELECT id FROM {table} WHERE id = $1"
    u1 = parse(q1, types=(23,)) + bind([b"1"]) + EXECUTE + SYNC
    u2 = parse(q2, types=(23,)) + bind([b"2"]) + EXECUTE + SYNC
    raw.send(u1)
    raw.until_ready()
    raw.send(u2)
    a2 = raw.until_ready()
    raw.send(u1)  # a hit: the server's unnamed statement is still q2
    raw.until_ready()
    raw.send(bind([b"7"]) + EXECUTE + SYNC)  # binds q1 (the client's unnamed)
    out = raw.until_ready()
    assert b"v7" in out, out
    raw.send(u2)
    assert raw.until_ready() == a2
    # Named statements: keyed by what they name.
    raw.send(parse(q1, name=b"s1", types=(23,)) + SYNC)
    raw.until_ready()
    raw.send(bind([b"3"], name=b"s1") + EXECUTE + SYNC)
    m = raw.until_ready()
    hits = totals(p)["hits"]
    raw.send(bind([b"3"], name=b"s1") + EXECUTE + SYNC)
    assert raw.until_ready() == m
    assert totals(p)["hits"] == hits + 1
    raw.close()


def test_store_within_max_bytes_under_100000_distinct_keys(
        cache_proxy: Callable[..., ProxyThread], table: str) -> None:
    """100,000 distinct covered reads through one session (pipelined Bind/Execute/Sync of
    one statement with 100,000 parameter values): the store never holds more than
    cache.max_bytes, evicting the least recently used."""
    from tests.cache.conftest import cache_of

    max_bytes = 1024 * 1024
    p = cache_proxy(max_bytes=max_bytes, max_entry_bytes=4096)
    cache = cache_of(p)
    raw = Raw(p)
    raw.send(parse(f"SELECT v FROM {table} WHERE id = $1", types=(23,)) + SYNC)
    raw.until_ready()
    peak = 0
    # Small enough that the answers to one batch fit the socket buffers while the batch is
    # still being sent (this client does not read while it writes).
    batch = 500
    for start in range(0, 100_000, batch):
        raw.send(b"".join(bind([str(i).encode()]) + EXECUTE + SYNC
                          for i in range(start, start + batch)))
        raw.until_ready(batch)
        peak = max(peak, int(p.call(lambda: cache.store.bytes)))
    t = totals(p)
    assert t["misses"] == 100_000 and t["stores"] == 100_000
    assert peak <= max_bytes
    assert t["evictions"] > 90_000 and t["bytes"] <= max_bytes
    raw.close()


def test_repeat_hits_keep_every_guarantee(cache_proxy: Callable[..., ProxyThread],
                                          table: str) -> None:
    """The same Bind/Execute/Sync of a named statement sent again and again (pgbench -M
    prepared, asyncpg): repeat hits take the session's shortcut (one memo lookup, one write),
    which must still see commits, settings, transaction blocks, TTLs and the statistics."""
    p = cache_proxy(ttl_s=1.0)
    raw = Raw(p)
    raw.send(parse(f"SELECT v FROM {table} WHERE id = $1", name=b"s", types=(23,)) + SYNC)
    raw.until_ready()
    unit = bind([b"2"], name=b"s") + DESCRIBE_PORTAL + EXECUTE + SYNC
    raw.send(unit)
    first = raw.until_ready()
    assert b"v2" in first
    for _ in range(5):
        raw.send(unit)
        assert raw.until_ready() == first
    assert totals(p)["hits"] == 5 and totals(p)["misses"] == 1
    # A write committed through the proxy (another session) drops the entry.
    writer = Raw(p)
    writer.query(f"UPDATE {table} SET v = 'w2' WHERE id = 2")
    raw.send(unit)
    after = raw.until_ready()
    assert b"w2" in after and b"v2" not in after
    raw.send(unit)
    assert raw.until_ready() == after
    assert totals(p)["misses"] == 2 and totals(p)["hits"] == 6
    # Inside a transaction block: forwarded, never served (and nothing stored).
    raw.query("BEGIN")
    writer.query(f"UPDATE {table} SET v = 'x2' WHERE id = 2")  # autocommit: invalidates
    raw.send(unit)
    assert b"x2" in raw.until_ready()
    raw.send(unit)
    assert b"x2" in raw.until_ready()
    raw.query("COMMIT")
    hits = totals(p)["hits"]
    assert hits == 6
    # A setting changes the key: a miss, then hits again under the new settings.
    raw.send(unit)
    base = raw.until_ready()
    raw.query("SET extra_float_digits = 2")
    misses = totals(p)["misses"]
    raw.send(unit)
    assert raw.until_ready() == base
    assert totals(p)["misses"] == misses + 1
    raw.send(unit)
    raw.until_ready()
    assert totals(p)["hits"] == hits + 1
    # The TTL: after it, the entry is gone and the server is asked again.
    time.sleep(1.2)
    misses = totals(p)["misses"]
    raw.send(unit)
    assert raw.until_ready() == base
    assert totals(p)["misses"] == misses + 1
    writer.close()
    raw.close()


def test_sessions_share_plans_only_in_the_same_context(cache_proxy: Callable[..., ProxyThread],
                                                       table: str) -> None:
    """Units planned by one session are remembered for the sessions with the same database,
    user, settings and prepared statements; the same bytes of a Bind in a session where the
    statement's name means another statement are another unit."""
    p = cache_proxy()
    a, b, c = Raw(p), Raw(p), Raw(p)
    q_v = f"SELECT v FROM {table} WHERE id = $1"
    q_id = f"SELECT id * 100 FROM {table} WHERE id = $1"
    for raw, q in ((a, q_v), (b, q_v), (c, q_id)):
        raw.send(parse(q, name=b"s", types=(23,)) + SYNC)
        raw.until_ready()
    unit = bind([b"3"], name=b"s") + EXECUTE + SYNC
    a.send(unit)
    from_a = a.until_ready()
    assert b"v3" in from_a
    b.send(unit)  # the same context: a hit of a's entry
    assert b.until_ready() == from_a
    assert totals(p)["hits"] == 1
    c.send(unit)  # "s" is another statement here
    from_c = c.until_ready()
    assert b"300" in from_c and b"v3" not in from_c
    assert totals(p)["misses"] == 2
    c.send(unit)
    assert c.until_ready() == from_c
    a.send(unit)
    assert a.until_ready() == from_a
    assert totals(p)["hits"] == 3
    for raw in (a, b, c):
        raw.close()
