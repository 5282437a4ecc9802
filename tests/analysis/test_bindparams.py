"""Reading Bind parameter values: OFFSET $n and captured examples."""

from __future__ import annotations

import struct

from sqlproxy.analysis.bindparams import bound_integer, bound_texts, offset_parameter


def body(formats: list[int], values: list[bytes | None]) -> bytes:
    out = struct.pack("!h", len(formats)) + b"".join(struct.pack("!h", f) for f in formats)
    out += struct.pack("!h", len(values))
    for v in values:
        out += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    return out + struct.pack("!h", 0)  # result format codes


def test_offset_parameter_number() -> None:
    assert offset_parameter("SELECT * FROM t ORDER BY id LIMIT $1 OFFSET $2") == 2
    assert offset_parameter("select * from t offset 5") is None


def test_bound_integer_text_and_binary() -> None:
    assert bound_integer(body([], [b"10", b"25000"]), 2) == 25000
    assert bound_integer(body([1], [struct.pack("!q", 7), struct.pack("!i", 30000)]), 2) == 30000
    assert bound_integer(body([0, 1], [b"x", struct.pack("!h", 3)]), 2) == 3
    assert bound_integer(body([], [None]), 1) is None
    assert bound_integer(body([], [b"abc"]), 1) is None
    assert bound_integer(body([], [b"1"]), 3) is None
    assert bound_integer(b"\x00\x01", 1) is None  # truncated: no crash


def test_bound_texts() -> None:
    assert bound_texts(body([], [b"it's", None, b"5"])) == ("'it''s'", "NULL", "'5'")
    assert bound_texts(body([1], [struct.pack("!i", 5)])) is None
