"""A routed session's backend-to-client direction, without a server: swallow, strip, hold,
release, retry."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sqlproxy.errors import ProtocolViolation
from sqlproxy.routing.answers import HOLD_LIMIT, Answers, Event, Kind, should_retry
from sqlproxy.wire.messages import build, error_response

RFQ = build(b"Z", b"I")
ROWS = build(b"T", b"\x00\x00") + build(b"D", b"\x00\x00") + build(b"C", b"SELECT 1\x00")
PARSE_OK = build(b"1", b"")


def error(sqlstate: str) -> bytes:
    return error_response(sqlstate, "boom", severity="ERROR")


def test_primary_passes_chunks_through_untouched() -> None:
    a = Answers(replica=False)
    assert a.feed(ROWS + RFQ) == [Event(Kind.DELIVER, ROWS + RFQ)]


def test_primary_swallows_injected_answers_then_streams() -> None:
    a = Answers(replica=False)
    a.swallow = 1
    data = PARSE_OK + RFQ + ROWS + RFQ
    events = []
    for i in range(0, len(data), 4):  # in small chunks
        events += a.feed(data[i : i + 4])
    assert b"".join(e.data for e in events if e.kind is Kind.DELIVER) == ROWS + RFQ
    assert not a.busy and not a.replay_failed


def test_primary_replay_error_is_reported_not_delivered() -> None:
    a = Answers(replica=False)
    a.swallow = 1
    events = a.feed(error("26000") + RFQ + ROWS)
    assert events == [Event(Kind.DELIVER, ROWS)]
    assert a.replay_failed and len(a.swallow_errors) == 1


def test_primary_strips_our_own_syncs_ready_for_query() -> None:
    a = Answers(replica=False)
    a.strip = 1
    describe = build(b"1", b"") + build(b"t", b"\x00\x00") + build(b"n", b"")
    events = a.feed(describe + RFQ + ROWS)
    assert events == [Event(Kind.DELIVER, describe), Event(Kind.TRACK, RFQ),
                      Event(Kind.DELIVER, ROWS)]
    assert a.strip == 0


def test_replica_holds_the_answer_until_ready_for_query() -> None:
    a = Answers(replica=True)
    a.start_unit(hold=True)
    assert a.feed(ROWS) == []
    assert a.feed(RFQ) == [Event(Kind.UNIT_DONE)]
    assert a.error is None and a.take_hold() == ROWS + RFQ


def test_replica_error_is_noted_for_the_retry_decision() -> None:
    a = Answers(replica=True)
    a.start_unit(hold=True)
    assert a.feed(error("25006") + RFQ) == [Event(Kind.UNIT_DONE)]
    assert a.error == "25006"
    assert should_retry(a.error, a.replay_failed, in_transaction=False)
    assert not should_retry(a.error, a.replay_failed, in_transaction=True)
    assert not should_retry("23505", False, in_transaction=False)
    assert should_retry(None, True, in_transaction=False)


def test_replica_releases_a_big_answer_and_streams_the_rest() -> None:
    a = Answers(replica=True)
    a.start_unit(hold=True)
    row = build(b"D", b"x" * 1000)
    events = []
    for _ in range(HOLD_LIMIT // 1000 + 2):
        events += a.feed(row)
        if events:
            break
    assert events == [Event(Kind.RELEASE)]
    assert len(a.take_hold()) > HOLD_LIMIT
    assert a.feed(row + RFQ) == [Event(Kind.DELIVER, row + RFQ), Event(Kind.STREAM_DONE)]


def test_streaming_replica_unit_delivers_as_it_comes() -> None:
    a = Answers(replica=True)
    a.start_unit(hold=False)
    assert a.feed(ROWS) == [Event(Kind.DELIVER, ROWS)]
    assert a.feed(RFQ) == [Event(Kind.DELIVER, RFQ), Event(Kind.STREAM_DONE)]


def test_idle_replica_error_is_not_the_clients() -> None:
    a = Answers(replica=True)
    events = a.feed(error("57P01"))
    assert [e.kind for e in events] == [Kind.IDLE_ERROR]


def test_a_bad_length_from_a_server_is_a_protocol_violation() -> None:
    a = Answers(replica=True)
    a.start_unit(hold=True)
    with pytest.raises(ProtocolViolation):
        a.feed(b"D\x00\x00\x00\x02")


@given(st.binary(max_size=400), st.booleans(), st.integers(0, 2), st.integers(0, 2))
def test_arbitrary_bytes_never_crash(data: bytes, replica: bool, swallow: int,
                                     strip: int) -> None:
    a = Answers(replica=replica)
    a.swallow, a.strip = swallow, strip
    if replica:
        a.start_unit(hold=True)
    with contextlib.suppress(ProtocolViolation):
        a.feed(data)
