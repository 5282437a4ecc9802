"""SCRAM-SHA-256 pass-through: authenticate to a replica as a client that proved itself to the
primary, without knowing its password.

RFC 5802 in short: ``SaltedPassword = PBKDF2(password, salt, i)``, ``ClientKey =
HMAC(SaltedPassword, "Client Key")``, ``StoredKey = H(ClientKey)``, ``ServerKey =
HMAC(SaltedPassword, "Server Key")``. The server keeps ``StoredKey`` and ``ServerKey`` (the
verifier in ``pg_authid.rolpassword``: ``SCRAM-SHA-256$i:salt$StoredKey:ServerKey``). The client
sends ``ClientProof = ClientKey XOR HMAC(StoredKey, AuthMessage)``, where ``AuthMessage`` is
client-first-bare, server-first and client-final-without-proof joined by commas.

The proxy relays that exchange between the client and the primary, so it sees ``AuthMessage``
and ``ClientProof``. With ``StoredKey`` read from the primary's verifier (with the proxy's own
credentials), it recovers ``ClientKey = ClientProof XOR HMAC(StoredKey, AuthMessage)`` and checks
``H(ClientKey) == StoredKey``. A streaming replica has the same ``pg_authid``, hence the same
salt, iteration count and keys, so the proxy can run a fresh exchange with the replica using
``ClientKey`` where a client would derive it from the password, and check the replica's
``ServerSignature`` with ``ServerKey``. This is how PgBouncer's SCRAM pass-through works, too.

Pure functions, no I/O: the exchange is observed by the session, the verifier read by the
router.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass

__all__ = [
    "ScramCapture",
    "ScramClient",
    "ScramError",
    "ScramKeys",
    "ScramVerifier",
    "ScramWatch",
    "derive_keys",
    "keys_from_password",
]

MECHANISM = "SCRAM-SHA-256"


class ScramError(ValueError):
    """A malformed message or verifier, or keys that do not match."""


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.digest(key, msg, "sha256")


def _xor(a: bytes, b: bytes) -> bytes:
    if len(a) != len(b):
        raise ScramError("SCRAM proof of the wrong length")
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _attrs(message: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in message.split(","):
        key, sep, value = part.partition("=")
        if sep and len(key) == 1:
            out.setdefault(key, value)
    return out


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise ScramError(f"bad base64 in SCRAM message: {exc}") from None


@dataclass(frozen=True, slots=True)
class ScramVerifier:
    """A parsed ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``."""

    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    @classmethod
    def parse(cls, text: str) -> ScramVerifier:
        try:
            mech, params, keys = text.split("$")
            iterations, salt = params.split(":")
            stored, server = keys.split(":")
            if mech != MECHANISM:
                raise ValueError(mech)
            return cls(int(iterations), base64.b64decode(salt), base64.b64decode(stored),
                       base64.b64decode(server))
        except ValueError:
            raise ScramError("not a SCRAM-SHA-256 verifier") from None


@dataclass(frozen=True, slots=True)
class ScramKeys:
    """What it takes to authenticate as the user: ClientKey, and ServerKey to check the server."""

    client_key: bytes
    stored_key: bytes
    server_key: bytes
    salt: bytes  # of the verifier these keys belong to
    iterations: int


class ScramCapture:
    """The client's SCRAM exchange with the primary, as the proxy relayed it.

    Fed the client's SASLInitialResponse/SASLResponse bodies and the server's SASLContinue/
    SASLFinal/Ok, in order; ``complete`` once the primary accepted the client.
    """

    __slots__ = ("client_final", "client_first_bare", "complete", "mechanism", "server_first")

    def __init__(self) -> None:
        self.mechanism: str | None = None
        self.client_first_bare: str | None = None
        self.server_first: str | None = None
        self.client_final: str | None = None
        self.complete = False

    def client_message(self, body: bytes) -> None:
        """A 'p' message from the client during SASL authentication."""
        if self.mechanism is None:  # SASLInitialResponse: mechanism, int32 length, data
            nul = body.find(b"\x00")
            if nul < 0 or len(body) < nul + 5:
                raise ScramError("malformed SASLInitialResponse")
            self.mechanism = body[:nul].decode("ascii", "replace")
            first = body[nul + 5 :].decode("utf-8")
            # gs2-header: cbind-flag "," [authzid] "," — the bare message follows.
            parts = first.split(",", 2)
            if len(parts) != 3:
                raise ScramError("malformed client-first-message")
            self.client_first_bare = parts[2]
        elif self.client_final is None:
            self.client_final = body.decode("utf-8")

    def server_message(self, code: int, body: bytes) -> None:
        """An Authentication message from the server (code and the bytes after it)."""
        if code == 11:  # SASLContinue
            self.server_first = body.decode("utf-8")
        elif code == 0:  # AuthenticationOk
            self.complete = (self.mechanism == MECHANISM and self.client_final is not None
                             and self.server_first is not None)

    @property
    def salt_iterations(self) -> tuple[bytes, int]:
        """Salt and iteration count the primary used (to pick the right verifier)."""
        if self.server_first is None:
            raise ScramError("no server-first-message seen")
        attrs = _attrs(self.server_first)
        try:
            return _b64decode(attrs["s"]), int(attrs["i"])
        except (KeyError, ValueError):
            raise ScramError("malformed server-first-message") from None


def derive_keys(capture: ScramCapture, verifier: ScramVerifier) -> ScramKeys:
    """Recover the client's ClientKey from a completed exchange and the verifier it ran with."""
    if not capture.complete or capture.client_first_bare is None \
            or capture.server_first is None or capture.client_final is None:
        raise ScramError("SCRAM exchange incomplete")
    salt, iterations = capture.salt_iterations
    if (salt, iterations) != (verifier.salt, verifier.iterations):
        raise ScramError("the verifier is not the one the exchange used (password changed?)")
    without_proof, sep, proof_b64 = capture.client_final.rpartition(",p=")
    if not sep:
        raise ScramError("client-final-message without a proof")
    auth_message = ",".join((capture.client_first_bare, capture.server_first, without_proof))
    signature = _hmac(verifier.stored_key, auth_message.encode())
    client_key = _xor(_b64decode(proof_b64), signature)
    if not hmac.compare_digest(hashlib.sha256(client_key).digest(), verifier.stored_key):
        raise ScramError("the derived ClientKey does not match the StoredKey")
    return ScramKeys(client_key, verifier.stored_key, verifier.server_key, verifier.salt,
                     verifier.iterations)


