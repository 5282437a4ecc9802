from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sqlproxy.errors import ProtocolViolation
from sqlproxy.wire.messages import (
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    cancel_request,
    error_response,
    parse_error_fields,
    parse_startup_packet,
    startup_message,
)


def test_startup_roundtrip() -> None:
    raw = startup_message({"user": "u", "database": "d", "application_name": "a"})
    msg = parse_startup_packet(raw)
    assert isinstance(msg, StartupMessage)
    assert (msg.user, msg.database, msg.application_name) == ("u", "d", "a")
    assert msg.raw == raw


def test_special_requests() -> None:
    assert isinstance(parse_startup_packet(struct.pack("!II", 8, 80877103)), SSLRequest)
    assert isinstance(parse_startup_packet(struct.pack("!II", 8, 80877104)), GSSENCRequest)
    c = parse_startup_packet(cancel_request(1234, b"abcd"))
    assert c == CancelRequest(1234, b"abcd")
    long_key = parse_startup_packet(cancel_request(7, b"k" * 32))  # protocol 3.2 key
    assert long_key == CancelRequest(7, b"k" * 32)


@pytest.mark.parametrize("packet,match", [
    (struct.pack("!II", 8, 2 << 16), "unsupported frontend protocol"),
    (startup_message({"database": "d"}), "no PostgreSQL user"),
    (struct.pack("!II", 9, 196608) + b"u", "terminator"),
    (b"\x00\x00\x00\x04", "too short"),
])
def test_bad_startup_packets(packet: bytes, match: str) -> None:
    with pytest.raises(ProtocolViolation, match=match):
        parse_startup_packet(packet)


def test_error_response_fields() -> None:
    raw = error_response("08P01", "bad things", detail="more")
    assert raw[:1] == b"E"
    fields = parse_error_fields(raw[5:])
    assert fields["C"] == "08P01" and fields["M"] == "bad things" and fields["D"] == "more"


@given(st.binary(min_size=8, max_size=300))
def test_random_startup_packets_never_crash(data: bytes) -> None:
    packet = struct.pack("!I", len(data) + 4) + data
    with contextlib.suppress(ProtocolViolation):
        parse_startup_packet(packet)
