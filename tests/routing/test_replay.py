"""Replaying a routed session's settings and named statements on another backend."""

from __future__ import annotations

from sqlproxy.routing.replay import BackendReplay, Replay
from sqlproxy.routing.units import Unit
from sqlproxy.wire.frames import Frames
from sqlproxy.wire.messages import SYNC, build


def parse_msg(name: bytes, sql: str) -> bytes:
    return build(b"P", name + b"\x00" + sql.encode() + b"\x00\x00\x00")


def unit(*, parses: tuple[tuple[bytes, str], ...] = (), binds: tuple[bytes, ...] = (),
         closes: tuple[bytes, ...] = (), query: bool = False) -> Unit:
    u = Unit()
    u.parses = [(n, sql, parse_msg(n, sql)) for n, sql in parses]
    u.binds = list(binds)
    u.closes = list(closes)
    u.has_query = query
    return u


def kinds(data: bytes) -> str:
    return "".join(chr(t) for t, _ in Frames(1 << 20).feed(data))


def test_a_statement_prepared_elsewhere_is_parsed_first() -> None:
    replay = Replay()
    primary, replica = BackendReplay(), BackendReplay(fresh=True)
    replay.sent(primary, unit(parses=((b"s1", "select $1"),)), [primary, replica])
    pre, injected, prepared = replay.preamble(replica, unit(binds=(b"s1",)))
    assert kinds(pre) == "PS" and injected == 1 and prepared == {b"s1": "select $1"}
    assert pre.startswith(parse_msg(b"s1", "select $1")) and pre.endswith(SYNC)
    # Now it is there: nothing more to replay.
    assert replay.preamble(replica, unit(binds=(b"s1",))) == (b"", 0, {})


def test_dry_run_changes_nothing() -> None:
    replay = Replay()
    a, b = BackendReplay(), BackendReplay()
    replay.sent(a, unit(parses=((b"s", "select 1"),)), [a, b])
    first = replay.preamble(b, unit(binds=(b"s",)), dry_run=True)
    assert first[0] and replay.preamble(b, unit(binds=(b"s",)), dry_run=True) == first


def test_closed_statements_are_closed_on_the_other_backends() -> None:
    replay = Replay()
    a, b = BackendReplay(), BackendReplay()
    replay.sent(a, unit(parses=((b"s", "select 1"),)), [a, b])
    replay.preamble(b, unit(binds=(b"s",)))  # b has it too now
    replay.sent(a, unit(closes=(b"s",)), [a, b])
    assert b.to_close == {b"s"} and b"s" not in replay.statements
    pre, injected, _ = replay.preamble(b, unit())
    assert kinds(pre) == "CS" and injected == 1 and b.prepared == {} and not b.to_close


def test_a_redefined_name_is_closed_before_it_is_parsed_again() -> None:
    replay = Replay()
    a, b = BackendReplay(), BackendReplay()
    replay.sent(a, unit(parses=((b"s", "select 1"),)), [a, b])
    replay.preamble(b, unit(binds=(b"s",)))
    replay.sent(a, unit(parses=((b"s", "select 2"),)), [a, b])  # closed and re-parsed on a
    pre, _, prepared = replay.preamble(b, unit(binds=(b"s",)))
    assert kinds(pre) == "CPS" and prepared == {b"s": "select 2"}


def test_settings_replayed_in_order_and_reset_after_discard_all() -> None:
    replay = Replay()
    a, b = BackendReplay(), BackendReplay(fresh=True)
    replay.note_setting("set work_mem = '8MB'")
    replay.note_setting("set search_path = app")
    replay.transaction_ended(a, committed=True)
    pre, injected, _ = replay.preamble(b, unit())
    assert pre == build(b"Q", b"set work_mem = '8MB'; set search_path = app\x00")
    assert injected == 1
    replay.forget_statements("discard all", a, [a, b])
    replay.transaction_ended(a, committed=True)
    assert replay.settings == [] and replay.settings_gen == 1
    pre, _, _ = replay.preamble(b, unit())
    assert pre == build(b"Q", b"RESET ALL\x00")


def test_failed_or_rolled_back_settings_are_dropped() -> None:
    replay = Replay()
    a = BackendReplay()
    replay.note_setting("set work_mem = '8MB'")
    replay.transaction_ended(a, committed=False)
    replay.note_setting("set x.y = 1")
    replay.rolled_back()
    replay.transaction_ended(a, committed=True)
    assert replay.settings == []


def test_deallocate_forgets_one_statement_everywhere() -> None:
    replay = Replay()
    a, b = BackendReplay(), BackendReplay()
    replay.sent(a, unit(parses=((b"keep", "select 1"), (b"drop", "select 2"))), [a, b])
    replay.preamble(b, unit(binds=(b"keep", b"drop")))
    replay.forget_statements('deallocate "drop"', a, [a, b])
    assert set(replay.statements) == {b"keep"} and set(a.prepared) == {b"keep"}
    assert b.to_close == {b"drop"}
    replay.forget_statements("deallocate all", a, [a, b])
    assert replay.statements == {} and a.prepared == {} and b.to_close == {b"keep", b"drop"}


def test_a_query_drops_the_unnamed_statement() -> None:
    replay = Replay()
    a = BackendReplay()
    replay.sent(a, unit(parses=((b"", "select 1"),)), [a])
    replay.sent(a, unit(query=True), [a])
    assert b"" not in replay.statements and b"" not in a.prepared
