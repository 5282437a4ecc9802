"""Logging in to a replica, driven by a scripted server (no PostgreSQL)."""

from __future__ import annotations

import hashlib
import struct

from sqlproxy.routing.replica_login import ReplicaLogin
from sqlproxy.wire.messages import build, error_response


def auth(code: int, rest: bytes = b"") -> bytes:
    return build(b"R", struct.pack("!I", code) + rest)


def feed(login: ReplicaLogin, *messages: bytes) -> list[bytes]:
    return [login.receive(m[0], m) for m in messages]


def test_trust_then_key_and_ready() -> None:
    login = ReplicaLogin("app", None)
    replies = feed(login, auth(0), build(b"S", b"a\x00b\x00"),
                   build(b"K", struct.pack("!I", 4242) + b"sekr"), build(b"Z", b"I"))
    assert replies == [b"", b"", b"", b""]
    assert login.done and login.problem is None and login.key == (4242, b"sekr")


def test_md5_password() -> None:
    login = ReplicaLogin("app", "pw")
    (reply,) = feed(login, auth(5, b"salt"))
    inner = hashlib.md5(b"pwapp").hexdigest().encode()
    assert reply == build(b"p", b"md5" + hashlib.md5(inner + b"salt").hexdigest().encode()
                          + b"\x00")


def test_cleartext_password_and_missing_password() -> None:
    assert feed(ReplicaLogin("app", "pw"), auth(3)) == [build(b"p", b"pw\x00")]
    login = ReplicaLogin("app", None)
    feed(login, auth(3))
    assert login.problem is not None and "password required" in login.problem


def test_scram_without_credentials_or_mechanism() -> None:
    login = ReplicaLogin("app", None)
    feed(login, auth(10, b"SCRAM-SHA-256\x00\x00"))
    assert login.problem is not None and "SCRAM keys" in login.problem
    login = ReplicaLogin("app", "pw")
    feed(login, auth(10, b"OTHER\x00\x00"))
    assert login.problem == "authentication: no supported SASL mechanism"


def test_scram_exchange_starts_with_a_client_first_message() -> None:
    login = ReplicaLogin("app", "pw")
    (reply,) = feed(login, auth(10, b"SCRAM-SHA-256\x00\x00"))
    assert reply[:1] == b"p" and b"SCRAM-SHA-256\x00" in reply and b"n,,n=" in reply
    feed(login, auth(11, b"garbage"))
    assert login.problem is not None and login.problem.startswith("SCRAM authentication failed")


def test_server_error_ends_the_login() -> None:
    login = ReplicaLogin("app", "pw")
    feed(login, error_response("28P01", 'password authentication failed for user "app"'))
    assert login.problem == '28P01: password authentication failed for user "app"'
    assert login.finished and feed(login, build(b"Z", b"I")) == [b""] and not login.done


def test_unsupported_request() -> None:
    login = ReplicaLogin("app", "pw")
    feed(login, auth(7))
    assert login.problem == "authentication: unsupported authentication request 7"
