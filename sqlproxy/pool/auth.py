"""The server's side of a login, played by the proxy (``pool.auth_user``, as PgBouncer's
``auth_query``): sans-IO, one exchange per client.

With the user's verifier read from the server (``proxy/authquery.py``), the proxy checks the
client's password proof itself instead of passing the login through to a fresh server
connection, and keeps what the proof reveals to log in to the server as that user later:

* SCRAM-SHA-256 (RFC 5802, RFC 7677): the verifier ``SCRAM-SHA-256$i:salt$StoredKey:ServerKey``
  lets the proxy send the server-first-message (its salt and iteration count) and check the
  client-final-message: ``ClientKey = ClientProof XOR HMAC(StoredKey, AuthMessage)`` must hash to
  ``StoredKey``. The recovered ``ClientKey`` authenticates new server connections for the user by
  SCRAM (``routing.scram.ScramClient`` with keys: the pass-through replicas use too). The proxy
  answers with ``ServerSignature = HMAC(ServerKey, AuthMessage)``, so the client knows it
  talked to someone holding the verifier.
* MD5: the stored ``md5`` hash is what the client's answer is computed from, and what a new
  server login needs (``ReplicaLogin`` with the hash).

A wrong password is ``FATAL 28P01 password authentication failed for user "..."``, worded as
the server words it. Channel binding (SCRAM-SHA-256-PLUS) is not offered: the proxy's TLS
session with the client is not the server's.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct

from sqlproxy.errors import ProtocolViolation, ProxyError
from sqlproxy.routing.scram import (
    MECHANISM,
    ScramError,
    ScramKeys,
    ScramVerifier,
)
from sqlproxy.wire.messages import build

__all__ = ["LoginServer", "PasswordFailed", "password_failed"]

_int32 = struct.Struct("!I").pack
AUTH_MD5_PASSWORD = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


class PasswordFailed(ProxyError):
    sqlstate = "28P01"


def password_failed(user: str) -> PasswordFailed:
    """The error PostgreSQL sends for a wrong password (and for an unknown user)."""
    return PasswordFailed(f'password authentication failed for user "{user}"')


def _attrs(message: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in message.split(","):
        key, sep, value = part.partition("=")
        if sep and len(key) == 1:
            out.setdefault(key, value)
    return out


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class LoginServer:
    """One client's authentication against a verifier (``rolpassword``).

    ``start()`` is the first Authentication request to send; each PasswordMessage body goes to
    ``receive``, which returns what to send back. Once ``done``, the client is authenticated
    (the caller sends AuthenticationOk and the rest of the startup) and ``scram_keys`` or
    ``md5_hash`` say how to log in to the server as the user. Raises ``PasswordFailed`` for a
    wrong password and ``ProtocolViolation`` for a malformed exchange.
    """

    def __init__(self, user: str, verifier: str, nonce: bytes | None = None) -> None:
        self.user = user
        self.done = False
        self.scram_keys: ScramKeys | None = None
        self.md5_hash: str | None = None
        self._scram: ScramVerifier | None = None
        self._md5: str | None = None
        self._salt = os.urandom(4)
        self._nonce = _b64(nonce if nonce is not None else os.urandom(18))
        self._client_first_bare: str | None = None
        self._server_first: str | None = None
        self._gs2: str = ""
        if verifier.startswith("md5") and len(verifier) == 35:
            self._md5 = verifier
        else:
            try:
                self._scram = ScramVerifier.parse(verifier)
            except ScramError:
                raise ValueError("not a SCRAM-SHA-256 or MD5 verifier") from None

    @staticmethod
    def usable(verifier: str | None) -> bool:
        """Whether ``verifier`` is one the proxy can check a login against."""
        if not verifier:
            return False
        if verifier.startswith("md5"):
            return len(verifier) == 35
        try:
            ScramVerifier.parse(verifier)
        except ScramError:
            return False
        return True

    def start(self) -> bytes:
        if self._md5 is not None:
            return build(b"R", _int32(AUTH_MD5_PASSWORD) + self._salt)
        return build(b"R", _int32(AUTH_SASL) + MECHANISM.encode() + b"\x00\x00")

    def receive(self, body: bytes) -> bytes:
        if self.done:
            raise ProtocolViolation("unexpected password message after authentication")
        if self._md5 is not None:
            return self._md5_answer(body)
        try:
            if self._client_first_bare is None:
                return self._client_first(body)
            return self._client_final(body)
        except (UnicodeDecodeError, ValueError, struct.error) as exc:
            if isinstance(exc, ProxyError):
                raise
            raise ProtocolViolation(f"malformed SCRAM message: {exc}") from None

    # ------------------------------------------------------------------ MD5
    def _md5_answer(self, body: bytes) -> bytes:
        assert self._md5 is not None
        answer = body.rstrip(b"\x00").decode("ascii", "replace")
        expected = "md5" + hashlib.md5(self._md5[3:].encode() + self._salt).hexdigest()
        if not hmac.compare_digest(answer, expected):
            raise password_failed(self.user)
        self.md5_hash = self._md5
        self.done = True
        return b""

    # ------------------------------------------------------------------ SCRAM
    def _client_first(self, body: bytes) -> bytes:
        assert self._scram is not None
        nul = body.find(b"\x00")
        if nul < 0 or len(body) < nul + 5:
            raise ProtocolViolation("malformed SASLInitialResponse")
        if body[:nul].decode("ascii", "replace") != MECHANISM:
            raise ProtocolViolation("client selected an invalid SASL authentication mechanism")
        first = body[nul + 5 :].decode("utf-8")
        parts = first.split(",", 2)
        if len(parts) != 3 or parts[0] not in ("n", "y"):
            raise ProtocolViolation("malformed SCRAM message (channel binding is not offered)")
        self._gs2 = parts[0] + "," + parts[1] + ","
        self._client_first_bare = parts[2]
        client_nonce = _attrs(parts[2]).get("r", "")
        if not client_nonce:
            raise ProtocolViolation("malformed SCRAM message: no client nonce")
        v = self._scram
        self._server_first = f"r={client_nonce}{self._nonce},s={_b64(v.salt)},i={v.iterations}"
        return build(b"R", _int32(AUTH_SASL_CONTINUE) + self._server_first.encode())

    def _client_final(self, body: bytes) -> bytes:
        v = self._scram
        assert v is not None and self._server_first is not None
        final = body.decode("utf-8")
        without_proof, sep, proof_b64 = final.rpartition(",p=")
        attrs = _attrs(without_proof)
        if not sep or attrs.get("r") != _attrs(self._server_first)["r"]:
            raise ProtocolViolation("malformed SCRAM message: nonce or proof missing or wrong")
        if attrs.get("c") != _b64(self._gs2.encode()):
            raise ProtocolViolation("SCRAM channel binding check failed")
        auth_message = ",".join((self._client_first_bare or "", self._server_first,
                                 without_proof)).encode()
        try:
            proof = base64.b64decode(proof_b64, validate=True)
        except ValueError:
            raise ProtocolViolation("malformed SCRAM message: bad proof") from None
        signature = hmac.digest(v.stored_key, auth_message, "sha256")
        if len(proof) != len(signature):
            raise password_failed(self.user)
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), v.stored_key):
            raise password_failed(self.user)
        self.scram_keys = ScramKeys(client_key, v.stored_key, v.server_key, v.salt,
                                    v.iterations)
        self.done = True
        server_signature = hmac.digest(v.server_key, auth_message, "sha256")
        return build(b"R", _int32(AUTH_SASL_FINAL) + f"v={_b64(server_signature)}".encode())
