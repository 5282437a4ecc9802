"""Constants of protocol v3 and the few messages the proxy builds or reads itself.

Message type codes are kept as ints (``buf[i]`` on ``bytes`` yields an int), so the hot loops
compare ints with ints and never build one-byte strings.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum

from sqlproxy.errors import ProtocolViolation

# Untyped (startup-phase) request codes.
PROTOCOL_3_0 = 196608  # 3 << 16
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

# Frontend (client -> server) message types.
F_BIND = ord("B")
F_CLOSE = ord("C")
F_COPY_DATA = ord("d")
F_COPY_DONE = ord("c")
F_COPY_FAIL = ord("f")
F_DESCRIBE = ord("D")
F_EXECUTE = ord("E")
F_FLUSH = ord("H")
F_FUNCTION_CALL = ord("F")
F_PASSWORD = ord("p")  # PasswordMessage, SASLInitialResponse, SASLResponse, GSSResponse
F_PARSE = ord("P")
F_QUERY = ord("Q")
F_SYNC = ord("S")
F_TERMINATE = ord("X")

FRONTEND_TYPES = frozenset(
    {
        F_BIND, F_CLOSE, F_COPY_DATA, F_COPY_DONE, F_COPY_FAIL, F_DESCRIBE, F_EXECUTE, F_FLUSH,
        F_FUNCTION_CALL, F_PASSWORD, F_PARSE, F_QUERY, F_SYNC, F_TERMINATE,
    }
)

# Backend (server -> client) message types.
B_AUTHENTICATION = ord("R")
B_BACKEND_KEY_DATA = ord("K")
B_BIND_COMPLETE = ord("2")
B_CLOSE_COMPLETE = ord("3")
B_COMMAND_COMPLETE = ord("C")
B_COPY_DATA = ord("d")
B_COPY_DONE = ord("c")
B_COPY_IN_RESPONSE = ord("G")
B_COPY_OUT_RESPONSE = ord("H")
B_COPY_BOTH_RESPONSE = ord("W")
B_DATA_ROW = ord("D")
B_EMPTY_QUERY_RESPONSE = ord("I")
B_ERROR_RESPONSE = ord("E")
B_FUNCTION_CALL_RESPONSE = ord("V")
B_NEGOTIATE_PROTOCOL_VERSION = ord("v")
B_NO_DATA = ord("n")
B_NOTICE_RESPONSE = ord("N")
B_NOTIFICATION_RESPONSE = ord("A")
B_PARAMETER_DESCRIPTION = ord("t")
B_PARAMETER_STATUS = ord("S")
B_PARSE_COMPLETE = ord("1")
B_PORTAL_SUSPENDED = ord("s")
B_READY_FOR_QUERY = ord("Z")
B_ROW_DESCRIPTION = ord("T")

# ReadyForQuery transaction status.
TX_IDLE = ord("I")  # not in a transaction block
TX_IN_BLOCK = ord("T")  # in a transaction block
TX_FAILED = ord("E")  # in a failed transaction block

# Authentication request subtypes (the int after 'R').
AUTH_OK = 0
AUTH_CLEARTEXT_PASSWORD = 3
AUTH_MD5_PASSWORD = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

_HEADER = struct.Struct("!cI")
_INT32 = struct.Struct("!I")


class TransactionStatus(Enum):
    """The status byte of ReadyForQuery."""

    IDLE = "I"
    IN_TRANSACTION = "T"
    FAILED = "E"


TX_STATUS_BY_BYTE = {ord("I"): TransactionStatus.IDLE, ord("T"): TransactionStatus.IN_TRANSACTION,
                     ord("E"): TransactionStatus.FAILED}


def build(msg_type: bytes, body: bytes) -> bytes:
    """Frame one typed message."""
    return _HEADER.pack(msg_type, len(body) + 4) + body


def cstr(value: str) -> bytes:
    return value.encode() + b"\x00"


def error_response(
    sqlstate: str,
    message: str,
    *,
    severity: str = "FATAL",
    detail: str | None = None,
    hint: str | None = None,
    notice: bool = False,
) -> bytes:
    """An ErrorResponse (or NoticeResponse) as PostgreSQL would send it."""
    body = b"S" + cstr(severity) + b"V" + cstr(severity)
    body += b"C" + cstr(sqlstate) + b"M" + cstr(message)
    if detail:
        body += b"D" + cstr(detail)
    if hint:
        body += b"H" + cstr(hint)
    body += b"\x00"
    return build(b"N" if notice else b"E", body)


def backend_key_data(pid: int, secret: bytes) -> bytes:
    return build(b"K", _INT32.pack(pid) + secret)


def cancel_request(pid: int, secret: bytes) -> bytes:
    head = _INT32.pack(12 + len(secret)) + _INT32.pack(CANCEL_REQUEST_CODE)
    return head + _INT32.pack(pid) + secret


def ready_for_query(status: TransactionStatus = TransactionStatus.IDLE) -> bytes:
    return build(b"Z", status.value.encode())


TERMINATE = build(b"X", b"")
SYNC = build(b"S", b"")
FLUSH = build(b"H", b"")


def parse_error_fields(body: bytes | memoryview) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse body, keyed by their one-letter code."""
    raw = bytes(body)
    fields: dict[str, str] = {}
    pos = 0
    end = len(raw)
    while pos < end:
        code = raw[pos]
        if code == 0:
            break
        nul = raw.find(b"\x00", pos + 1)
        if nul < 0:
            break
        fields[chr(code)] = raw[pos + 1 : nul].decode("utf-8", "replace")
        pos = nul + 1
    return fields


