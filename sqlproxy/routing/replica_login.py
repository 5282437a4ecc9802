"""Logging a routed session's user in to a replica (sans-IO).

The proxy opens replica connections itself, as the client's user and database, after the client
authenticated against the primary. Credentials, in order: the client's SCRAM keys recovered
from its exchange with the primary (``keys``, see ``routing.scram``), or
``routing.passwords[user]``; trust needs neither. MD5 and clear-text passwords need the
configured password.

``ReplicaLogin.receive`` takes the server's startup-phase messages one at a time and returns
what to send back; ``done`` / ``problem`` say how it ended, ``key`` is the connection's
BackendKeyData (for cancel requests). After ``done`` the bytes that follow are the session's.
"""

from __future__ import annotations

import hashlib
import struct

from sqlproxy.routing.scram import ScramClient, ScramError, ScramKeys
from sqlproxy.wire.messages import (
    AUTH_CLEARTEXT_PASSWORD,
    AUTH_MD5_PASSWORD,
    AUTH_OK,
    AUTH_SASL,
    AUTH_SASL_CONTINUE,
    AUTH_SASL_FINAL,
    B_AUTHENTICATION,
    B_BACKEND_KEY_DATA,
    B_ERROR_RESPONSE,
    B_READY_FOR_QUERY,
    build,
    cstr,
    error_summary,
)

__all__ = ["ReplicaLogin"]

_unpack_int32 = struct.Struct("!I").unpack_from


def _password_message(body: bytes) -> bytes:
    return build(b"p", body)


class ReplicaLogin:
    """The startup/authentication exchange of one replica connection."""

    __slots__ = ("_scram", "done", "key", "keys", "md5_hash", "password", "problem", "user")

    def __init__(self, user: str, password: str | None, keys: ScramKeys | None = None,
                 md5_hash: str | None = None) -> None:
        self.user = user
        self.password = password
        self.keys = keys
        self.md5_hash = md5_hash  # the stored "md5..." hash (pool.auth_user): MD5 logins
        self.done = False  # ReadyForQuery received: the connection is the session's
        self.problem: str | None = None  # why it failed (then nothing more is sent)
        self.key: tuple[int, bytes] | None = None
        self._scram: ScramClient | None = None

    @property
    def finished(self) -> bool:
        return self.done or self.problem is not None

    def receive(self, t: int, msg: bytes) -> bytes:
        """One whole server message (header included); returns what to send (maybe b"")."""
        if self.finished:
            return b""
        body = msg[5:]
        if t == B_AUTHENTICATION:
            try:
                return self._auth(body)
            except (ScramError, UnicodeDecodeError, struct.error) as exc:
                self.problem = f"SCRAM authentication failed: {exc}"
        elif t == B_BACKEND_KEY_DATA and len(body) >= 8:
            self.key = (_unpack_int32(body, 0)[0], body[4:])
        elif t == B_ERROR_RESPONSE:
            self.problem = error_summary(body)
        elif t == B_READY_FOR_QUERY:
            self.done = True
        return b""

    def _fail(self, problem: str) -> bytes:
        self.problem = problem
        return b""

    def _auth(self, body: bytes) -> bytes:
        code = _unpack_int32(body, 0)[0]
        if code == AUTH_OK:
            return b""
        pw = self.password
        if code == AUTH_SASL:
            if b"SCRAM-SHA-256\x00" not in body[4:]:
                return self._fail("authentication: no supported SASL mechanism")
            if self.keys is not None:
                self._scram = ScramClient(keys=self.keys)
            elif pw is not None:
                self._scram = ScramClient(password=pw)
            else:
                return self._fail("password required: SCRAM keys not derivable and no "
                                  "routing.passwords entry for this user")
            return _password_message(self._scram.initial_response())
        if code == AUTH_SASL_CONTINUE and self._scram is not None:
            return _password_message(self._scram.final_message(body[4:].decode()))
        if code == AUTH_SASL_FINAL and self._scram is not None:
            self._scram.verify_final(body[4:].decode())
            return b""
        if code not in (AUTH_CLEARTEXT_PASSWORD, AUTH_MD5_PASSWORD):
            return self._fail(f"authentication: unsupported authentication request {code}")
        if pw is None and (self.md5_hash is None or code != AUTH_MD5_PASSWORD):
            return self._fail("password required (no routing.passwords entry for this user)")
        if code == AUTH_CLEARTEXT_PASSWORD:
            assert pw is not None
            return _password_message(cstr(pw))
        salt = body[4:8]
        inner = (self.md5_hash[3:].encode() if pw is None and self.md5_hash is not None
                 else hashlib.md5((str(pw) + self.user).encode()).hexdigest().encode())
        return _password_message(cstr("md5" + hashlib.md5(inner + salt).hexdigest()))
