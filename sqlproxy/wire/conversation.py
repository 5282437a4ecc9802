"""Sans-IO tracking of one client/server conversation after startup.

The proxy forwards bytes untouched; this module only *observes* both directions to know what the
proxy must know: which statement each response belongs to, how long it took, how many rows it
moved, whether it failed, and the transaction status.

How responses are attributed
----------------------------
The frontend side appends a ``Pending`` entry to a FIFO for every message that will produce a
statement result or a ReadyForQuery: Query, Execute, FunctionCall and Sync. Parse/Bind/Describe/
Close produce acknowledgements ('1', '2', '3', 't', 'T', 'n') that need no bookkeeping.

The backend side consumes the FIFO:

* CommandComplete / EmptyQueryResponse / PortalSuspended finish the head Execute, or the next
  statement of the head Query (a multi-statement Query string gets one CommandComplete per
  statement and one ReadyForQuery at the end).
* ErrorResponse fails the head Execute (or the current statement of a Query) and then, in the
  extended protocol, the server skips everything up to the next Sync: every Execute before the
  next Sync in the FIFO is dropped without a result, exactly as the server drops them.
* ReadyForQuery pops entries up to and including the Sync, Query or FunctionCall it answers.

A statement's duration runs from the moment its request left for the server, or from the
completion of the previous statement if that was later. Pipelined statements are executed one
after the other by the server, so this gives each its own share instead of charging the whole
pipeline's wait to the last one.

The hot loops walk frame headers in place with ``struct.unpack_from`` on the received buffer and
never slice a message they merely count (DataRow) or ignore. Only a message whose body we need and
that straddles two reads is buffered, in a ``bytearray`` that grows by appending.
"""

from __future__ import annotations

import struct
from collections import deque
from enum import IntEnum
from typing import Protocol

from sqlproxy.errors import ProtocolViolation
from sqlproxy.wire.messages import (
    B_COMMAND_COMPLETE,
    B_COPY_BOTH_RESPONSE,
    B_COPY_IN_RESPONSE,
    B_COPY_OUT_RESPONSE,
    B_DATA_ROW,
    B_EMPTY_QUERY_RESPONSE,
    B_ERROR_RESPONSE,
    B_PARAMETER_STATUS,
    B_PORTAL_SUSPENDED,
    B_READY_FOR_QUERY,
    F_BIND,
    F_CLOSE,
    F_EXECUTE,
    F_FUNCTION_CALL,
    F_PARSE,
    F_QUERY,
    F_SYNC,
    F_TERMINATE,
    FRONTEND_TYPES,
    command_tag_rows,
    parse_error_fields,
)

_unpack_int32 = struct.Struct("!I").unpack_from

# Backend message types whose bodies the tracker reads.
_BACKEND_INTERESTING = frozenset(
    {
        B_COMMAND_COMPLETE, B_EMPTY_QUERY_RESPONSE, B_ERROR_RESPONSE, B_PORTAL_SUSPENDED,
        B_READY_FOR_QUERY, B_PARAMETER_STATUS, B_COPY_IN_RESPONSE, B_COPY_OUT_RESPONSE,
        B_COPY_BOTH_RESPONSE,
    }
)
# Frontend message types whose bodies the tracker reads.
_FRONTEND_INTERESTING = frozenset({F_QUERY, F_PARSE, F_BIND, F_EXECUTE, F_CLOSE, F_SYNC,
                                   F_FUNCTION_CALL, F_TERMINATE})

MAX_NAMED = 10_000  # bound on remembered prepared statements / portals per connection


class PendingKind(IntEnum):
    QUERY = 1
    EXECUTE = 2
    SYNC = 3
    FUNCTION_CALL = 4


class CopyMode(IntEnum):
    NONE = 0
    IN = 1
    OUT = 2
    BOTH = 3


class Pending:
    """One request awaiting its result."""

    __slots__ = ("index", "kind", "params", "portal", "rows", "sent", "sql", "statement")

    def __init__(self, kind: PendingKind, sql: str, sent: float, statement: str = "",
                 params: int = 0, portal: str = "") -> None:
        self.kind = kind
        self.sql = sql
        self.sent = sent
        self.statement = statement  # prepared statement name for EXECUTE
        self.params = params  # digest of the Bind parameter values (0 when none)
        self.index = 0  # next statement of a multi-statement Query
        self.portal = portal
        self.rows = 0


