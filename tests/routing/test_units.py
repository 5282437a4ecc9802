"""Cutting a routed session's client messages into units, without a server."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sqlproxy.errors import ProtocolViolation
from sqlproxy.routing.units import Unit, UnitCutter
from sqlproxy.wire.frames import Frames
from sqlproxy.wire.messages import build

Q = lambda sql: build(b"Q", sql.encode() + b"\x00")  # noqa: E731
SYNC = build(b"S", b"")
FLUSH = build(b"H", b"")


def parse(name: bytes, sql: str) -> bytes:
    return build(b"P", name + b"\x00" + sql.encode() + b"\x00\x00\x00")


def bind(stmt: bytes, portal: bytes = b"") -> bytes:
    return build(b"B", portal + b"\x00" + stmt + b"\x00" + b"\x00\x00\x00\x00\x00\x00")


def describe(kind: bytes, name: bytes) -> bytes:
    return build(b"D", kind + name + b"\x00")


def close(kind: bytes, name: bytes) -> bytes:
    return build(b"C", kind + name + b"\x00")


EXECUTE = build(b"E", b"\x00\x00\x00\x00\x00")


def cut(*messages: bytes) -> tuple[list[Unit], UnitCutter]:
    cutter = UnitCutter()
    units = []
    for t, msg in Frames(1 << 20).feed(b"".join(messages)):
        unit = cutter.add(t, msg)
        if unit is not None:
            units.append(unit)
    return units, cutter


def test_a_query_is_a_unit() -> None:
    (u,), cutter = cut(Q("select 1"))
    assert u.queries == ["select 1"] and u.has_query and bytes(u.data) == Q("select 1")
    assert cutter.empty


def test_extended_messages_up_to_sync() -> None:
    msgs = (parse(b"s1", "select $1"), bind(b"s1"), describe(b"P", b""), EXECUTE, SYNC)
    (u,), _ = cut(*msgs)
    assert u.parses == [(b"s1", "select $1", msgs[0])]
    assert u.binds == [b"s1"] and u.describes == [] and not u.unknown
    assert bytes(u.data) == b"".join(msgs) and u.parsed_names == {b"s1"}


def test_flush_opens_a_unit_unless_it_only_describes() -> None:
    (u,), _ = cut(parse(b"s", "select 1"), describe(b"S", b"s"), FLUSH)
    assert u.describe_only and not u.open and u.describes == [b"s"]
    (u,), _ = cut(bind(b"s"), EXECUTE, FLUSH)
    assert u.open and not u.describe_only


def test_execute_without_bind_and_function_call_are_unknown() -> None:
    (u,), _ = cut(EXECUTE, SYNC)
    assert u.unknown
    (u,), _ = cut(build(b"F", b"\x00\x00\x00\x01" + b"\x00" * 8))
    assert u.unknown


def test_close_of_a_statement_is_noted_not_of_a_portal() -> None:
    (u,), _ = cut(close(b"S", b"a"), close(b"P", b"p"), SYNC)
    assert u.closes == [b"a"]


def test_pipelined_units_and_partial_tail() -> None:
    units, cutter = cut(Q("select 1"), Q("select 2"), parse(b"", "select 3"), bind(b""))
    assert [u.queries for u in units] == [["select 1"], ["select 2"]]
    assert not cutter.empty  # the Parse/Bind wait for their Sync


def test_unterminated_strings_are_a_protocol_violation() -> None:
    with pytest.raises(ProtocolViolation):
        UnitCutter().add(ord("Q"), build(b"Q", b"select 1"))
    with pytest.raises(ProtocolViolation):
        UnitCutter().add(ord("P"), build(b"P", b"name"))


@given(st.lists(st.sampled_from([Q("select 1"), SYNC, FLUSH, parse(b"x", "select 1"),
                                 bind(b"x"), EXECUTE, describe(b"S", b"x"), close(b"S", b"x")]),
                max_size=30))
def test_units_hold_every_byte_in_order(messages: list[bytes]) -> None:
    units, cutter = cut(*messages)
    assert b"".join(bytes(u.data) for u in units) + bytes(cutter.current.data) \
        == b"".join(messages)


@given(st.binary(max_size=200))
def test_arbitrary_message_bodies_never_crash(body: bytes) -> None:
    for t in b"QPBDCEFSH":
        with contextlib.suppress(ProtocolViolation):
            UnitCutter().add(t, build(bytes([t]), body))