def error_sqlstate(body: bytes | memoryview) -> str:
    """The SQLSTATE of an ErrorResponse body (XX000 if it has none)."""
    return parse_error_fields(body).get("C", "XX000")


def error_summary(body: bytes | memoryview) -> str:
    """``"<SQLSTATE>: <message>"`` of an ErrorResponse body, for logs."""
    fields = parse_error_fields(body)
    return f"{fields.get('C', '?')}: {fields.get('M', '')}"


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """A StartupMessage: protocol version and the parameters (user, database, options, ...)."""

    protocol: int
    parameters: dict[str, str]
    raw: bytes  # the whole packet, length included, forwarded verbatim

    @property
    def user(self) -> str:
        return self.parameters.get("user", "")

    @property
    def database(self) -> str:
        return self.parameters.get("database", "") or self.user

    @property
    def application_name(self) -> str:
        return self.parameters.get("application_name", "")


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    pid: int
    secret: bytes


StartupPacket = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest

MAX_STARTUP_PACKET = 10_000  # PostgreSQL's own limit for the startup packet


def parse_startup_packet(packet: bytes) -> StartupPacket:
    """Decode one complete untyped startup-phase packet (length prefix included)."""
    if len(packet) < 8:
        raise ProtocolViolation("invalid startup packet: too short")
    code = _INT32.unpack_from(packet, 4)[0]
    if code == SSL_REQUEST_CODE:
        if len(packet) != 8:
            raise ProtocolViolation("invalid SSLRequest length")
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        if len(packet) != 8:
            raise ProtocolViolation("invalid GSSENCRequest length")
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        if len(packet) < 16 or len(packet) > 8 + 4 + 256:
            raise ProtocolViolation("invalid CancelRequest length")
        return CancelRequest(_INT32.unpack_from(packet, 8)[0], bytes(packet[12:]))
    major = code >> 16
    if major != 3:
        raise ProtocolViolation(
            f"unsupported frontend protocol {major}.{code & 0xFFFF}: server supports 3.0 to 3.2"
        )
    body = packet[8:]
    if not body.endswith(b"\x00"):
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    parts = body[:-1].split(b"\x00")
    if parts and parts[-1] == b"":
        parts.pop()
    if len(parts) % 2:
        raise ProtocolViolation("invalid startup packet layout: parameter without a value")
    params: dict[str, str] = {}
    try:
        for i in range(0, len(parts), 2):
            params[parts[i].decode()] = parts[i + 1].decode()
    except UnicodeDecodeError as exc:
        raise ProtocolViolation("invalid startup packet: parameters are not UTF-8") from exc
    if "user" not in params or not params["user"]:
        raise ProtocolViolation("no PostgreSQL user name specified in startup packet")
    return StartupMessage(code, params, bytes(packet))


def startup_message(parameters: dict[str, str], protocol: int = PROTOCOL_3_0) -> bytes:
    body = _INT32.pack(protocol)
    for k, v in parameters.items():
        body += cstr(k) + cstr(v)
    body += b"\x00"
    return _INT32.pack(len(body) + 4) + body