class ConversationListener(Protocol):
    """What the session wants to hear about. Called synchronously from ``feed_*``."""

    def statement_done(
        self,
        pending: Pending,
        index: int,
        tag: bytes | None,
        rows: int,
        sqlstate: str | None,
        started: float,
        ended: float,
    ) -> None: ...

    def parameter_status(self, name: str, value: str) -> None: ...


class Conversation:
    """Observes both directions of one session after startup (see the module docstring)."""

    __slots__ = (
        "_be_buf", "_be_skip", "_be_want", "_fe_buf", "_fe_skip", "_fe_want", "_last_end",
        "_portal_rows", "_portals", "_rows", "copy_mode", "listener", "max_message", "pending",
        "statements", "terminated", "tx_status",
    )

    def __init__(self, listener: ConversationListener | None, max_message: int) -> None:
        self.listener = listener
        self.max_message = max_message
        self.pending: deque[Pending] = deque()
        self.statements: dict[str, str] = {}  # prepared statement name -> SQL text
        self._portals: dict[str, tuple[str, str, int]] = {}  # portal -> (stmt name, sql, params)
        self._portal_rows: dict[str, tuple[int, float]] = {}  # suspended portal carry
        self.tx_status = ord("I")
        self.copy_mode = CopyMode.NONE
        self.terminated = False
        self._fe_buf = bytearray()
        self._fe_want = 0  # bytes still missing from the buffered frontend message
        self._fe_skip = 0  # bytes of an uninteresting frontend message still to skip
        self._be_buf = bytearray()
        self._be_want = 0
        self._be_skip = 0
        self._rows = 0  # DataRows since the last completion
        self._last_end = 0.0

    # ------------------------------------------------------------------ state queries
    @property
    def busy(self) -> bool:
        """True while the server owes a response (a query is in flight)."""
        return bool(self.pending) or self.copy_mode != CopyMode.NONE

    # ------------------------------------------------------------------ frontend side
    def feed_frontend(self, data: bytes, now: float) -> None:
        """Observe bytes sent by the client. Raises ProtocolViolation on malformed framing."""
        n = len(data)
        pos = 0
        if self._fe_skip:
            if n <= self._fe_skip:
                self._fe_skip -= n
                return
            pos = self._fe_skip
            self._fe_skip = 0
        elif self._fe_want or self._fe_buf:
            pos = self._fe_resume(data, now)
            if pos < 0:
                return
        max_message = self.max_message
        while pos < n:
            if n - pos < 5:
                self._fe_buf += data[pos:]
                self._fe_want = 0
                return
            t = data[pos]
            ln = _unpack_int32(data, pos + 1)[0]
            if t not in FRONTEND_TYPES:
                raise ProtocolViolation(f"invalid frontend message type {t}")
            if ln < 4 or ln > max_message:
                raise ProtocolViolation(
                    f"invalid message length {ln} for message type {chr(t)!r}"
                    + (f" (max_message_bytes is {max_message})" if ln > max_message else "")
                )
            end = pos + 1 + ln
            if t in _FRONTEND_INTERESTING:
                if end > n:
                    self._fe_buf += data[pos:]
                    self._fe_want = end - n
                    return
                self._frontend_message(t, data, pos + 5, end, now)
            elif end > n:
                self._fe_skip = end - n
                return
            pos = end

    def _fe_resume(self, data: bytes, now: float) -> int:
        """Complete a buffered frontend message; returns the position after it, or -1."""
        buf = self._fe_buf
        if not self._fe_want:
            # Only a partial header was buffered: prepend it and re-scan from the start.
            need = 5 - len(buf)
            if len(data) < need:
                buf += data
                return -1
            buf += data[:need]
            t = buf[0]
            ln: int = _unpack_int32(buf, 1)[0]
            if t not in FRONTEND_TYPES:
                raise ProtocolViolation(f"invalid frontend message type {t}")
            if ln < 4 or ln > self.max_message:
                raise ProtocolViolation(f"invalid message length {ln} for message type {chr(t)!r}")
            rest = ln - 4
            if t not in _FRONTEND_INTERESTING:
                self._fe_buf = bytearray()
                if len(data) - need < rest:
                    self._fe_skip = rest - (len(data) - need)
                    return -1
                return need + rest
            self._fe_want = rest
            if rest == 0:
                self._fe_buf = bytearray()
                self._frontend_message(t, bytes(buf), 5, 5, now)
                self._fe_want = 0
                return need
            data_pos = need
        else:
            data_pos = 0
        want = self._fe_want
        avail = len(data) - data_pos
        if avail < want:
            buf += data[data_pos:]
            self._fe_want = want - avail
            return -1
        buf += data[data_pos : data_pos + want]
        self._fe_buf = bytearray()
        self._fe_want = 0
        msg = bytes(buf)
        self._frontend_message(msg[0], msg, 5, len(msg), now)
        return data_pos + want

    def _frontend_message(self, t: int, data: bytes, start: int, end: int, now: float) -> None:
        if t == F_EXECUTE:
            nul = data.index(b"\x00", start, end)
            portal = data[start:nul].decode() if nul > start else ""
            stmt, sql, params = self._portals.get(portal, ("", "", 0))
            self.pending.append(Pending(PendingKind.EXECUTE, sql, now, stmt, params, portal))
        elif t == F_SYNC:
            self.pending.append(Pending(PendingKind.SYNC, "", now))
        elif t == F_BIND:
            nul1 = data.index(b"\x00", start, end)
            nul2 = data.index(b"\x00", nul1 + 1, end)
            portal = data[start:nul1].decode() if nul1 > start else ""
            stmt = data[nul1 + 1 : nul2].decode() if nul2 > nul1 + 1 else ""
            portals = self._portals
            if len(portals) >= MAX_NAMED and portal not in portals:
                portals.clear()
            portals[portal] = (stmt, self.statements.get(stmt, ""), hash(data[nul2 + 1 : end]))
        elif t == F_PARSE:
            nul1 = data.index(b"\x00", start, end)
            nul2 = data.index(b"\x00", nul1 + 1, end)
            name = data[start:nul1].decode() if nul1 > start else ""
            statements = self.statements
            if len(statements) >= MAX_NAMED and name not in statements:
                del statements[next(iter(statements))]
            statements[name] = data[nul1 + 1 : nul2].decode("utf-8", "replace")
        elif t == F_QUERY:
            sql = data[start : end - 1].decode("utf-8", "replace")
            self.pending.append(Pending(PendingKind.QUERY, sql, now))
        elif t == F_CLOSE:
            kind = data[start]
            name = data[start + 1 : end - 1].decode()
            if kind == 83:  # 'S'
                self.statements.pop(name, None)
            else:
                self._portals.pop(name, None)
        elif t == F_FUNCTION_CALL:
            self.pending.append(Pending(PendingKind.FUNCTION_CALL, "", now))
        elif t == F_TERMINATE:
            self.terminated = True

    # ------------------------------------------------------------------ backend side
    def feed_backend(self, data: bytes, now: float) -> None:
        """Observe bytes sent by the server."""
        n = len(data)
        pos = 0
        if self._be_skip:
            if n <= self._be_skip:
                self._be_skip -= n
                return
            pos = self._be_skip
            self._be_skip = 0
        elif self._be_want or self._be_buf:
            pos = self._be_resume(data, now)
            if pos < 0:
                return
        rows = 0
        while pos < n:
            if n - pos < 5:
                self._be_buf += data[pos:]
                self._be_want = 0
                break
            t = data[pos]
            end = pos + 1 + _unpack_int32(data, pos + 1)[0]
            if t == B_DATA_ROW:
                rows += 1
                if end > n:
                    self._be_skip = end - n
                    break
            elif t in _BACKEND_INTERESTING:
                if end > n:
                    self._be_buf += data[pos:]
                    self._be_want = end - n
                    break
                self._rows += rows
                rows = 0
                self._backend_message(t, data, pos + 5, end, now)
            elif end > n:
                self._be_skip = end - n
                break
            pos = end
        self._rows += rows

    def _be_resume(self, data: bytes, now: float) -> int:
        buf = self._be_buf
        if not self._be_want:
            need = 5 - len(buf)
            if len(data) < need:
                buf += data
                return -1
            buf += data[:need]
            t = buf[0]
            rest: int = _unpack_int32(buf, 1)[0] - 4
            if t not in _BACKEND_INTERESTING:
                self._be_buf = bytearray()
                if t == B_DATA_ROW:
                    self._rows += 1
                if len(data) - need < rest:
                    self._be_skip = rest - (len(data) - need)
                    return -1
                return need + rest
            self._be_want = rest
            if rest <= 0:
                self._be_buf = bytearray()
                self._be_want = 0
                self._backend_message(t, bytes(buf), 5, 5, now)
                return need
            data_pos = need
        else:
            data_pos = 0
        want = self._be_want
        avail = len(data) - data_pos
        if avail < want:
            buf += data[data_pos:]
            self._be_want = want - avail
            return -1
        buf += data[data_pos : data_pos + want]
        self._be_buf = bytearray()
        self._be_want = 0
        msg = bytes(buf)
        self._backend_message(msg[0], msg, 5, len(msg), now)
        return data_pos + want

    def _backend_message(self, t: int, data: bytes, start: int, end: int, now: float) -> None:
        if t == B_COMMAND_COMPLETE:
            tag = data[start : end - 1]
            self._complete(tag, None, now)
            self.copy_mode = CopyMode.NONE
        elif t == B_READY_FOR_QUERY:
            self.tx_status = data[start]
            self.copy_mode = CopyMode.NONE
            pending = self.pending
            while pending:
                kind = pending.popleft().kind
                if kind != PendingKind.EXECUTE:
                    break
            self._rows = 0
        elif t == B_ERROR_RESPONSE:
            fields = parse_error_fields(data[start:end])
            self._fail(fields.get("C", "XX000"), now)
            self.copy_mode = CopyMode.NONE
        elif t == B_EMPTY_QUERY_RESPONSE:
            self._complete(None, None, now)
        elif t == B_PORTAL_SUSPENDED:
            self._suspend(now)
        elif t == B_PARAMETER_STATUS:
            if self.listener is not None:
                nul = data.index(b"\x00", start, end)
                self.listener.parameter_status(
                    data[start:nul].decode("utf-8", "replace"),
                    data[nul + 1 : end - 1].decode("utf-8", "replace"),
                )
        elif t == B_COPY_IN_RESPONSE:
            self.copy_mode = CopyMode.IN
        elif t == B_COPY_OUT_RESPONSE:
            self.copy_mode = CopyMode.OUT
        elif t == B_COPY_BOTH_RESPONSE:
            self.copy_mode = CopyMode.BOTH

    def _head(self) -> Pending | None:
        pending = self.pending
        # A stale Sync at the head cannot own a statement result; results belong to the first
        # Execute/Query/FunctionCall in the queue.
        for entry in pending:
            if entry.kind != PendingKind.SYNC:
                return entry
            break
        return None

    def _complete(self, tag: bytes | None, sqlstate: str | None, now: float) -> None:
        head = self._head()
        rows = self._rows
        self._rows = 0
        if head is None:
            return
        started = head.sent if head.sent > self._last_end else self._last_end
        self._last_end = now
        if tag is not None:
            tag_rows = command_tag_rows(tag)
            if tag_rows:
                rows = tag_rows
        if head.kind == PendingKind.EXECUTE:
            self.pending.popleft()
            carry = self._portal_rows.pop(head.portal, None) if self._portal_rows else None
            if carry is not None:
                rows += carry[0]
                started -= carry[1]
            if self.listener is not None:
                self.listener.statement_done(head, 0, tag, rows, sqlstate, started, now)
        else:
            index = head.index
            head.index = index + 1
            if self.listener is not None:
                self.listener.statement_done(head, index, tag, rows, sqlstate, started, now)

    def _suspend(self, now: float) -> None:
        """PortalSuspended: the Execute ends, the portal's statement goes on in a later one."""
        head = self._head()
        rows = self._rows
        self._rows = 0
        if head is None or head.kind != PendingKind.EXECUTE:
            return
        self.pending.popleft()
        started = head.sent if head.sent > self._last_end else self._last_end
        self._last_end = now
        prev = self._portal_rows.get(head.portal, (0, 0.0))
        self._portal_rows[head.portal] = (prev[0] + rows, prev[1] + (now - started))

    def _fail(self, sqlstate: str, now: float) -> None:
        head = self._head()
        if head is None:
            self._rows = 0
            return
        self._complete(None, sqlstate, now)
        if head.kind == PendingKind.EXECUTE:
            # The server now skips to Sync: so do we.
            pending = self.pending
            while pending and pending[0].kind == PendingKind.EXECUTE:
                pending.popleft()
            self._portal_rows.pop(head.portal, None)
