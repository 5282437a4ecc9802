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
from hypothesis import given, settings
from hypothesis import strategies as st

from sqlproxy.analysis.profiler import Profiler
from sqlproxy.analysis.statement import SessionInfo
from sqlproxy.config import AnalysisSection
from sqlproxy.errors import ProtocolViolation
from sqlproxy.proxy.pinscan import (
    digit_run,
    digit_run_at,
    may_forget,
    may_pin,
    may_pin_at,
    same_but_digits,
    same_but_digits_at,
    scan_pin,
    unit_layout,
    unit_layout_at,
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


@given(_DIGITY, st.text(alphabet="0123456789", max_size=21), _DIGITY, _DIGITY)
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
    want: int | str | None = (int(digits) if len(digits) <= 18 else digits) if digits else None
    assert same_but_digits(text, 6, len(text) - 1, prefix, suffix) == want
    assert same_but_digits_at(text, 6, len(text) - 1, prefix, suffix) == want
    changed = b"Q....\x00" + prefix + other.encode() + suffix + b"\x00"
    want = (int(other) if len(other) <= 18 else other) \
        if other and other.isascii() and other.isdigit() else None
    assert same_but_digits(changed, 6, len(changed) - 1, prefix, suffix) == want
    assert same_but_digits_at(changed, 6, len(changed) - 1, prefix, suffix) == want


def _msg(kind: bytes, body: bytes, extra: int = 0) -> bytes:
    return kind + (4 + len(body) + extra).to_bytes(4, "big") + body


_NAMES = st.sampled_from([b"", b"", b"s1", b"p" * 127, b"p" * 128])
_UNIT_PART = st.one_of(
    st.tuples(st.just(b"P"), st.sampled_from([
        b"\x00SELECT 1\x00\x00\x00", b"s\x00x\x00\x00\x00", b"\x00\x00",
        b"\x00" + b"x" * 40000 + b"\x00\x00\x00"])),
    st.builds(lambda portal, stmt, rest: (b"B", portal + b"\x00" + stmt + b"\x00" + rest),
              _NAMES, _NAMES, st.sampled_from([b"\x00\x00\x00\x00\x00\x00", b"\x00\x00",
                                               b"\x00\x01\x00\x00\x00\x0342\x00\x00"])),
    st.tuples(st.just(b"B"), st.sampled_from([b"", b"p", b"p\x00s"])),
    st.builds(lambda kind, name: (b"D", kind + name + b"\x00"),
              st.sampled_from([b"P", b"S"]), _NAMES),
    st.tuples(st.just(b"D"), st.sampled_from([b"", b"P"])),
    st.builds(lambda name: (b"E", name + b"\x00\x00\x00\x00\x00"), _NAMES),
    st.tuples(st.sampled_from([b"S", b"H", b"C"]), st.sampled_from([b"", b"x"])),
)


def _common_unit(parse: bool, describe: bool, parts: list[tuple[bytes, bytes]],
                 drop: int) -> list[tuple[bytes, bytes]]:
    """[Parse] Bind [Describe] Execute Sync from ``parts`` (their first Parse, Bind, ...),
    with ``drop`` (if in range) left out."""
    first = {kind: (kind, body) for kind, body in reversed(parts)}
    order = [b"P"] if parse else []
    order += [b"B", b"D"] if describe else [b"B"]
    unit = [first.get(k, (k, b"P\x00" if k == b"D" else b"\x00\x00\x00\x00\x00\x00"))
            for k in order] + [first.get(b"E", (b"E", b"\x00\x00\x00\x00\x00")), (b"S", b"")]
    return [m for i, m in enumerate(unit) if i != drop]


@given(st.one_of(st.lists(_UNIT_PART, max_size=6),
                 st.builds(_common_unit, st.booleans(), st.booleans(),
                           st.lists(_UNIT_PART, max_size=6), st.integers(-1, 8)),
                 st.builds(_common_unit, st.booleans(), st.booleans(),
                           st.lists(_UNIT_PART, max_size=6), st.just(-1))),
       st.sampled_from([0, 0, 0, -1, -6]), st.sampled_from([0, 0, 0, -1, 1]),
       st.sampled_from([1 << 20, 1 << 20, 20, 4]))
@settings(max_examples=3000, deadline=None)
def test_unit_layout_in_c_is_the_definition(parts: list[tuple[bytes, bytes]], trim: int,
                                            skew: int, max_message: int) -> None:
    """``unit_layout`` (``_sockio``) answers as ``unit_layout_at``; a layout it gives decodes
    (as ``PoolFast.client`` does) to the bounds of each message of the unit."""
    from sqlproxy.proxy import _sockio

    assert unit_layout is _sockio.unit_layout
    msgs = [_msg(kind, body) for kind, body in parts]
    if msgs and skew:  # one length off by one
        kind, body = parts[-1]
        msgs[-1] = _msg(kind, body, skew)
    data = b"".join(msgs)
    if trim:
        data = data[:trim]
    got = unit_layout(data, max_message)
    assert got == unit_layout_at(data, max_message)
    if got < 0:
        return
    kinds = [data[m : m + 1] for m in _starts(data)]
    assert kinds in ([b"P", b"B", b"D", b"E", b"S"], [b"P", b"B", b"E", b"S"],
                     [b"B", b"D", b"E", b"S"], [b"B", b"E", b"S"])
    pend = got & 0xFFF
    bpos = pend
    bend = bpos + ((got >> 12) & 0x3FF)
    bstart = bpos + 6
    bstop = bstart + ((got >> 22) & 0x7F)
    epos = bend + 7 * (got >> 29)
    eend = epos + 10
    assert got < 1 << 30
    starts = _starts(data)
    assert (pend > 0) == (kinds[0] == b"P")
    if pend:
        assert starts[1] == pend and data[5] == 0
    assert data[bpos : bpos + 1] == b"B" and bend in starts
    assert data[bstart - 1] == 0 and data[bpos + 5 : bstart - 1].find(b"\x00") < 0
    assert data[bstop] == 0 and data[bstart:bstop].find(b"\x00") < 0
    assert data[epos : epos + 1] == b"E" and data[eend : eend + 1] == b"S"
    assert len(data) == eend + 5


def _starts(data: bytes) -> list[int]:
    out, pos = [], 0
    while pos + 5 <= len(data):
        out.append(pos)
        pos += 1 + int.from_bytes(data[pos + 1 : pos + 5], "big")
    return out


_PROFILER = Profiler(AnalysisSection())


def _bound_statement_def(data: bytes, max_message: int) -> bytes | None:
    """The definition of ``FastRoutes.bound_statement``: the statement a whole unit of one
    Bind, Describes of the portal, Executes and a Sync last binds (named), each message of at
    most ``max_message`` bytes; else None. A Bind without its strings' terminators is a
    protocol violation, unless the unit was refused before it (a second or named Parse, one
    after the Bind: what the pooled fast path frames, ``frame_unit``)."""
    pos, stmt, last, parse = 0, None, b"", False
    while pos < len(data):
        if len(data) - pos < 5:
            return None
        last = data[pos : pos + 1]
        length = int.from_bytes(data[pos + 1 : pos + 5], "big", signed=True)
        end = pos + 1 + length
        if length < 4 or end > len(data) or length > max_message:
            return None
        body = data[pos + 5 : end]
        if last == b"P":
            if parse or stmt is not None or length < 7 or body[0] != 0:
                return None
            parse = True
        elif last == b"B":
            if stmt is not None:
                return None
            portal_end = body.find(b"\x00")
            stmt_end = body.find(b"\x00", portal_end + 1)
            if portal_end < 0 or stmt_end < 0:
                raise ProtocolViolation("invalid message format: missing string terminator")
            stmt = body[portal_end + 1 : stmt_end]
        elif last == b"S":
            if end != len(data):
                return None
        elif last != b"E" and not (last == b"D" and length > 4 and body[:1] == b"P"):
            return None
        pos = end
    return stmt if last == b"S" and stmt and not parse else None


@given(st.one_of(st.lists(_UNIT_PART, max_size=6),
                 st.builds(_common_unit, st.booleans(), st.booleans(),
                           st.lists(_UNIT_PART, max_size=6), st.integers(-1, 8))),
       st.sampled_from([0, 0, 0, -1, -6]), st.sampled_from([1 << 20, 1 << 20, 20]))
@settings(max_examples=2000, deadline=None)
def test_the_routed_fast_path_finds_a_units_statement_as_defined(
        parts: list[tuple[bytes, bytes]], trim: int, max_message: int) -> None:
    """``FastRoutes.bound_statement`` (framed by ``frame_unit``, partly in C) answers as its
    definition for whole, cut and malformed units."""
    from sqlproxy.proxy.fastroute import FastRoutes

    data = b"".join(_msg(kind, body) for kind, body in parts)
    if trim:
        data = data[:trim]
    routes = FastRoutes(None, _PROFILER, SessionInfo(1, "p", "d", "u"), max_message)
    try:
        want = _bound_statement_def(data, max_message)
    except ProtocolViolation:
        with pytest.raises(ProtocolViolation):
            routes.bound_statement(data)
        return
    assert routes.bound_statement(data) == want
