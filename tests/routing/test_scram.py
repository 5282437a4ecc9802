"""SCRAM-SHA-256 pass-through, unit level: a client and a server built from RFC 5802 here."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

import pytest

from sqlproxy.routing.scram import (
    ScramCapture,
    ScramClient,
    ScramError,
    ScramVerifier,
    derive_keys,
    keys_from_password,
)


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.digest(key, msg, "sha256")


def verifier_text(password: str, salt: bytes, iterations: int) -> str:
    k = keys_from_password(password, salt, iterations)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(k.stored_key)}:{b64(k.server_key)}"


class Server:
    """The server side of one exchange, from the verifier only."""

    def __init__(self, verifier: ScramVerifier) -> None:
        self.v = verifier
        self.nonce = base64.b64encode(os.urandom(18)).decode()

    def first(self, client_first: bytes) -> str:
        self.client_first_bare = client_first.decode().split(",", 2)[2]
        cnonce = dict(p.split("=", 1) for p in self.client_first_bare.split(","))["r"]
        self.server_first = (f"r={cnonce}{self.nonce},s={base64.b64encode(self.v.salt).decode()}"
                             f",i={self.v.iterations}")
        return self.server_first

    def final(self, client_final: bytes) -> str:
        without, _, proof = client_final.decode().rpartition(",p=")
        auth = f"{self.client_first_bare},{self.server_first},{without}".encode()
        client_key = bytes(a ^ b for a, b in zip(base64.b64decode(proof),
                                                  _hmac(self.v.stored_key, auth), strict=True))
        if hashlib.sha256(client_key).digest() != self.v.stored_key:
            return "e=invalid-proof"
        return "v=" + base64.b64encode(_hmac(self.v.server_key, auth)).decode()


def exchange(client: ScramClient, server: Server, capture: ScramCapture | None = None) -> str:
    initial = client.initial_response()
    if capture is not None:
        capture.client_message(initial)
    server_first = server.first(initial[initial.index(b"\x00") + 5 :])
    if capture is not None:
        capture.server_message(11, server_first.encode())
    final = client.final_message(server_first)
    if capture is not None:
        capture.client_message(final)
    server_final = server.final(final)
    client.verify_final(server_final)
    if capture is not None:
        capture.server_message(12, server_final.encode())
        capture.server_message(0, b"")
    return server_final


def test_client_key_recovered_from_a_relayed_exchange() -> None:
    salt = os.urandom(16)
    verifier = ScramVerifier.parse(verifier_text("s3cret", salt, 4096))
    capture = ScramCapture()
    exchange(ScramClient(password="s3cret"), Server(verifier), capture)
    assert capture.complete
    keys = derive_keys(capture, verifier)
    assert keys.client_key == keys_from_password("s3cret", salt, 4096).client_key
    # ...and authenticates to another server with the same verifier, without the password.
    assert exchange(ScramClient(keys=keys), Server(verifier)).startswith("v=")


def test_wrong_or_changed_verifier_is_refused() -> None:
    salt = os.urandom(16)
    verifier = ScramVerifier.parse(verifier_text("pw", salt, 4096))
    capture = ScramCapture()
    exchange(ScramClient(password="pw"), Server(verifier), capture)
    other = ScramVerifier.parse(verifier_text("other", salt, 4096))
    with pytest.raises(ScramError, match="StoredKey"):
        derive_keys(capture, other)
    changed = ScramVerifier.parse(verifier_text("pw", os.urandom(16), 4096))
    with pytest.raises(ScramError, match="password changed"):
        derive_keys(capture, changed)
    # A replica whose verifier has another salt cannot be authenticated with these keys.
    keys = derive_keys(capture, verifier)
    with pytest.raises(ScramError, match="differs"):
        exchange(ScramClient(keys=keys), Server(changed))


def test_impostor_server_signature_is_refused() -> None:
    verifier = ScramVerifier.parse(verifier_text("pw", os.urandom(16), 4096))
    client = ScramClient(password="pw")
    server = Server(verifier)
    initial = client.initial_response()
    client.final_message(server.first(initial[initial.index(b"\x00") + 5 :]))
    with pytest.raises(ScramError, match="signature"):
        client.verify_final("v=" + base64.b64encode(b"x" * 32).decode())
    with pytest.raises(ScramError, match="invalid-proof"):
        client.verify_final("e=invalid-proof")


def test_incomplete_or_malformed() -> None:
    capture = ScramCapture()
    verifier = ScramVerifier.parse(verifier_text("pw", b"salt", 4096))
    with pytest.raises(ScramError):
        derive_keys(capture, verifier)
    with pytest.raises(ScramError):
        ScramVerifier.parse("md5abcdef")
    with pytest.raises(ScramError):
        capture.client_message(b"SCRAM-SHA-256")
    client = ScramClient(password="pw")
    with pytest.raises(ScramError, match="nonce"):
        client.final_message("r=someone-else,s=c2FsdA==,i=4096")