def keys_from_password(password: str, salt: bytes, iterations: int) -> ScramKeys:
    """The keys a client derives from its password (SASLprep skipped: ASCII passwords)."""
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = _hmac(salted, b"Client Key")
    return ScramKeys(client_key, hashlib.sha256(client_key).digest(),
                     _hmac(salted, b"Server Key"), salt, iterations)


class ScramClient:
    """The client side of one SCRAM-SHA-256 exchange, with a password or with known keys."""

    def __init__(self, *, password: str | None = None, keys: ScramKeys | None = None) -> None:
        if (password is None) == (keys is None):
            raise ValueError("a password or keys, not both")
        self.password = password
        self.keys = keys
        self.nonce = base64.b64encode(os.urandom(18)).decode()
        self.client_first_bare = f"n=,r={self.nonce}"
        self._auth_message: bytes | None = None
        self._server_key: bytes | None = None

    def initial_response(self) -> bytes:
        """The body of SASLInitialResponse."""
        first = ("n,," + self.client_first_bare).encode()
        return MECHANISM.encode() + b"\x00" + len(first).to_bytes(4, "big") + first

    def final_message(self, server_first: str) -> bytes:
        """The body of SASLResponse answering the server-first-message."""
        attrs = _attrs(server_first)
        nonce = attrs.get("r", "")
        if not nonce.startswith(self.nonce) or len(nonce) <= len(self.nonce):
            raise ScramError("SCRAM nonce mismatch")
        try:
            salt, iterations = _b64decode(attrs["s"]), int(attrs["i"])
        except (KeyError, ValueError):
            raise ScramError("malformed server-first-message") from None
        keys = self.keys
        if keys is None:
            assert self.password is not None
            keys = keys_from_password(self.password, salt, iterations)
        elif (salt, iterations) != (keys.salt, keys.iterations):
            raise ScramError("the replica's SCRAM verifier differs from the primary's "
                             "(salt or iteration count)")
        without_proof = f"c=biws,r={nonce}"
        auth_message = f"{self.client_first_bare},{server_first},{without_proof}".encode()
        proof = _xor(keys.client_key, _hmac(keys.stored_key, auth_message))
        self._auth_message = auth_message
        self._server_key = keys.server_key
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify_final(self, server_final: str) -> None:
        """Check the server's signature: it knows the verifier, it is not an impostor."""
        if self._auth_message is None or self._server_key is None:
            raise ScramError("SASLFinal before SASLContinue")
        attrs = _attrs(server_final)
        if "e" in attrs:
            raise ScramError(f"server error: {attrs['e']}")
        expected = _hmac(self._server_key, self._auth_message)
        if not hmac.compare_digest(_b64decode(attrs.get("v", "")), expected):
            raise ScramError("the server's SCRAM signature is wrong")


class ScramWatch:
    """A routed session's view of its client's SCRAM exchange with the primary (startup
    only, never on the hot path): the capture, until the keys are recovered from it."""

    __slots__ = ("capture", "keys")

    def __init__(self) -> None:
        self.capture: ScramCapture | None = None
        self.keys: ScramKeys | None = None

    def server_message(self, code: int, body: bytes) -> None:
        """An Authentication message from the primary (its code, the bytes after it)."""
        if code == 10:  # AuthenticationSASL: an exchange starts
            self.capture = ScramCapture()
            return
        if self.capture is not None:
            try:
                self.capture.server_message(code, body)
            except (ScramError, UnicodeDecodeError):
                self.capture = None

    def client_message(self, body: bytes) -> None:
        """A SASLInitialResponse / SASLResponse body from the client."""
        capture = self.capture
        if capture is not None and not capture.complete:
            try:
                capture.client_message(body)
            except (ScramError, UnicodeDecodeError):
                self.capture = None

    @property
    def complete(self) -> ScramCapture | None:
        """The whole exchange, once it succeeded (and until the keys are recovered)."""
        capture = self.capture
        return capture if capture is not None and capture.complete else None

    def recovered(self, keys: ScramKeys | None) -> None:
        if keys is not None:
            self.keys = keys
            self.capture = None  # not needed any more
