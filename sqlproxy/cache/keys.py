"""Cache keys (pure, no I/O).

A key is a digest of everything that can change the bytes the server answers a unit with:

* the database and the user (privileges, row-level security, ``current_user``);
* the session's settings: the server's ParameterStatus values (``client_encoding``,
  ``DateStyle``, ``TimeZone``, ...), the startup packet's parameters (``options=-c
  search_path=...``) and the text of every SET / RESET / ``set_config`` the session ran
  (``search_path``, ``role``, ``extra_float_digits``, ...), in order;
* the unit in *canonical form*: a simple Query's text; for the extended protocol each message
  with the names of prepared statements replaced by what they name (the statement text and
  its parameter types), so that ``__asyncpg_stmt_1__`` in one session and ``S_3`` in another
  share entries — Bind's parameter values, their formats and the result formats included.

Only units of these shapes have a key: one Query; or Parse (of the unnamed statement) /
Bind (to the unnamed portal) / Describe / Execute (unnamed portal, no row limit) / Sync, with at
least one Execute. Named Parse, Close, a named portal, Flush, FunctionCall: no key (forwarded).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from hashlib import blake2b

from sqlproxy.wire.messages import (
    F_BIND,
    F_DESCRIBE,
    F_EXECUTE,
    F_PARSE,
    F_QUERY,
    F_SYNC,
)

__all__ = ["CanonicalUnit", "binds_unnamed_first", "canonical_unit", "entry_key",
           "settings_digest", "statement_identity"]

_unpack_int32 = struct.Struct("!I").unpack_from
_pack_part = struct.Struct("!cI").pack
_STATEMENT = ord("S")
_PORTAL = ord("P")
#: ParameterStatus values that say nothing about how results are computed or encoded.
_IGNORED_PARAMETERS = frozenset({"application_name", "server_version", "in_hot_standby",
                                 "default_transaction_read_only"})
_IGNORED_STARTUP = frozenset({"application_name", "fallback_application_name", "user",
                              "database", "replication"})


@dataclass(frozen=True, slots=True)
class CanonicalUnit:
    """A unit in canonical form and the SQL texts it executes, in order."""

    data: bytes
    sqls: tuple[str, ...]
    parses_unnamed: bytes | None  # the last unnamed Parse's identity (the server's then)


def _part(t: bytes, body: bytes | bytearray | memoryview) -> bytes:
    return _pack_part(t, len(body)) + bytes(body)


def statement_identity(parse: bytes | bytearray) -> bytes:
    """What a Parse message names: its text and parameter types (its name left out)."""
    nul = parse.index(0, 5)
    return bytes(parse[nul + 1 : 1 + _unpack_int32(parse, 1)[0]])


def canonical_unit(data: bytes | bytearray, named: Mapping[bytes, bytes],
                   unnamed: bytes | None) -> CanonicalUnit | None:
    """``data`` (a unit's complete messages) in canonical form, or None when the unit has
    no key (see the module docstring). ``named`` maps the session's prepared statements to
    their identities; ``unnamed`` is the unnamed statement's before this unit."""
    out = bytearray()
    sqls: list[str] = []
    executes = 0
    pos = 0
    n = len(data)
    parsed: bytes | None = None
    try:
        while pos < n:
            t = data[pos]
            end = pos + 1 + _unpack_int32(data, pos + 1)[0]
            if t == F_QUERY:
                if pos != 0 or end != n:
                    return None
                text = bytes(data[5 : end - 1])
                return CanonicalUnit(_part(b"Q", text), (text.decode("utf-8", "replace"),),
                                     None)
            if t == F_PARSE:
                if data[pos + 5] != 0:
                    return None  # a named statement: forwarded, then known by its identity
                ident = statement_identity(data[pos:end])
                unnamed = parsed = ident
                out += _part(b"P", ident)
            elif t == F_BIND:
                nul = data.index(0, pos + 5)
                if nul != pos + 5:
                    return None  # a named portal
                nul2 = data.index(0, nul + 1)
                name = bytes(data[nul + 1 : nul2])
                bound = unnamed if not name else named.get(name)
                if bound is None:
                    return None
                out += _part(b"B", bound)
                out += _part(b"b", data[nul2 + 1 : end])
                sqls.append(bound[: bound.index(0)].decode("utf-8", "replace"))
            elif t == F_DESCRIBE:
                kind = data[pos + 5]
                name = bytes(data[pos + 6 : end - 1])
                if kind == _PORTAL and not name:
                    out += _part(b"D", b"P")
                elif kind == _STATEMENT:
                    described = unnamed if not name else named.get(name)
                    if described is None:
                        return None
                    out += _part(b"D", b"S" + described)
                else:
                    return None
            elif t == F_EXECUTE:
                if data[pos + 5] != 0 or _unpack_int32(data, pos + 6)[0] != 0:
                    return None  # a named portal, or a row limit (PortalSuspended)
                executes += 1
                out += b"E"
            elif t == F_SYNC:
                if end != n:
                    return None
                out += b"S"
            else:
                return None
            pos = end
    except (ValueError, IndexError, struct.error):
        return None
    if not executes or not data or data[n - 5] != F_SYNC:
        return None
    return CanonicalUnit(bytes(out), tuple(sqls), parsed)


def binds_unnamed_first(data: bytes | bytearray) -> bool:
    """Does this unit use the unnamed statement before (or without) parsing it anew?"""
    pos = 0
    n = len(data)
    try:
        while pos < n:
            t = data[pos]
            end = pos + 1 + _unpack_int32(data, pos + 1)[0]
            if t == F_QUERY:
                return False
            if t == F_PARSE and data[pos + 5] == 0:
                return False
            if t == F_BIND:
                nul = data.index(0, pos + 5)
                if data[nul + 1] == 0:
                    return True
            if t == F_DESCRIBE and data[pos + 5] == _STATEMENT and data[pos + 6] == 0:
                return True
            pos = end
    except (ValueError, IndexError, struct.error):
        return False
    return False


def settings_digest(parameters: Mapping[str, str], startup: Mapping[str, str],
                    sets: Iterable[str]) -> bytes:
    """A digest of the settings that can change a result (see the module docstring)."""
    h = blake2b(digest_size=16)
    for k in sorted(parameters):
        if k not in _IGNORED_PARAMETERS:
            h.update(f"{k}={parameters[k]}\x00".encode())
    h.update(b"\x01")
    for k in sorted(startup):
        if k not in _IGNORED_STARTUP:
            h.update(f"{k}={startup[k]}\x00".encode())
    h.update(b"\x01")
    for s in sets:
        h.update(s.encode())
        h.update(b"\x00")
    return h.digest()


def entry_key(database: str, user: str, settings: bytes, unit: bytes) -> bytes:
    """The store key of a unit's answer."""
    h = blake2b(digest_size=20)
    h.update(database.encode())
    h.update(b"\x00")
    h.update(user.encode())
    h.update(b"\x00")
    h.update(settings)
    h.update(unit)
    return h.digest()
