"""The one frame iterator: whole messages out, a bad length word is a ProtocolViolation,
arbitrary bytes never crash it."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sqlproxy.errors import ProtocolViolation
from sqlproxy.wire.frames import Frames, frame_end
from sqlproxy.wire.messages import build


def test_frame_end_complete_incomplete_and_bad() -> None:
    msg = build(b"Q", b"select 1\x00")
    assert frame_end(msg, 0, 1000) == len(msg)
    assert frame_end(msg[:-1], 0, 1000) == -1
    assert frame_end(msg[:4], 0, 1000) == -1  # not even a header
    assert frame_end(msg + msg, len(msg), 1000) == 2 * len(msg)
    with pytest.raises(ProtocolViolation, match="length 3 for message type 'Q'"):
        frame_end(b"Q" + struct.pack("!I", 3), 0, 1000)
    with pytest.raises(ProtocolViolation, match="invalid server message length 2000"):
        frame_end(b"D" + struct.pack("!I", 2000), 0, 1000, "server message")


def test_frames_across_chunks() -> None:
    stream = build(b"P", b"\x00select 1\x00\x00\x00") + build(b"B", b"\x00" * 8) \
        + build(b"S", b"")
    frames = Frames(1 << 20)
    got = []
    for i in range(0, len(stream), 3):
        got += frames.feed(stream[i : i + 3])
    assert [chr(t) for t, _ in got] == ["P", "B", "S"]
    assert b"".join(m for _, m in got) == stream
    assert len(frames) == 0 and frames.take_rest() == b""


def test_take_rest_returns_the_incomplete_tail() -> None:
    frames = Frames(100)
    msg = build(b"Z", b"I")
    assert frames.feed(msg + msg[:3]) == [(ord("Z"), msg)]
    assert len(frames) == 3
    assert frames.take_rest() == msg[:3]
    assert len(frames) == 0


@given(st.lists(st.tuples(st.sampled_from(b"QPBDESHCXdcfZTEN"), st.binary(max_size=40)),
                max_size=20),
       st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=30))
def test_any_valid_stream_comes_back_whole_in_any_chunking(
    messages: list[tuple[int, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(build(bytes([t]), body) for t, body in messages)
    frames = Frames(1 << 20)
    got: list[tuple[int, bytes]] = []
    pos = 0
    i = 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        got += frames.feed(stream[pos : pos + step])
        pos += step
        i += 1
    assert [(t, m[5:]) for t, m in got] == messages
    assert len(frames) == 0


@given(st.binary(max_size=300), st.integers(min_value=4, max_value=200))
def test_arbitrary_bytes_never_crash(data: bytes, limit: int) -> None:
    frames = Frames(limit)
    try:
        out = frames.feed(data)
    except ProtocolViolation:
        return  # a bad length word: the only failure there is
    for t, msg in out:
        assert msg[0] == t and 5 <= len(msg) <= limit + 1
        assert struct.unpack_from("!I", msg, 1)[0] == len(msg) - 1


@given(st.integers(min_value=0, max_value=3) | st.integers(min_value=101, max_value=2**32 - 1))
def test_a_bad_length_is_a_protocol_violation(length: int) -> None:
    with pytest.raises(ProtocolViolation):
        Frames(100).feed(b"D" + struct.pack("!I", length) + b"x" * 10)
