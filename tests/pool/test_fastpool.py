"""The pooled session's compiled fast path (proxy/fastpool.py) against a real PostgreSQL.

The guarantees of docs/pooling.md are tested in test_pooling.py with the fast path in place;
these tests check that it serves the common units (simple Query, unnamed and prepared extended
units), that a unit parked while every server is lent goes out with the hand-over, and that a
parked unit whose server needs its settings first goes through the general path.
"""

from __future__ import annotations

import re
import subprocess
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sqlproxy.proxy.pinscan import (
    digit_run,
    digit_run_at,
    may_forget,
    may_pin,
    may_pin_at,
    same_but_digits,
    same_but_digits_at,
    scan_pin,
)
from tests.pool.test_pooling import _pgbench, bench_db, pooled, pools_of, server_connections
from tests.support import pg
from tests.support.clients import client_env
from tests.support.pg import PgCluster
from tests.support.proxy import ProxyThread

__all__ = ["bench_db"]  # fixture used here


def test_fast_path_serves_many_clients_over_two_servers(
    make_proxy: Callable[..., ProxyThread], pg_primary: PgCluster, bench_db: str,
) -> None:
    p = pooled(make_proxy, size=2, max_wait_ms=30_000)
    with psycopg.connect(p.dsn(dbname=bench_db), autocommit=True) as c:
        c.execute("CREATE TABLE fast (k int PRIMARY KEY, n int)")
        c.execute("INSERT INTO fast SELECT g, 0 FROM generate_series(0, 7) g")
    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            with psycopg.connect(p.dsn(dbname=bench_db), autocommit=True) as conn:
                for i in range(60):
                    # unnamed extended units, a prepared statement, a simple Query
                    assert conn.execute("SELECT %s::int * 2", (i,)).fetchone() == (2 * i,)
                    assert conn.execute("SELECT %s::int + 1", (k,),
                                        prepare=True).fetchone() == (k + 1,)
                    with psycopg.ClientCursor(conn) as cur:
                        cur.execute(f"SELECT {k} + {i}")
                        assert cur.fetchone() == (k + i,)
                    with conn.transaction():
                        conn.execute("UPDATE fast SET n = n + 1 WHERE k = %s", (k,))
                        assert conn.execute("SELECT n FROM fast WHERE k = %s",
                                            (k,)).fetchone() == (i + 1,)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert server_connections(pg_primary, bench_db) <= 2
    (pool,) = pools_of(p)
    assert pool["servers"] <= 2
    assert pool["waits"] > 0  # units were parked and handed over
    assert pool["fast_units"] > 8 * 60  # most units took the fast path


def test_parked_unit_gets_its_settings_on_the_server_it_is_handed(
    make_proxy: Callable[..., ProxyThread], bench_db: str,
) -> None:
    p = pooled(make_proxy, size=1, max_wait_ms=30_000)
    with psycopg.connect(p.dsn(dbname=bench_db), application_name="holder") as holder, \
            psycopg.connect(p.dsn(dbname=bench_db), application_name="waiter",
                            autocommit=True) as waiter:
        assert holder.execute("SELECT current_setting('application_name')").fetchone() \
            == ("holder",)  # in a transaction: holds the only server
        result: dict[str, Any] = {}

        def wait() -> None:
            try:
                result["row"] = waiter.execute(
                    "SELECT current_setting('application_name')").fetchone()
            except psycopg.Error as exc:
                result["error"] = exc

        t = threading.Thread(target=wait)
        t.start()
        t.join(0.5)
        assert t.is_alive()  # parked: the only server is lent
        holder.commit()
        t.join(30)
        assert result == {"row": ("waiter",)}
        assert holder.execute("SELECT current_setting('application_name')").fetchone() \
            == ("holder",)
        holder.commit()


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_through_the_fast_path(
    make_proxy: Callable[..., ProxyThread], pg_primary: PgCluster, bench_db: str, mode: str,
) -> None:
    init = subprocess.run([str(pg.find_pg_bindir() / "pgbench"), "-i", "-q", "-s", "1",
                           "-h", pg_primary.host, "-p", str(pg_primary.port),
                           "-U", pg.SUPERUSER, bench_db],
                          capture_output=True, text=True, env=client_env(), check=False)
    assert init.returncode == 0, init.stderr
    p = pooled(make_proxy, size=3, max_wait_ms=60_000)
    out = _pgbench(p, bench_db, "-S", "-n", "-c", "12", "-j", "2", "-t", "100", "-M", mode)
    assert "number of transactions actually processed: 1200/1200" in out, out
    (pool,) = pools_of(p)
    assert pool["servers"] <= 3
    assert pool["fast_units"] >= 1000, pool


_ASCII = st.text(alphabet=st.characters(max_codepoint=126), max_size=80)
_WORDS = st.lists(st.sampled_from(["SELECT", "set", "Into", "TEMP", "listen", "lo_open",
                                   "prePare", "declare", "advisory", "dblink", "dealloc",
                                   "DISCARD", "sett", "lo_", "x", " ", "1", "_"]),
                  max_size=8).map(" ".join)


@given(st.one_of(_ASCII, _WORDS), st.booleans())
def test_byte_scan_agrees_with_the_text_check(text: str, forget: bool) -> None:
    data = b"Q....\x00" + text.encode() + b"\x00"
    want = may_pin(text) or (forget and may_forget(text))
    assert may_pin_at(data, 6, len(data) - 1, forget) == want
    assert scan_pin(data, 6, len(data) - 1, forget) == want  # the C scan the fast path runs


_DIGITY = st.text(alphabet="0123456789 ax_;'", max_size=30)


@given(_DIGITY, st.text(alphabet="0123456789", max_size=6), _DIGITY, _DIGITY)
def test_digit_run_and_same_but_digits_agree_with_their_definition(
        head: str, digits: str, tail: str, other: str) -> None:
    data = b"Q....\x00" + head.encode() + b"\x00"
    end = len(data) - 1
    i, j = digit_run(data, 6, end)
    assert (i, j) == digit_run_at(data, 6, end)
    run = [(m.start() + 6, m.end() + 6) for m in re.finditer(r"[0-9]+", head)]
    assert (i, j) == (run[-1] if run else (-1, -1))
    prefix, suffix = head.encode(), tail.encode()
    text = b"Q....\x00" + prefix + digits.encode() + suffix + b"\x00"
    want = bool(digits)
    assert same_but_digits(text, 6, len(text) - 1, prefix, suffix) == want
    assert same_but_digits_at(text, 6, len(text) - 1, prefix, suffix) == want
    changed = b"Q....\x00" + prefix + other.encode() + suffix + b"\x00"
    want = bool(other) and other.isdigit()
    assert same_but_digits(changed, 6, len(changed) - 1, prefix, suffix) == want
    assert same_but_digits_at(changed, 6, len(changed) - 1, prefix, suffix) == want
