"""A minimal blocking frontend over a raw socket, for tests that need exact bytes."""

from __future__ import annotations

import socket
import struct

from sqlproxy.wire.messages import parse_error_fields, startup_message

__all__ = ["closed", "connect", "error_of", "query", "read_message", "startup",
           "startup_message", "until_ready"]


def connect(host: str, port: int, timeout: float = 10) -> socket.socket:
    return socket.create_connection((host, port), timeout=timeout)


def read_message(sock: socket.socket) -> tuple[bytes, bytes]:
    head = _read_exact(sock, 5)
    length = struct.unpack("!I", head[1:5])[0]
    return head[:1], _read_exact(sock, length - 4)


def _read_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return bytes(out)


def startup(sock: socket.socket, user: str = "postgres", database: str = "postgres") -> None:
    sock.sendall(startup_message({"user": user, "database": database}))
    until_ready(sock)


def until_ready(sock: socket.socket) -> list[tuple[bytes, bytes]]:
    """Messages up to and including ReadyForQuery; an ErrorResponse during startup raises."""
    seen = []
    while True:
        t, body = read_message(sock)
        seen.append((t, body))
        if t == b"Z":
            return seen
        if t == b"E" and len(seen) == 1 and parse_error_fields(body).get("S") == "FATAL":
            raise AssertionError(f"error: {parse_error_fields(body)}")


def query(sock: socket.socket, sql: str) -> None:
    body = sql.encode() + b"\x00"
    sock.sendall(b"Q" + struct.pack("!I", len(body) + 4) + body)


def error_of(sock: socket.socket, timeout: float = 10) -> dict[str, str]:
    """Read messages until an ErrorResponse; return its fields."""
    sock.settimeout(timeout)
    while True:
        t, body = read_message(sock)
        if t == b"E":
            return parse_error_fields(body)


def closed(sock: socket.socket, timeout: float = 10) -> bool:
    """True once the peer has closed (reads drain whatever is left)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True
