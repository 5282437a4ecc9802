"""Cutting a routed session's client messages into units (sans-IO).

A *unit* is what the router sends to one backend as a whole: one simple-protocol Query, or the
extended-protocol messages up to a Sync. A Flush ends a unit early: the client waits for answers
before it sends the rest, so the rest (up to the Sync) must follow to the same backend (an
*open* unit). One exception is Parse/Describe/Close then Flush without a Bind — how asyncpg
prepares a statement — which is *describe only*: the primary answers it, and the Bind/Execute
that follows is routed on its own.

The cutter only records what the router must know of each unit (statement texts, the named
statements it binds, describes and closes); it decodes nothing else and never copies the
client's bytes more than into the unit's own buffer.
"""

from __future__ import annotations

from sqlproxy.errors import ProtocolViolation
from sqlproxy.wire.frames import Frames
from sqlproxy.wire.messages import (
    F_BIND,
    F_CLOSE,
    F_DESCRIBE,
    F_EXECUTE,
    F_FLUSH,
    F_FUNCTION_CALL,
    F_PARSE,
    F_QUERY,
    F_SYNC,
)

__all__ = ["Unit", "UnitCutter", "cut_units", "lone_statement"]

_STATEMENT = ord("S")  # Describe/Close of a statement (not a portal)


class Unit:
    """One routed unit: the client's raw messages and what the router must know of them."""

    __slots__ = (
        "binds",
        "closes",
        "data",
        "describe_only",
        "describes",
        "has_query",
        "in_tx",
        "open",
        "parses",
        "queries",
        "sent",
        "tables",
        "unknown",
    )

    def __init__(self) -> None:
        self.data: bytes | bytearray = bytearray()
        self.queries: list[str] = []  # simple Query texts
        self.parses: list[tuple[bytes, str, bytes]] = []  # (name, sql, whole Parse message)
        self.binds: list[bytes] = []  # statement names bound
        self.describes: list[bytes] = []  # statement names described
        self.closes: list[bytes] = []  # statement names closed
        self.has_query = False
        self.open = False  # ended by Flush: the rest follows until Sync
        self.describe_only = False  # Parse/Describe/Close then Flush (see the module doc)
        self.unknown = False  # an Execute of an earlier portal, a FunctionCall
        self.sent = 0.0
        self.in_tx = False  # sent inside a transaction block: never retried elsewhere
        self.tables: frozenset[str] = frozenset()  # what it reads (read_your_writes = "table")

    @property
    def parsed_names(self) -> frozenset[bytes]:
        return frozenset(name for name, _, _ in self.parses)


def _cstring(msg: bytes, start: int) -> bytes:
    return msg[start : msg.index(0, start)]


class UnitCutter:
    """Builds units from complete client messages (framed by ``wire.frames``)."""

    __slots__ = ("current",)

    def __init__(self) -> None:
        self.current = Unit()

    @property
    def empty(self) -> bool:
        """Nothing of a unit received yet (a bare Flush then concerns earlier units)."""
        return not self.current.data

    def add(self, t: int, msg: bytes) -> Unit | None:
        """Add one message (type ``t``, header included); return the unit it completes.
        Raises ProtocolViolation for a message whose strings are not terminated."""
        try:
            return self._add(t, msg)
        except (ValueError, IndexError) as exc:
            raise ProtocolViolation(f"invalid message of type {chr(t)!r}: {exc}") from exc

    def _add(self, t: int, msg: bytes) -> Unit | None:
        unit = self.current
        unit.data += msg
        if t == F_PARSE:
            nul = msg.index(0, 5)
            sql = _cstring(msg, nul + 1).decode("utf-8", "replace")
            unit.parses.append((msg[5:nul], sql, msg))
        elif t == F_BIND:
            nul = msg.index(0, 5)
            unit.binds.append(_cstring(msg, nul + 1))
        elif t == F_EXECUTE:
            if not unit.binds:
                unit.unknown = True
        elif t == F_DESCRIBE:
            if msg[5] == _STATEMENT:
                unit.describes.append(_cstring(msg, 6))
        elif t == F_CLOSE:
            if msg[5] == _STATEMENT:
                unit.closes.append(_cstring(msg, 6))
        elif t == F_QUERY:
            unit.queries.append(_cstring(msg, 5).decode("utf-8", "replace"))
            unit.has_query = True
            return self._end()
        elif t == F_FUNCTION_CALL:
            unit.unknown = True
            return self._end()
        elif t == F_SYNC:
            return self._end()
        elif t == F_FLUSH:
            if not unit.binds and not unit.unknown and not unit.has_query:
                unit.describe_only = True  # (asyncpg prepares this way)
            else:
                unit.open = True
            return self._end()
        return None

    def _end(self) -> Unit:
        unit = self.current
        self.current = Unit()
        return unit


def lone_statement(unit: Unit, statements: dict[bytes, tuple[str, bytes]],
                   unnamed: bool) -> str | None:
    """The text of ``unit``'s one statement — its one Query, or the statement its one Bind
    binds, parsed in the unit or before (``statements``: the session's, by name) — or None
    for any other unit, and for a Bind of the unnamed statement unless ``unnamed``. What the
    routed fast paths learn a route for (``fastplan.learn``, ``poolroute.learn``)."""
    if unit.has_query:
        if len(unit.queries) != 1 or unit.parses or unit.binds:
            return None
        return unit.queries[0]
    if len(unit.binds) != 1 or len(unit.parses) > 1 or not (unnamed or unit.binds[0]):
        return None
    if unit.parses:
        name, sql, _ = unit.parses[0]
        return sql if name == unit.binds[0] else None
    known = statements.get(unit.binds[0])
    return None if known is None else known[0]


def cut_units(data: bytes, max_message: int) -> list[Unit]:
    """The whole units in ``data`` (client messages, as received), in order; raises
    ProtocolViolation for a malformed message."""
    cutter = UnitCutter()
    out: list[Unit] = []
    for t, msg in Frames(max_message).feed(data):
        unit = cutter.add(t, msg)
        if unit is not None:
            out.append(unit)
    return out

