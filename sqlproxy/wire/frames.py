"""Cutting a byte stream into typed protocol v3 messages: one place, one length check.

Every typed message is a type byte, an int32 length that counts itself (so at least 4) and
that many bytes minus four. A length word below 4 or above what the reader allows is a protocol
violation, whichever side sent it: a server's message is checked as strictly as a client's
(a corrupt length from either would otherwise make the proxy wait for, or buffer, gigabytes).

``frame_end`` is the primitive, for loops that walk a buffer in place without slicing it;
``Frames`` keeps the incomplete tail between chunks and hands out whole messages, for the
places that read every message anyway (startup, authentication, a routed session's units).
"""

from __future__ import annotations

import struct

from sqlproxy.errors import ProtocolViolation

__all__ = ["MAX_SERVER_MESSAGE", "Frames", "frame_end"]

_unpack_int32 = struct.Struct("!I").unpack_from

#: PostgreSQL's own bound on a message it sends (a 1 GB field plus the row around it).
MAX_SERVER_MESSAGE = (1 << 30) + (1 << 20)


def frame_end(buf: bytes | bytearray, pos: int, limit: int, what: str = "message") -> int:
    """The offset just past the message that starts at ``pos``, or -1 while ``buf`` does not
    hold all of it yet. Raises ProtocolViolation if its length word is below 4 or above
    ``limit``."""
    n = len(buf)
    if n - pos < 5:
        return -1
    length = _unpack_int32(buf, pos + 1)[0]
    if length < 4 or length > limit:
        raise ProtocolViolation(
            f"invalid {what} length {length} for message type {chr(buf[pos])!r}")
    end = pos + 1 + length
    return end if end <= n else -1


class Frames:
    """The whole messages of a stream fed in chunks, as (type, message with header) pairs."""

    __slots__ = ("buf", "limit", "what")

    def __init__(self, limit: int, what: str = "message") -> None:
        self.buf = bytearray()
        self.limit = limit
        self.what = what

    def feed(self, data: bytes | bytearray) -> list[tuple[int, bytes]]:
        """The messages completed by ``data``; the tail of an incomplete one is kept for the
        next call. Raises ProtocolViolation at a bad length word (the stream is then
        unusable: nothing after it can be framed)."""
        buf = self.buf
        buf += data
        out: list[tuple[int, bytes]] = []
        pos = 0
        try:
            while (end := frame_end(buf, pos, self.limit, self.what)) >= 0:
                out.append((buf[pos], bytes(buf[pos:end])))
                pos = end
        finally:
            del buf[:pos]
        return out

    def take_rest(self) -> bytes:
        """Whatever is buffered (an incomplete message), emptying the buffer."""
        rest = bytes(self.buf)
        self.buf.clear()
        return rest

    def __len__(self) -> int:
        return len(self.buf)
