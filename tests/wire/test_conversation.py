"""Unit tests of the sans-IO conversation tracker: no event loop, no server."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sqlproxy.errors import ProtocolViolation
from sqlproxy.wire.conversation import Conversation
from sqlproxy.wire.requests import Pending
from sqlproxy.wire.scan import command_tag_rows, decode_text, text_at


def msg(t: bytes, body: bytes = b"") -> bytes:
    return t + struct.pack("!I", len(body) + 4) + body


def query(sql: str) -> bytes:
    return msg(b"Q", sql.encode() + b"\x00")


def parse(name: str, sql: str) -> bytes:
    return msg(b"P", name.encode() + b"\x00" + sql.encode() + b"\x00\x00\x00")


def bind(portal: str, stmt: str, params: list[bytes]) -> bytes:
    body = portal.encode() + b"\x00" + stmt.encode() + b"\x00" + struct.pack("!hh", 1, 0)
    body += struct.pack("!h", len(params))
    for p in params:
        body += struct.pack("!i", len(p)) + p
    body += struct.pack("!h", 0)
    return msg(b"B", body)


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return msg(b"E", portal.encode() + b"\x00" + struct.pack("!i", max_rows))


SYNC = msg(b"S")


def complete(tag: str) -> bytes:
    return msg(b"C", tag.encode() + b"\x00")


def data_row(value: bytes = b"x") -> bytes:
    return msg(b"D", struct.pack("!hi", 1, len(value)) + value)


def ready(status: bytes = b"I") -> bytes:
    return msg(b"Z", status)


def error(code: str) -> bytes:
    return msg(b"E", b"SERROR\x00C" + code.encode() + b"\x00Mboom\x00\x00")


@dataclass
class Recorder:
    done: list[tuple[str, int, str | None, int, str | None]] = field(default_factory=list)
    params: dict[str, str] = field(default_factory=dict)

    def statement_done(self, pending: Pending, index: int, tag: bytes | None, rows: int,
                       sqlstate: str | None, started: float, ended: float) -> None:
        assert ended >= started
        self.done.append((pending.sql, index, tag.decode() if tag else None, rows, sqlstate))

    def parameter_status(self, name: str, value: str) -> None:
        self.params[name] = value

    def transaction_status(self, previous: int, current: int, now: float) -> None:
        self.params["tx"] = chr(previous) + chr(current)


def run(frontend: list[bytes], backend: list[bytes]) -> Recorder:
    rec = Recorder()
    conv = Conversation(rec, 1 << 20)
    for chunk in frontend:
        conv.feed_frontend(chunk, 1.0)
    for chunk in backend:
        conv.feed_backend(chunk, 2.0)
    return rec


def test_simple_multi_statement_query() -> None:
    rec = run([query("select 1; select 2; insert into t values (1)")],
              [msg(b"T", b"\x00\x00"), data_row(), complete("SELECT 1"), msg(b"T", b"\x00\x00"),
               data_row(), data_row(), complete("SELECT 2"), complete("INSERT 0 1"), ready()])
    sql = "select 1; select 2; insert into t values (1)"
    assert rec.done == [(sql, 0, "SELECT 1", 1, None), (sql, 1, "SELECT 2", 2, None),
                        (sql, 2, "INSERT 0 1", 1, None)]


def test_extended_pipeline_attributes_each_execute() -> None:
    fe = parse("s1", "select $1") + bind("", "s1", [b"1"]) + execute() + bind("", "s1", [b"2"])
    fe += execute() + SYNC + parse("", "update t set a = 1") + bind("", "", []) + execute() + SYNC
    be = (msg(b"1") + msg(b"2") + data_row() + complete("SELECT 1") + msg(b"2") + data_row()
          + complete("SELECT 1") + ready() + msg(b"1") + msg(b"2") + complete("UPDATE 7")
          + ready())
    rec = run([fe], [be])
    assert rec.done == [("select $1", 0, "SELECT 1", 1, None),
                        ("select $1", 0, "SELECT 1", 1, None),
                        ("update t set a = 1", 0, "UPDATE 7", 7, None)]


def test_error_skips_to_sync() -> None:
    fe = parse("", "select 1/0") + bind("", "", []) + execute() + parse("", "select 2")
    fe += bind("", "", []) + execute() + SYNC + parse("", "select 3") + bind("", "", [])
    fe += execute() + SYNC
    be = msg(b"1") + msg(b"2") + error("22012") + ready() + msg(b"1") + msg(b"2") + data_row()
    be += complete("SELECT 1") + ready()
    rec = run([fe], [be])
    # The second Execute was skipped by the server: it must not steal the third's result.
    assert rec.done == [("select 1/0", 0, None, 0, "22012"), ("select 3", 0, "SELECT 1", 1, None)]


def test_error_in_simple_query_stops_the_string() -> None:
    rec = run([query("select 1; select 1/0; select 3")],
              [data_row(), complete("SELECT 1"), error("22012"), ready(b"I")])
    assert [(d[1], d[4]) for d in rec.done] == [(0, None), (1, "22012")]


def test_portal_suspended_accumulates_rows() -> None:
    fe = parse("", "select g from generate_series(1, 5) g") + bind("c1", "", [])
    fe += execute("c1", 2) + SYNC + execute("c1", 2) + SYNC + execute("c1", 2) + SYNC
    be = msg(b"1") + msg(b"2") + data_row() + data_row() + msg(b"s") + ready(b"T")
    be += data_row() + data_row() + msg(b"s") + ready(b"T") + data_row() + complete("SELECT 1")
    be += ready(b"T")
    rec = run([fe], [be])
    assert len(rec.done) == 1
    assert rec.done[0][3] == 5


def test_suspended_portal_closed_at_sync_is_one_execution() -> None:
    # asyncpg's fetchrow/fetchval: Execute with a row limit, then Sync ends the transaction
    # and with it the portal; the next query on the unnamed portal must not inherit its rows.
    fe = parse("a", "select name from items where id = $1") + bind("", "a", [b"1"])
    fe += execute("", 1) + SYNC
    fe += parse("b", "select * from items") + bind("", "b", []) + execute() + SYNC
    be = msg(b"1") + msg(b"2") + data_row() + msg(b"s") + ready(b"I")
    be += msg(b"1") + msg(b"2") + data_row() + data_row() + complete("SELECT 2") + ready(b"I")
    rec = run([fe], [be])
    assert rec.done == [("select name from items where id = $1", 0, None, 1, None),
                        ("select * from items", 0, "SELECT 2", 2, None)]


def test_suspended_portal_rebound_in_a_transaction() -> None:
    fe = parse("a", "select 1") + bind("p", "a", []) + execute("p", 1) + SYNC
    fe += bind("p", "a", []) + execute("p") + SYNC
    be = msg(b"1") + msg(b"2") + data_row() + msg(b"s") + ready(b"T")
    be += msg(b"2") + data_row() + complete("SELECT 1") + ready(b"T")
    rec = run([fe], [be])
    assert [(d[0], d[3]) for d in rec.done] == [("select 1", 1), ("select 1", 1)]


def test_extended_copy_in_ignored_sync() -> None:
    # libpq: Parse/Bind/Execute/Sync for the COPY, CopyData, CopyDone, Sync. The server ignores
    # the first Sync (it arrives in copy-in mode) and answers one ReadyForQuery.
    rec = Recorder()
    conv = Conversation(rec, 1 << 20)
    conv.feed_frontend(parse("", "copy t from stdin") + bind("", "", []) + execute() + SYNC, 1.0)
    conv.feed_backend(msg(b"1") + msg(b"2") + msg(b"G", b"\x00\x00\x00"), 1.5)
    conv.feed_frontend(msg(b"d", b"1\n") + msg(b"c") + SYNC, 2.0)
    conv.feed_backend(complete("COPY 1") + ready(), 2.5)
    assert rec.done == [("copy t from stdin", 0, "COPY 1", 1, None)]
    assert not conv.busy
    conv.feed_frontend(query("select 1"), 3.0)
    conv.feed_backend(data_row() + complete("SELECT 1") + ready(), 3.5)
    assert rec.done[-1] == ("select 1", 0, "SELECT 1", 1, None)


def test_fatal_error_is_noticed() -> None:
    conv = Conversation(Recorder(), 1 << 20)
    conv.feed_frontend(query("select 1"), 1.0)
    conv.feed_backend(msg(b"E", b"SFATAL\x00VFATAL\x00C57P01\x00Mterminating\x00\x00"), 2.0)
    assert conv.fatal


def test_empty_query_and_parameter_status() -> None:
    rec = run([query("")], [msg(b"I"), msg(b"S", b"application_name\x00app\x00"), ready()])
    assert rec.done == [("", 0, None, 0, None)]
    assert rec.params == {"application_name": "app"}


def test_transaction_status_and_busy() -> None:
    conv = Conversation(None, 1 << 20)
    conv.feed_frontend(query("begin"), 0.0)
    assert conv.busy
    conv.feed_backend(complete("BEGIN") + ready(b"T"), 0.0)
    assert not conv.busy
    assert conv.tx_status == ord("T")


def test_copy_in_mode() -> None:
    conv = Conversation(None, 1 << 20)
    conv.feed_frontend(query("copy t from stdin"), 0.0)
    conv.feed_backend(msg(b"G", b"\x00\x00\x00"), 0.0)
    assert conv.copy_mode == 1
    conv.feed_frontend(msg(b"d", b"1\n") + msg(b"c"), 0.0)
    conv.feed_backend(complete("COPY 1") + ready(), 0.0)
    assert conv.copy_mode == 0 and not conv.busy


@pytest.mark.parametrize("data", [
    b"\x00\x00\x00\x00\x08",  # type 0
    b"Q\x00\x00\x00\x02",  # length below 4
    b"Z\x00\x00\x00\x04",  # a backend-only type
])
def test_malformed_frontend_is_rejected(data: bytes) -> None:
    conv = Conversation(None, 1 << 20)
    with pytest.raises(ProtocolViolation):
        conv.feed_frontend(data, 0.0)


def test_oversized_message_names_the_setting() -> None:
    conv = Conversation(None, 1024)
    with pytest.raises(ProtocolViolation, match="max_message_bytes"):
        conv.feed_frontend(b"Q" + struct.pack("!I", 5000), 0.0)


def test_command_tag_rows() -> None:
    assert command_tag_rows(b"INSERT 0 5") == 5
    assert command_tag_rows(b"SELECT 12") == 12
    assert command_tag_rows(b"UPDATE 0") == 0
    assert command_tag_rows(b"BEGIN") == 0
    assert command_tag_rows(b"CREATE TABLE") == 0
    assert command_tag_rows(b"COPY 3") == 3
    assert command_tag_rows(b"") == 0


FRONTEND = (parse("s", "select $1") + bind("", "s", [b"42"]) + execute() + SYNC
            + query("select 1; select 2") + msg(b"d", b"x" * 300) + msg(b"c") + msg(b"H"))
BACKEND = (msg(b"1") + msg(b"2") + msg(b"T", b"\x00\x00") + data_row(b"y" * 200)
           + complete("SELECT 1") + ready() + data_row() + complete("SELECT 1")
           + data_row() + data_row()
           + complete("SELECT 2") + msg(b"N", b"SNOTICE\x00\x00") + ready())


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in [*points, len(data)]:
        out.append(data[prev:p])
        prev = p
    return [c for c in out if c]


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
       st.lists(st.integers(min_value=0, max_value=10_000), max_size=30))
@settings(max_examples=300, deadline=None)
def test_any_chunking_gives_the_same_events(fe_cuts: list[int], be_cuts: list[int]) -> None:
    whole = run([FRONTEND], [BACKEND])
    split = run(_chunks(FRONTEND, fe_cuts), _chunks(BACKEND, be_cuts))
    assert split.done == whole.done
    assert len(whole.done) == 3


@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=8))
@settings(max_examples=500, deadline=None)
def test_random_frontend_bytes_never_crash(data: bytes, cuts: list[int]) -> None:
    conv = Conversation(Recorder(), 1 << 16)
    try:
        for chunk in _chunks(data, cuts):
            conv.feed_frontend(chunk, 0.0)
    except ProtocolViolation:
        pass


@given(st.binary(max_size=400), st.integers(0, len(FRONTEND)))
@settings(max_examples=300, deadline=None)
def test_random_backend_bytes_and_truncation_never_crash(data: bytes, cut: int) -> None:
    conv = Conversation(Recorder(), 1 << 16)
    conv.feed_frontend(FRONTEND[:cut], 0.0)
    conv.feed_backend(data, 0.0)
    conv.feed_backend(BACKEND[: len(data) % (len(BACKEND) + 1)], 0.0)


@given(st.lists(st.tuples(st.sampled_from(list(b"QPBESCFXdcfDHp")), st.binary(max_size=40)),
                max_size=12),
       st.lists(st.integers(0, 600), max_size=6))
@settings(max_examples=500, deadline=None)
def test_well_framed_random_bodies_never_crash(msgs: list[tuple[int, bytes]],
                                               cuts: list[int]) -> None:
    stream = b"".join(msg(bytes([t]), body) for t, body in msgs)
    conv = Conversation(Recorder(), 1 << 16)
    try:
        for chunk in _chunks(stream, cuts):
            conv.feed_frontend(chunk, 0.0)
    except ProtocolViolation:
        pass
    conv.feed_backend(BACKEND, 1.0)


def test_strings_end_at_their_first_nul() -> None:
    """A Query's text ends at its first NUL, as the server reads it; a long statement in Parse
    is found past the short-name loop; a string without its NUL is a protocol violation."""
    long_sql = "select " + ", ".join(f"c{i}" for i in range(40)) + " from t"
    rec = run([msg(b"Q", b"select 1\x00select 2\x00"),
               parse("", long_sql) + bind("", "", []) + execute() + SYNC],
              [error("08P01") + ready() + msg(b"1") + msg(b"2") + complete("SELECT 0") + ready()])
    assert rec.done == [("select 1", 0, None, 0, "08P01"), (long_sql, 0, "SELECT 0", 0, None)]
    for bad in (msg(b"Q", b"select 1"), msg(b"P", b"\x00" + long_sql.encode()),
                msg(b"P", b"\x00select 1")):
        with pytest.raises(ProtocolViolation, match="missing string terminator"):
            Conversation(Recorder(), 1 << 20).feed_frontend(bad, 1.0)


@given(st.binary(max_size=40), st.integers(0, 45), st.integers(0, 45))
def test_decode_text_agrees_with_its_definition(data: bytes, start: int, end: int) -> None:
    # The C decoding (no copy, no codec lookup) against the Python one: up to the first NUL,
    # invalid UTF-8 replaced (the callers' bounds lie within the data, start before end).
    end = min(end, len(data))
    start = min(start, end)
    want = text_at(data, start, end)
    assert decode_text(data, start, end) == want
    assert "\x00" not in want


ANSWER_MESSAGES = st.lists(
    st.tuples(st.sampled_from(list(b"TDCZ12nNEIsSGHWt\x00")),
              st.one_of(st.binary(max_size=12), st.sampled_from([
                  b"SELECT 1\x00", b"I", b"T", b"E", b"INSERT 0 12\x00", b"SELECT 0\x00",
                  b"SELECT\x00", b"SELECT \x00", b"7\x00", b" 7\x00", b"COPY 3\x00",
                  b"SELECT 123456789012345678\x00", b"SELECT 1234567890123456789\x00"]))),
    max_size=8)


@given(ANSWER_MESSAGES, st.integers(-3, 3))
@settings(max_examples=2000, deadline=None)
def test_answer_scan_in_c_is_the_definition(msgs: list[tuple[int, bytes]], trim: int) -> None:
    """``answer_scan`` (``_sockio``) answers as ``answer_scan_at`` on framed messages of
    every kind, whole, cut short or with bytes past the end."""
    from sqlproxy.proxy import _sockio
    from sqlproxy.wire.scan import answer_scan, answer_scan_at

    assert answer_scan is _sockio.answer_scan
    data = b"".join(msg(bytes([t]), body) for t, body in msgs)
    data = data[:trim] if trim < 0 else data + b"Z" * trim
    assert answer_scan(data) == answer_scan_at(data)


@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["SELECT 1", "UPDATE 7", "BEGIN"]),
                          st.sampled_from([b"I", b"T", b"E"]), st.booleans()),
                min_size=1, max_size=5))
@settings(max_examples=500, deadline=None)
def test_whole_answers_read_as_in_pieces(answers: list[tuple[int, str, bytes, bool]]) -> None:
    """An answer read at once (``answer_scan``) gives the events and state that reading it
    byte by byte (the general loop) gives."""
    frontend = b"".join(query(f"select {i}") for i in range(len(answers)))
    backend = [msg(b"1") * extended + msg(b"T", b"\x00\x00") + data_row() * rows
               + complete(tag) + ready(status)
               for rows, tag, status, extended in answers]
    whole = Recorder()
    conv_whole = Conversation(whole, 1 << 20)
    conv_whole.feed_frontend(frontend, 1.0)
    pieces = Recorder()
    conv_pieces = Conversation(pieces, 1 << 20)
    conv_pieces.feed_frontend(frontend, 1.0)
    for answer in backend:
        conv_whole.feed_backend(answer, 2.0)
        for i in range(len(answer)):
            conv_pieces.feed_backend(answer[i : i + 1], 2.0)
        assert whole.done == pieces.done and whole.params == pieces.params
        assert (conv_whole.tx_status, conv_whole.busy, conv_whole.rows) \
            == (conv_pieces.tx_status, conv_pieces.busy, conv_pieces.rows)
    assert [d[3] for d in whole.done] == [
        int(tag.split()[-1]) if tag != "BEGIN" else rows for rows, tag, _, _ in answers]


@given(st.binary(max_size=12), st.integers(-2, 14), st.binary(max_size=6))
@settings(max_examples=1000, deadline=None)
def test_same_at_in_c_is_the_definition(data: bytes, start: int, other: bytes) -> None:
    from sqlproxy.proxy import _sockio
    from sqlproxy.wire.scan import same_at, same_at_py

    assert same_at is _sockio.same_at
    assert same_at(data, start, other) == same_at_py(data, start, other)
    if 0 <= start <= len(data):
        assert same_at(data, start, data[start : start + 3])


def test_parse_sent_again_and_a_different_one_of_the_same_length() -> None:
    """A Parse sent again reuses what the last one gave; one of the same length but other
    bytes does not."""
    rec = run([parse("", "select 1") + bind("", "", []) + execute() + msg(b"S")
               + parse("", "select 1") + bind("", "", []) + execute() + msg(b"S")
               + parse("", "select 2") + bind("", "", []) + execute() + msg(b"S")
               + parse("s", "select 3") + bind("", "s", []) + execute() + msg(b"S")],
              [msg(b"1") + msg(b"2") + complete("SELECT 1") + ready()] * 4)
    assert [d[0] for d in rec.done] == ["select 1", "select 1", "select 2", "select 3"]


@given(st.binary(max_size=40), st.integers(0, 45), st.integers(0, 45))
def test_cstring_agrees_with_its_definition(data: bytes, start: int, end: int) -> None:
    from sqlproxy.proxy import _sockio
    from sqlproxy.wire.scan import cstring, cstring_at

    assert cstring is _sockio.cstring
    end = min(end, len(data))
    start = min(start, end)
    assert cstring(data, start, end) == cstring_at(data, start, end)


def _state(conv: Conversation) -> tuple[object, ...]:
    queue = [(p.kind, p.sql, p.statement, p.params, p.portal, p.bind, p.sent)
             for p in conv.pending()]
    return (queue, dict(conv.statements), dict(conv.portals), conv.u_live, conv.u_stmt,
            conv.u_sql, conv.u_bind, conv.u_params, conv.last_name, conv.last_sql, conv.binds)


@given(st.lists(st.tuples(st.booleans(), st.sampled_from(["", "p1"]),
                          st.sampled_from(["", "s1", "s2"]), st.sampled_from(["select 1", "x"]),
                          st.lists(st.binary(max_size=4), max_size=2), st.booleans()),
                min_size=1, max_size=6))
@settings(max_examples=500, deadline=None)
def test_a_unit_framed_by_the_fast_path_reads_as_fed_whole(
        units: list[tuple[bool, str, str, str, list[bytes], bool]]) -> None:
    """``unit_sent`` (the pooled fast path's extended-protocol unit, its messages found by the
    fast path) leaves the conversation as ``feed_frontend`` of the same bytes does."""
    fed = Conversation(Recorder(), 1 << 20)
    framed = Conversation(Recorder(), 1 << 20)
    for conv in (fed, framed):  # named statements the units may bind
        conv.feed_frontend(parse("s1", "select s1") + parse("s2", "select s2") + SYNC, 0.5)
    for with_parse, portal, stmt, sql, params, describe in units:
        p = parse("", sql) if with_parse and stmt == "" else b""
        b = bind(portal, stmt, params)
        d = msg(b"D", b"P" + portal.encode() + b"\x00") if describe else b""
        e = execute(portal)
        data = p + b + d + e + SYNC
        fed.feed_frontend(data, 1.0)
        bpos = len(p)
        nul1 = data.index(b"\x00", bpos + 5)
        nul2 = data.index(b"\x00", nul1 + 1)
        epos = bpos + len(b) + len(d)
        framed.unit_sent(data, 1.0, sql if p else None, bpos, bpos + len(b), nul1, nul2, epos,
                         epos + len(e))
        assert _state(framed) == _state(fed)


def test_an_answered_query_s_request_is_reused_unless_kept() -> None:
    """The request of an answered Query serves the next Query (``Conversation.spare``), its
    text read from the new message, unless a listener that may keep it (interpreted) was
    handed it; a text is decoded only when read (``Pending.sql``)."""
    answer = complete("SELECT 1") + ready()
    conv = Conversation(None, 1 << 20)  # (no listener: nobody is handed the request)
    conv.query_sent(query("select 1"), 1.0)
    (first,) = conv.pending()
    assert len(first.raw) > 0  # not decoded yet
    conv.feed_backend(answer, 2.0)
    assert conv.spare is first and not conv.pending()
    conv.feed_frontend(query("select 'é', 2"), 3.0)
    (second,) = conv.pending()
    assert second is first and conv.spare is None
    assert second.sql == "select 'é', 2" and second.sent == 3.0 and second.index == 0
    assert len(second.raw) == 0  # decoded once, when read
    conv.feed_backend(answer, 4.0)

    rec = Recorder()  # an interpreted listener: what it is handed may be kept
    conv = Conversation(rec, 1 << 20)
    conv.query_sent(query("select 1"), 1.0)
    conv.feed_backend(answer, 2.0)
    assert conv.spare is None
    conv.query_sent(query("select 2"), 3.0)
    conv.feed_backend(answer, 4.0)
    assert [d[0] for d in rec.done] == ["select 1", "select 2"]


def test_a_passed_answer_s_record_is_held_back_only_for_plain_statements() -> None:
    """``feed_backend(..., hold=True)``: a whole answer's SELECT is recorded when
    ``record_held`` is called (after the pooled fast path gave the server back); anything
    else (a write, whose record asks what the client sent next; DEALLOCATE, whose listener
    acts on the server still held), or an answer that changes the transaction status, is
    recorded at once."""
    from sqlproxy.analysis.profiler import Profiler
    from sqlproxy.analysis.statement import SessionInfo
    from sqlproxy.config import AnalysisSection
    from sqlproxy.proxy.recorder import PooledRecorder

    class Session:
        def __init__(self) -> None:
            self.events: list[str] = []

        def statement_event(self, pending: Pending, index: int) -> None:
            self.events.append(pending.sql)

    profiler = Profiler(AnalysisSection())
    session = Session()
    conv = Conversation(PooledRecorder(profiler, session, SessionInfo(1, "p", "d", "u")),
                        1 << 20)
    row = msg(b"T", struct.pack("!h", 0)) + data_row()
    conv.query_sent(query("select 1"), 1.0)
    conv.feed_backend(row + complete("SELECT 1") + ready(), 2.0, hold=True)
    assert not conv.busy and profiler.executions == 0
    conv.record_held()
    assert profiler.executions == 1
    conv.record_held()  # (nothing held any more)
    assert profiler.executions == 1
    conv.query_sent(query("update t set a = 1"), 2.5)
    conv.feed_backend(complete("UPDATE 1") + ready(), 2.6, hold=True)
    assert profiler.executions == 2
    conv.query_sent(query("deallocate all"), 3.0)
    conv.feed_backend(complete("DEALLOCATE ALL") + ready(), 4.0, hold=True)
    assert profiler.executions == 3 and session.events == ["deallocate all"]
    conv.query_sent(query("begin"), 5.0)
    conv.feed_backend(complete("BEGIN") + ready(b"T"), 6.0, hold=True)
    assert profiler.executions == 4 and conv.tx_status == ord("T")
    conv.record_held()
    assert profiler.executions == 4
    (entry,) = [e for e in profiler.stats.select() if e.query == "select $1"]
    assert entry.calls == 1 and entry.rows == 1


@pytest.mark.parametrize("next_step", ["query_sent", "unit_sent", "feed_frontend",
                                       "feed_backend"])
def test_a_held_record_is_made_before_the_conversation_takes_anything_else(
        next_step: str) -> None:
    """A record held back past the answer (``pump.Batch`` makes it at the end of the poller's
    batch) is made before the conversation takes the client's next bytes or the server's: the
    session's records keep their order, and the request it holds is not reused first."""
    from sqlproxy.analysis.profiler import Profiler
    from sqlproxy.analysis.statement import SessionInfo
    from sqlproxy.config import AnalysisSection
    from sqlproxy.proxy.recorder import PooledRecorder

    class Session:
        def statement_event(self, *args: object) -> None:
            pass

        def parameter_status(self, name: str, value: str) -> None:
            pass

    profiler = Profiler(AnalysisSection())
    conv = Conversation(PooledRecorder(profiler, Session(), SessionInfo(1, "p", "d", "u")),
                        1 << 20)
    answer = msg(b"T", struct.pack("!h", 0)) + data_row() + complete("SELECT 1") + ready()
    conv.query_sent(query("select 1"), 1.0)
    conv.feed_backend(answer, 2.0, hold=True)
    assert profiler.executions == 0 and conv.h_entry is not None
    data = parse("", "select 2") + bind("", "", []) + execute("") + SYNC
    if next_step == "query_sent":
        conv.query_sent(query("select 2"), 3.0)
    elif next_step == "unit_sent":
        nul1 = data.index(b"\x00", len(parse("", "select 2")) + 5)
        epos = len(parse("", "select 2") + bind("", "", []))
        conv.unit_sent(data, 3.0, "select 2", epos - len(bind("", "", [])), epos, nul1,
                       nul1 + 1, epos, epos + len(execute("")))
    elif next_step == "feed_frontend":
        conv.feed_frontend(data, 3.0)
    else:
        conv.feed_backend(msg(b"S", b"application_name\x00x\x00"), 3.0)
    assert profiler.executions == 1 and conv.h_entry is None
    (entry,) = [e for e in profiler.stats.select() if e.query == "select $1"]
    assert entry.calls == 1


def test_an_answered_execute_s_request_is_reused() -> None:
    """An Execute of the unnamed portal reuses the request of the last one answered, with the
    new Bind's statement, text and parameters."""
    conv = Conversation(None, 1 << 20)
    answer = msg(b"1") + msg(b"2") + complete("SELECT 1") + ready()
    conv.feed_frontend(parse("", "select $1") + bind("", "", [b"1"]) + execute() + SYNC, 1.0)
    first = conv.pending()[0]
    conv.feed_backend(answer, 2.0)
    assert conv.x_spare is first
    conv.feed_frontend(parse("", "select $1 + 1") + bind("", "", [b"22"]) + execute() + SYNC,
                       3.0)
    second = conv.pending()[0]
    assert second is first and conv.x_spare is None
    assert (second.sql, second.sent, second.statement) == ("select $1 + 1", 3.0, b"")
    assert b"22" in second.params
