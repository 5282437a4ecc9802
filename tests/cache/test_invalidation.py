"""What is never served, and what a committed write drops."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import psycopg
import pytest

from tests.cache.conftest import Raw, cache_of, totals
from tests.support import pg
from tests.support.clients import unique_name
from tests.support.proxy import ProxyThread


def _entries(p: ProxyThread) -> int:
    cache = cache_of(p)
    return int(p.call(lambda: len(cache.store)))


def test_commit_invalidates_before_the_writer_sees_it(
        cache_proxy: Callable[..., ProxyThread], table: str) -> None:
    p = cache_proxy()
    reader = Raw(p)
    sql = f"SELECT v FROM {table} WHERE id = 1"
    reader.query(sql)
    assert _entries(p) == 1
    writer = Raw(p)
    writer.query("BEGIN")
    writer.query(f"UPDATE {table} SET v = 'new' WHERE id = 1")
    assert _entries(p) == 1  # not committed yet: nothing dropped, the entry still serves
    assert b"v1" in reader.query(sql)
    done = writer.query("COMMIT")
    assert b"COMMIT" in done
    assert _entries(p) == 0
    assert b"new" in reader.query(sql)
    reader.close()
    writer.close()


def test_commit_drops_before_the_commit_is_answered(
        cache_proxy: Callable[..., ProxyThread], table: str) -> None:
    """The invalidation runs before the proxy writes the COMMIT's answer to the writer: the
    bytes of the COMMIT's CommandComplete are not yet in the writer's socket then."""
    p = cache_proxy()
    reader = Raw(p)
    sql = f"SELECT v FROM {table} WHERE id = 2"
    reader.query(sql)
    cache = cache_of(p)
    original = cache.invalidate_local
    writer = Raw(p)
    writer.query("BEGIN")
    writer.query(f"UPDATE {table} SET v = 'x' WHERE id = 2")
    pending: list[bytes] = []
    ran = threading.Event()
    peek = socket.fromfd(writer.sock.fileno(), socket.AF_INET, socket.SOCK_STREAM)
    peek.setblocking(False)  # (the test's socket has a timeout: Python would wait)

    def spy(database: str, tables: frozenset[str]) -> int:
        # The writer's socket, peeked at while the test thread does not read it.
        try:
            pending.append(peek.recv(65536, socket.MSG_PEEK))
        except BlockingIOError:
            pending.append(b"")
        ran.set()
        return int(original(database, tables))

    p.call(lambda: setattr(cache, "invalidate_local", spy))
    writer.send(b"Q\0\0\0\x0bCOMMIT\0")
    assert ran.wait(10)
    answer = writer.until_ready()
    assert b"COMMIT" in answer
    assert pending == [b""]  # nothing of the COMMIT's answer had reached the writer
    assert b"x" in reader.query(sql)
    peek.close()
    reader.close()
    writer.close()


def test_rollback_and_failed_writes_drop_nothing(
        cache_proxy: Callable[..., ProxyThread], table: str) -> None:
    p = cache_proxy()
    raw = Raw(p)
    sql = f"SELECT v FROM {table} WHERE id = 3"
    first = raw.query(sql)
    writer = Raw(p)
    writer.query("BEGIN")
    writer.query(f"UPDATE {table} SET v = 'rolled back' WHERE id = 3")
    writer.query("ROLLBACK")
    assert _entries(p) == 1
    writer.query(f"UPDATE {table} SET v = 'failed' WHERE id = 3 AND 1/0 = 1")  # error
    assert _entries(p) == 1
    hits = totals(p)["hits"]
    assert raw.query(sql) == first
    assert totals(p)["hits"] == hits + 1
    # An autocommit write does drop it.
    writer.query(f"UPDATE {table} SET v = 'auto' WHERE id = 3")
    assert _entries(p) == 0
    assert b"auto" in raw.query(sql)
    raw.close()
    writer.close()


def test_psycopg_writer_in_another_session(cache_proxy: Callable[..., ProxyThread],
                                           table: str) -> None:
    p = cache_proxy()
    with psycopg.connect(p.dsn(), autocommit=True) as reader, \
            psycopg.connect(p.dsn()) as writer:
        q = f"SELECT v FROM {table} WHERE id = %s"
        assert reader.execute(q, (4,)).fetchone() == ("v4",)
        assert reader.execute(q, (4,)).fetchone() == ("v4",)
        assert totals(p)["hits"] >= 1
        with writer.transaction():
            writer.execute(f"UPDATE {table} SET v = 'w' WHERE id = 4")
            assert reader.execute(q, (4,)).fetchone() == ("v4",)
        assert reader.execute(q, (4,)).fetchone() == ("w",)
        writer.execute(f"DELETE FROM {table} WHERE id = 4")
        writer.commit()
        assert reader.execute(q, (4,)).fetchone() is None
        writer.execute(f"TRUNCATE {table}")
        writer.commit()
        assert reader.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
        writer.execute(f"INSERT INTO {table} VALUES (4, 'again')")
        writer.commit()
        assert reader.execute(f"SELECT count(*) FROM {table}").fetchone() == (1,)
        assert reader.execute(q, (4,)).fetchone() == ("again",)


def test_ttl_expires(cache_proxy: Callable[..., ProxyThread], table: str,
                     pg_primary: pg.PgCluster) -> None:
    p = cache_proxy(ttl_s=0.5)
    with psycopg.connect(p.dsn(), autocommit=True) as conn, \
            psycopg.connect(pg_primary.dsn(), autocommit=True) as direct:
        q = f"SELECT v FROM {table} WHERE id = 5"
        assert conn.execute(q).fetchone() == ("v5",)
        direct.execute(f"UPDATE {table} SET v = 'bypassed' WHERE id = 5")  # not seen
        assert conn.execute(q).fetchone() == ("v5",)  # served: bounded by the TTL only
        time.sleep(0.7)
        assert conn.execute(q).fetchone() == ("bypassed",)
        assert totals(p)["expirations"] >= 1


def test_never_cached(cache_proxy: Callable[..., ProxyThread], table: str,
                      pg_primary: pg.PgCluster) -> None:
    other = unique_name("cache_u")
    with psycopg.connect(pg_primary.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {other} (id int)")
        conn.execute(f"INSERT INTO {other} VALUES (1)")
    try:
        p = cache_proxy()
        with psycopg.connect(p.dsn(), autocommit=True) as conn:
            for _ in range(2):
                conn.execute(f"SELECT id FROM {other}").fetchall()  # no rule covers it
                conn.execute(f"SELECT random(), v FROM {table} WHERE id = 1").fetchall()
                conn.execute(f"SELECT now(), v FROM {table} WHERE id = 1").fetchall()
                conn.execute(f"SELECT v FROM {table} WHERE id = 1 FOR UPDATE").fetchall()
            assert totals(p)["hits"] == 0 and totals(p)["misses"] == 0
            assert _entries(p) == 0
            q = f"SELECT v FROM {table} WHERE id = 6"
            conn.execute(q).fetchall()  # stored
            with conn.transaction():  # a read-write transaction is never served
                assert conn.execute(q).fetchone() == ("v6",)
                conn.execute(f"UPDATE {table} SET v = 'in tx' WHERE id = 6")
                assert conn.execute(q).fetchone() == ("in tx",)
            assert totals(p)["hits"] == 0
            assert conn.execute(q).fetchone() == ("in tx",)
        reasons = cache_of(p).not_cached
        assert reasons.get("volatile") and reasons.get("stable") and reasons.get("for update")
    finally:
        with psycopg.connect(pg_primary.dsn(), autocommit=True) as conn:
            conn.execute(f"DROP TABLE {other}")


def test_settings_are_part_of_the_key(cache_proxy: Callable[..., ProxyThread],
                                      table: str, pg_primary: pg.PgCluster) -> None:
    schema = unique_name("cache_s")
    with psycopg.connect(pg_primary.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(f"CREATE TABLE {schema}.{table} (id int PRIMARY KEY, v text)")
        conn.execute(f"INSERT INTO {schema}.{table} VALUES (1, 'other schema')")
    try:
        p = cache_proxy()
        q = f"SELECT v FROM {table} WHERE id = 1"
        with psycopg.connect(p.dsn(), autocommit=True) as a:
            assert a.execute(q).fetchone() == ("v1",)
            a.execute(f"SET search_path = {schema}, public")
            assert a.execute(q).fetchone() == ("other schema",)
            a.execute("RESET ALL")
            assert a.execute(q).fetchone() == ("v1",)
            a.execute("SET TIME ZONE 'Asia/Tokyo'")
            a.execute(q).fetchone()
        assert totals(p)["hits"] == 1
    finally:
        with psycopg.connect(pg_primary.dsn(), autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def test_hint_without_rule(make_proxy: Callable[..., ProxyThread], table: str) -> None:
    from tests.cache.conftest import wait_catalog

    p = make_proxy(cache={"enabled": True})
    wait_catalog(p)
    with psycopg.connect(p.dsn(), autocommit=True) as conn:
        q = f"/* sqlproxy:cache ttl=30 */ SELECT v FROM {table} WHERE id = 7"
        assert conn.execute(q).fetchone() == ("v7",)
        assert conn.execute(q).fetchone() == ("v7",)
        conn.execute(f"SELECT v FROM {table} WHERE id = 7").fetchone()
    t = totals(p)
    assert t["hits"] == 1 and t["misses"] == 1
    assert "hint" in cache_of(p).stats.rules


@pytest.mark.parametrize("bad", [
    {"rules": [{"ttl_s": 5}]},
    {"rules": [{"table": "t", "fingerprint": "x", "ttl_s": 5}]},
    {"rules": [{"table": "t", "ttl_s": 0}]},
    {"max_entry_bytes": 10_000_000, "max_bytes": 1_000_000},
    {"url": "http://x"},
])
def test_bad_config_names_the_key(bad: dict[str, object]) -> None:
    from sqlproxy.config import load_config
    from sqlproxy.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config(None, {"cache": bad}, environ={})
    assert "cache" in str(info.value)


def test_rules_reload_live(cache_proxy: Callable[..., ProxyThread], table: str,
                           tmp_path: object, pg_primary: pg.PgCluster) -> None:
    """SIGHUP's reload: rules change for the next statements; turning the cache off needs a
    restart (the running cache is kept, and said so)."""
    from pathlib import Path

    p = cache_proxy()
    rt = p.runtime
    assert rt is not None
    cfg = Path(str(tmp_path)) / "sqlproxy.toml"
    base = (f'[proxy]\nlisten = "127.0.0.1:{p.port}"\nprimary = "{pg_primary.dsn()}"\n'
            '[admin]\nlisten = "127.0.0.1:0"\n[state]\nenabled = false\n')
    q = f"SELECT v FROM {table} WHERE id = 8"
    with psycopg.connect(p.dsn(), autocommit=True) as conn:
        conn.execute(q).fetchone()
        conn.execute(q).fetchone()
        assert totals(p)["hits"] == 1
        cfg.write_text(base + '[[cache.rules]]\ntable = "nothing_here"\nttl_s = 5\n')
        p.call(lambda: setattr(rt, "config_path", str(cfg)))
        assert p.call(rt.reload)
        conn.execute(q).fetchone()
        conn.execute(q).fetchone()
        assert totals(p)["hits"] == 1 and totals(p)["misses"] == 1  # no longer covered
        cfg.write_text(base + f'[[cache.rules]]\ntable = "{table}"\nttl_s = 5\n'
                       '[cache]\nmax_bytes = 2048\nmax_entry_bytes = 1024\n')
        assert p.call(rt.reload)
        conn.execute(q).fetchone()
        conn.execute(q).fetchone()
        assert totals(p)["hits"] == 2
        assert cache_of(p).store.max_bytes == 2048
        cfg.write_text(base)  # no [cache] at all: kept until a restart
        assert p.call(rt.reload)
        conn.execute(q).fetchone()
        assert totals(p)["hits"] == 3


def test_copy_function_and_ddl_invalidate(cache_proxy: Callable[..., ProxyThread],
                                          table: str, pg_primary: pg.PgCluster) -> None:
    fn = unique_name("cache_bump")
    with psycopg.connect(pg_primary.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE FUNCTION {fn}() RETURNS int LANGUAGE sql AS "
                     f"$$ UPDATE {table} SET v = 'bumped' WHERE id = 1 RETURNING 1 $$")
    try:
        p = cache_proxy()
        q = f"SELECT v FROM {table} WHERE id = 1"
        count = f"SELECT count(*) FROM {table}"
        with psycopg.connect(p.dsn(), autocommit=True) as conn:
            assert conn.execute(count).fetchone() == (10,)
            with conn.cursor().copy(f"COPY {table} (id, v) FROM STDIN") as copy:
                copy.write_row((11, "copied"))
            assert conn.execute(count).fetchone() == (11,)  # COPY FROM invalidated it
            assert conn.execute(q).fetchone() == ("v1",)
            assert conn.execute(q).fetchone() == ("v1",)
            hits = totals(p)["hits"]
            conn.execute(f"SELECT {fn}()")  # a function not known read-only: every table
            assert conn.execute(q).fetchone() == ("bumped",)
            assert totals(p)["hits"] == hits
            star = f"SELECT * FROM {table} WHERE id = 1"
            assert conn.execute(star).fetchone() == (1, "bumped")
            assert conn.execute(star).fetchone() == (1, "bumped")  # a hit
            conn.execute(f"ALTER TABLE {table} ADD COLUMN extra int DEFAULT 7")
            assert conn.execute(star).fetchone() == (1, "bumped", 7)
    finally:
        with psycopg.connect(pg_primary.dsn(), autocommit=True) as conn:
            conn.execute(f"DROP FUNCTION IF EXISTS {fn}()")


def test_pipelined_writes_and_reads(cache_proxy: Callable[..., ProxyThread],
                                    table: str) -> None:
    """psycopg's pipeline mode (Flush-ended units, answers read before the Sync): writes
    and covered reads interleaved, nothing stale, nothing stuck."""
    p = cache_proxy()
    q = f"SELECT v FROM {table} WHERE id = %s"
    with psycopg.connect(p.dsn(), autocommit=True) as conn:
        assert conn.execute(q, (1,), prepare=False).fetchone() == ("v1",)
        with conn.pipeline() as pipe:
            conn.execute(f"UPDATE {table} SET v = 'piped' WHERE id = 1")
            cur = conn.execute(q, (1,), prepare=False)
            pipe.sync()
            assert cur.fetchone() == ("piped",)
            conn.execute(f"UPDATE {table} SET v = 'piped again' WHERE id = 1")
            cur = conn.execute(q, (1,), prepare=False)
            assert cur.fetchone() == ("piped again",)  # read before any Sync: a Flush
        assert conn.execute(q, (1,), prepare=False).fetchone() == ("piped again",)
        assert conn.execute(q, (1,), prepare=False).fetchone() == ("piped again",)
