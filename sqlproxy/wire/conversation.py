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

Speed
-----
This module is on the hot path of every message and is compiled with mypyc when the package is
installed (it stays valid, slower, plain Python). It is written for that: frame headers are read
in place with integer arithmetic on the received ``bytes`` (no slices, no struct tuples), message
types are plain ``int`` constants, the FIFO is a list with a head index, and a Sync shares one
immutable entry. A message whose body we need and that straddles two reads is buffered in a
``bytearray``; messages we only count (DataRow) or ignore are skipped across reads without
copying.
"""

from __future__ import annotations

from typing import Final

from mypy_extensions import i64

from sqlproxy.errors import ProtocolViolation
from sqlproxy.wire.requests import (
    EXECUTE,
    FUNCTION_CALL,
    QUERY,
    SYNC,
    ConversationListener,
    DigitShape,
    NativeListener,
    Pending,
    lazy,
)
from sqlproxy.wire.scan import (
    BE_TABLE,
    FE_TABLE,
    answer_scan,
    command_tag_rows,
    cstring,
    error_fields,
    find_nul,
    length_at,
    same_at,
    same_name,
)

# COPY sub-modes.
COPY_NONE: Final = 0
COPY_IN: Final = 1
COPY_OUT: Final = 2
COPY_BOTH: Final = 3

MAX_NAMED: Final = 10_000  # bound on remembered prepared statements / portals per connection

_SYNC_ENTRY: Final = Pending(SYNC, "", 0.0)
_NO_NAME: Final = b"\x00"  # no statement name holds a NUL: matches none


class Conversation:
    """Observes both directions of one session after startup (see the module docstring)."""

    def __init__(self, listener: ConversationListener | None, max_message: int) -> None:
        self.listener = listener
        self.native = listener if isinstance(listener, NativeListener) else None
        self.max_message: i64 = max_message
        # The FIFO: queue[head:tail] are live. Slots are reused (a list cleared and grown
        # again at every round trip would free and allocate its array each time).
        self.queue: list[Pending] = []
        self.head: i64 = 0  # index of the first live entry in ``queue``
        self.tail: i64 = 0  # index after the last
        self.statements: dict[bytes, str] = {}  # prepared statement name -> SQL text
        # portal -> (statement name, sql, bind sequence number, parameters)
        self.portals: dict[bytes, tuple[bytes, str, int, bytes]] = {}
        # The unnamed portal, which most drivers use, is kept in fields rather than in
        # ``portals`` (no tuple, no dict update per Bind).
        self.u_live = False
        self.u_stmt = b""
        self.u_sql = ""
        self.u_bind: i64 = 0
        self.u_params = b""
        # The named statement bound last and its text: a driver that prepares once binds the
        # same name over and over, found again without slicing and hashing the name.
        self.last_name = _NO_NAME
        self.last_sql = ""
        # The last Parse message's body, its statement name and text (reused when it comes
        # again, as a driver's unnamed statement does).
        self.last_parse = b""
        self.last_parse_name = b""
        self.last_parse_text = ""
        self.binds: i64 = 0
        # Suspended portals: portal -> (its Execute, rows so far, seconds so far, last suspend)
        self.portal_carry: dict[bytes, tuple[Pending, int, float, float]] = {}
        self.tx_status: i64 = 73  # 'I'
        self.copy_mode: i64 = COPY_NONE
        self.terminated = False
        self.fatal = False  # the server sent a FATAL error: it is closing the session
        self.fe_buf = bytearray()
        self.fe_want: i64 = 0  # bytes still missing from the buffered frontend message
        self.fe_skip: i64 = 0  # bytes of an ignored frontend message still to skip
        self.be_buf = bytearray()
        self.be_want: i64 = 0
        self.be_skip: i64 = 0
        self.rows: i64 = 0  # DataRows since the last completion
        self.last_end = 0.0
        self.sql_errors: i64 = 0
        # The last Query's request once answered, unless it was ``kept``: the next Query's
        # (an allocation and a deallocation less per round trip).
        self.spare: Pending | None = None
        self.x_spare: Pending | None = None  # ... and an Execute's, for the next Execute's
        # A statement's record held back (``feed_backend``'s ``hold``) until ``record_held``: the
        # request, its statement's index, rows, start and end.
        self.holding = False
        self.h_entry: Pending | None = None
        self.h_index: i64 = 0
        self.h_rows: i64 = 0
        self.h_started = 0.0
        self.h_ended = 0.0

    # ------------------------------------------------------------------ state queries
    @property
    def busy(self) -> bool:
        """True while the server owes a response (a query is in flight)."""
        return self.head < self.tail or self.copy_mode != COPY_NONE

    @property
    def receiving(self) -> bool:
        """True while a client message has arrived only in part."""
        return self.fe_skip != 0 or self.fe_want != 0 or len(self.fe_buf) > 0

    def pending(self) -> list[Pending]:
        return self.queue[self.head : self.tail]

    def next_kind(self) -> i64:
        """The kind of the first request still pending (QUERY, EXECUTE, ...), 0 if none."""
        return self.queue[self.head].kind if self.head < self.tail else 0

    def _push(self, entry: Pending) -> None:
        tail = self.tail
        if tail < len(self.queue):
            self.queue[tail] = entry
        else:
            self.queue.append(entry)
        self.tail = tail + 1

    def _pop(self) -> None:
        self.queue[self.head] = _SYNC_ENTRY  # drop the reference; the slot is reused
        self.head += 1
        if self.head >= self.tail:
            self.head = 0
            self.tail = 0
            if len(self.queue) > 1024:  # after a deep pipeline: give its slots back
                self.queue.clear()

    # ------------------------------------------------------------------ frontend side
    def feed_frontend(self, data: bytes, now: float) -> None:
        """Observe bytes sent by the client. Raises ProtocolViolation on malformed framing."""
        if self.h_entry is not None:
            self.record_held()  # first: a record held back (pump.Batch) keeps its place
        n: i64 = len(data)
        pos: i64 = 0
        end: i64 = 0
        ln: i64 = 0
        t: i64 = 0
        kind: i64 = 0
        if self.fe_skip:
            if n <= self.fe_skip:
                self.fe_skip -= n
                return
            pos = self.fe_skip
            self.fe_skip = 0
        elif self.fe_want or len(self.fe_buf) > 0:
            pos = self._fe_resume(data, now)
            if pos < 0:
                return
        max_message: i64 = self.max_message
        table = FE_TABLE
        while pos < n:
            if n - pos < 5:
                self.fe_buf += data[pos:]
                self.fe_want = 0
                return
            t = data[pos]
            ln = length_at(data, pos + 1)
            kind = table[t]
            if kind == 0 or ln < 4 or ln > max_message:
                _bad_frontend(t, ln, max_message)
            end = pos + 1 + ln
            if kind == 2:
                if end > n:
                    self.fe_buf += data[pos:]
                    self.fe_want = end - n
                    return
                self._frontend_message(t, data, pos + 5, end, now)
            elif end > n:
                self.fe_skip = end - n
                return
            pos = end

    def query_sent(self, data: bytes, now: float, shape: DigitShape | None = None,
                   value: object = None) -> None:
        """``feed_frontend`` of one whole simple Query (``data``: the message, checked by the
        caller: its length, its size within ``max_message``, its closing NUL); ``shape`` and
        ``value``: its text is of that shape, its digits' value key (``Pending.shape``)."""
        if self.h_entry is not None:
            self.record_held()  # first: a record held back (pump.Batch) keeps its place
        if self.fe_skip or self.fe_want or len(self.fe_buf) > 0:
            self.feed_frontend(data, now)
            return
        p = self._query(data, 5, len(data) - 1, now)
        if shape is not None:
            p.shape = shape
            p.value = value
        self._push(p)

    def _query(self, raw: bytes, start: i64, stop: i64, now: float) -> Pending:
        """The request of a Query whose text is ``raw[start:stop]`` (``lazy``)."""
        p = self.spare
        if p is None:
            return lazy(QUERY, raw, start, stop, now)
        self.spare = None
        p.again("", now)
        p.raw = raw
        p.start = start
        p.stop = stop
        return p

    def _fe_resume(self, data: bytes, now: float) -> int:
        """Complete a buffered frontend message; returns the position after it, or -1."""
        buf = self.fe_buf
        data_pos = 0
        if not self.fe_want:
            # Only a partial header was buffered: complete it first.
            need = 5 - len(buf)
            if len(data) < need:
                buf += data
                return -1
            buf += data[:need]
            t = buf[0]
            ln = (buf[1] << 24) | (buf[2] << 16) | (buf[3] << 8) | buf[4]
            kind = FE_TABLE[t]
            if kind == 0 or ln < 4 or ln > self.max_message:
                _bad_frontend(t, ln, self.max_message)
            rest = ln - 4
            if kind == 1:
                self.fe_buf = bytearray()
                if len(data) - need < rest:
                    self.fe_skip = rest - (len(data) - need)
                    return -1
                return need + rest
            if rest == 0:
                self.fe_buf = bytearray()
                self._frontend_message(t, bytes(buf), 5, 5, now)
                return need
            self.fe_want = rest
            data_pos = need
        want = self.fe_want
        avail = len(data) - data_pos
        if avail < want:
            buf += data[data_pos:]
            self.fe_want = want - avail
            return -1
        buf += data[data_pos : data_pos + want]
        self.fe_buf = bytearray()
        self.fe_want = 0
        msg = bytes(buf)
        self._frontend_message(msg[0], msg, 5, len(msg), now)
        return data_pos + want

    def _execute(self, data: bytes, start: i64, end: i64, now: float) -> None:
        """Execute (its body: ``data[start:end]``)."""
        if end - start < 5:
            raise ProtocolViolation("invalid Execute message")
        if data[start] == 0:  # the unnamed portal
            if self.u_live:
                spare = self.x_spare
                if spare is None:
                    pending = Pending(EXECUTE, self.u_sql, now, self.u_stmt, self.u_params,
                                      b"", self.u_bind)
                else:
                    self.x_spare = None
                    pending = spare
                    pending.again(self.u_sql, now, self.u_stmt, self.u_params, b"",
                                  self.u_bind)
            else:
                pending = Pending(EXECUTE, "", now)
        else:
            portal = data[start : find_nul(data, start, end)]
            entry = self.portals.get(portal)
            if entry is None:
                pending = Pending(EXECUTE, "", now, b"", b"", portal)
            else:
                pending = Pending(EXECUTE, entry[1], now, entry[0], entry[3], portal,
                                  entry[2])
        self._push(pending)

    def _bind(self, data: bytes, start: i64, end: i64, nul1: i64, nul2: i64,
              unnamed: str | None = None) -> None:
        """Bind (its body: ``data[start:end]``; its portal's name ends at ``nul1``, its
        statement's at ``nul2``; ``unnamed``: the unnamed statement's text, when known)."""
        self.binds += 1
        if nul2 == nul1 + 1:  # the unnamed statement
            stmt = b""
            sql = self.statements.get(stmt, "") if unnamed is None else unnamed
        elif same_name(data, nul1 + 1, nul2, self.last_name):
            stmt = self.last_name
            sql = self.last_sql
        else:
            stmt = data[nul1 + 1 : nul2]
            sql = self.statements.get(stmt, "")
            self.last_name = stmt
            self.last_sql = sql
        params = data[nul2 + 1 : end]
        if nul1 == start:  # the unnamed portal
            self.u_live = True
            self.u_stmt = stmt
            self.u_sql = sql
            self.u_bind = self.binds
            self.u_params = params
        else:
            portal = data[start:nul1]
            portals = self.portals
            if len(portals) >= MAX_NAMED and portal not in portals:
                portals.clear()
            portals[portal] = (stmt, sql, self.binds, params)

    def _parse(self, data: bytes, start: i64, end: i64) -> None:
        """Parse (its body: ``data[start:end]``)."""
        last = self.last_parse
        if len(last) == end - start and same_at(data, start, last):
            # The Parse sent last again (a driver's unnamed statement): the same name and
            # text objects (the text's hash, cached, finds it in the profiler's memo).
            name = self.last_parse_name
            text = self.last_parse_text
        else:
            nul1 = find_nul(data, start, end)
            name = data[start:nul1]
            found = cstring(data, nul1 + 1, end)
            if found is None:
                raise ProtocolViolation("invalid message format: missing string terminator")
            text = found
            self.last_parse = data[start:end]
            self.last_parse_name = name
            self.last_parse_text = text
        self._parsed(name, text)

    def _parsed(self, name: bytes, text: str) -> None:
        """The statement ``name`` is ``text`` now (a Parse)."""
        statements = self.statements
        if len(statements) >= MAX_NAMED and name not in statements:
            del statements[next(iter(statements))]
            self.last_name = _NO_NAME
        statements[name] = text
        if name == self.last_name:
            self.last_name = _NO_NAME

    def unit_sent(self, data: bytes, now: float, parse_text: str | None, bpos: i64, bend: i64,
                  nul1: i64, nul2: i64, epos: i64, eend: i64) -> None:
        """``feed_frontend`` of one whole extended-protocol unit that the caller framed,
        checked and read (the pooled fast path): an unnamed Parse of ``parse_text`` (None:
        none), one Bind at ``data[bpos:bend]`` (its portal's name ending at ``nul1``, its
        statement's at ``nul2``), Describes (of no effect here), one Execute after it at
        ``data[epos:eend]``, Sync last."""
        if self.h_entry is not None:
            self.record_held()  # first: a record held back (pump.Batch) keeps its place
        if self.fe_skip or self.fe_want or len(self.fe_buf) > 0:
            self.feed_frontend(data, now)
            return
        if parse_text is not None and self.statements.get(b"") is not parse_text:
            self._parsed(b"", parse_text)  # (a lookup costs less than a store)
        self._bind(data, bpos + 5, bend, nul1, nul2, parse_text)
        self._execute(data, epos + 5, eend, now)
        self._push(_SYNC_ENTRY)

    def _frontend_message(self, t: i64, data: bytes, start: i64, end: i64, now: float) -> None:
        if t == 69:  # 'E' Execute
            self._execute(data, start, end, now)
        elif t == 83:  # 'S' Sync
            self._push(_SYNC_ENTRY)
        elif t == 66:  # 'B' Bind
            nul1 = find_nul(data, start, end)
            self._bind(data, start, end, nul1, find_nul(data, nul1 + 1, end))
        elif t == 80:  # 'P' Parse
            self._parse(data, start, end)
        elif t == 81:  # 'Q' Query: one string, its NUL the last byte (no scan of the text)
            if end <= start or data[end - 1] != 0:
                raise ProtocolViolation("invalid message format: missing string terminator")
            self._push(self._query(data, start, end - 1, now))
        elif t == 67:  # 'C' Close
            if end - start < 2:
                raise ProtocolViolation("invalid Close message")
            name = data[start + 1 : find_nul(data, start + 1, end)]
            if data[start] == 83:  # 'S'
                self.statements.pop(name, None)
                if name == self.last_name:
                    self.last_name = _NO_NAME
            elif name:
                self.portals.pop(name, None)
            else:
                self.u_live = False
        elif t == 70:  # 'F' FunctionCall
            self._push(Pending(FUNCTION_CALL, "", now))
        elif t == 88:  # 'X' Terminate
            self.terminated = True
        elif t == 99 or t == 102:  # 'c' CopyDone, 'f' CopyFail
            # The server ignores a Sync that reaches it during COPY FROM STDIN; libpq sends
            # one right after the Execute of a COPY in the extended protocol (it cannot know it
            # is a COPY) and another after CopyDone. Forget those it will not answer.
            queue = self.queue
            if (
                self.copy_mode == COPY_IN
                and self.head < self.tail
                and queue[self.head].kind == EXECUTE
            ):
                i = self.head + 1
                while i < self.tail and queue[i].kind == SYNC:
                    del queue[i]
                    self.tail -= 1

    # ------------------------------------------------------------------ backend side
    def feed_backend(self, data: bytes, now: float, hold: bool = False) -> None:
        """Observe bytes sent by the server.

        ``hold`` (the pooled fast path, which passes chunks on as they came): the record of the
        one statement a whole answer ends, with no change of transaction status, is held back
        for ``record_held``, to be called next: the server can be given to the next client,
        and the answer to this one, first. Only a SELECT's (by its command tag): a write's
        record asks the conversation what the client sent after it (a round trip per row?),
        and the listener may act on the server that ran anything else (DEALLOCATE, DISCARD)
        while the session still holds it."""
        if self.h_entry is not None:
            self.record_held()  # first: a record held back (pump.Batch) keeps its place
        if self.be_skip == 0 and self.be_want == 0 and len(self.be_buf) == 0 \
                and (self.native is not None or self.listener is None):
            # The common answer, whole (answer_scan): what the loop below would do with it.
            # (Not for an interpreted listener: it is given the command tag.)
            packed: i64 = answer_scan(data)
            if packed >= 0:
                tag_rows: i64 = 0
                if packed & 2:
                    tag_rows = packed >> 2
                else:
                    self.rows += packed >> 2
                status: i64 = data[len(data) - 1]
                self.holding = hold and (packed & 1) == 1 and status == self.tx_status
                self._ended(tag_rows, data, 0, 0, None, now)
                self.holding = False
                self._ready(status, now)
                return
        n: i64 = len(data)
        pos: i64 = 0
        end: i64 = 0
        t: i64 = 0
        if self.be_skip:
            if n <= self.be_skip:
                self.be_skip -= n
                return
            pos = self.be_skip
            self.be_skip = 0
        elif self.be_want or len(self.be_buf) > 0:
            pos = self._be_resume(data, now)
            if pos < 0:
                return
        rows: i64 = 0
        table = BE_TABLE
        while pos < n:
            if n - pos < 5:
                self.be_buf += data[pos:]
                self.be_want = 0
                break
            t = data[pos]
            end = pos + 1 + length_at(data, pos + 1)
            if t == 68:  # 'D' DataRow: counted, never decoded
                rows += 1
                if end > n:
                    self.be_skip = end - n
                    break
            elif table[t] == 2:
                if end > n:
                    self.be_buf += data[pos:]
                    self.be_want = end - n
                    break
                self.rows += rows
                rows = 0
                self._backend_message(t, data, pos + 5, end, now)
            elif end > n:
                self.be_skip = end - n
                break
            pos = end
        self.rows += rows

    def record_held(self) -> None:
        """The statement record ``feed_backend(..., hold=True)`` held back, to the listener."""
        entry = self.h_entry
        native = self.native
        if entry is None or native is None:
            return
        self.h_entry = None
        native.statement_done(entry, self.h_index, None, self.h_rows, None, self.h_started,
                              self.h_ended)
        if entry.kept:
            if self.spare is entry:
                self.spare = None  # (answered already: kept by the listener, not reused)
        elif entry.kind == EXECUTE:
            self.x_spare = entry

    def _be_resume(self, data: bytes, now: float) -> int:
        buf = self.be_buf
        data_pos = 0
        if not self.be_want:
            need = 5 - len(buf)
            if len(data) < need:
                buf += data
                return -1
            buf += data[:need]
            t = buf[0]
            rest = ((buf[1] << 24) | (buf[2] << 16) | (buf[3] << 8) | buf[4]) - 4
            if BE_TABLE[t] != 2:
                self.be_buf = bytearray()
                if t == 68:
                    self.rows += 1
                if len(data) - need < rest:
                    self.be_skip = rest - (len(data) - need)
                    return -1
                return need + rest
            if rest <= 0:
                self.be_buf = bytearray()
                self._backend_message(t, bytes(buf), 5, 5, now)
                return need
            self.be_want = rest
            data_pos = need
        want = self.be_want
        avail = len(data) - data_pos
        if avail < want:
            buf += data[data_pos:]
            self.be_want = want - avail
            return -1
        buf += data[data_pos : data_pos + want]
        self.be_buf = bytearray()
        self.be_want = 0
        msg = bytes(buf)
        self._backend_message(msg[0], msg, 5, len(msg), now)
        return data_pos + want

    def _backend_message(self, t: i64, data: bytes, start: i64, end: i64, now: float) -> None:
        if t == 67:  # 'C' CommandComplete
            self._complete(data, start, end - 1, None, now)
        elif t == 90:  # 'Z' ReadyForQuery
            self._ready(data[start] if end > start else -1, now)
        elif t == 69:  # 'E' ErrorResponse
            sqlstate, fatal = error_fields(data, start, end)
            if fatal:
                self.fatal = True
            self._fail(sqlstate, now)
        elif t == 73:  # 'I' EmptyQueryResponse
            self._complete(None, 0, 0, None, now)
        elif t == 115:  # 's' PortalSuspended
            self._suspend(now)
        elif t == 83:  # 'S' ParameterStatus
            listener = self.listener
            if listener is not None:
                nul = find_nul(data, start, end)
                listener.parameter_status(
                    data[start:nul].decode("utf-8", "replace"),
                    data[nul + 1 : end - 1].decode("utf-8", "replace"),
                )
        elif t == 71:  # 'G' CopyInResponse
            self.copy_mode = COPY_IN
        elif t == 72:  # 'H' CopyOutResponse
            self.copy_mode = COPY_OUT
        elif t == 87:  # 'W' CopyBothResponse
            self.copy_mode = COPY_BOTH

    def _ready(self, status: i64, now: float) -> None:
        """ReadyForQuery, with its transaction status (-1: none in the message)."""
        if status >= 0 and status != self.tx_status:
            previous = self.tx_status
            self.tx_status = status
            if self.native is not None:
                self.native.transaction_status(previous, status, now)
            elif self.listener is not None:
                self.listener.transaction_status(previous, status, now)
        self.copy_mode = COPY_NONE
        queue = self.queue
        while self.head < self.tail:
            entry = queue[self.head]
            kind = entry.kind
            self._pop()
            if kind == QUERY and not entry.kept:
                self.spare = entry
            if kind != EXECUTE:
                break
        self.rows = 0
        if self.portal_carry and self.tx_status != 84:  # not 'T': the portals are gone
            self._flush_carry()

    def _current(self) -> Pending | None:
        """The request the next result belongs to (a Sync at the head owns none)."""
        if self.head < self.tail:
            entry = self.queue[self.head]
            if entry.kind != SYNC:
                return entry
        return None

    def _complete(self, data: bytes | None, start: i64, end: i64, sqlstate: str | None,
                  now: float) -> None:
        """The head request's statement ended: CommandComplete (its tag is ``data[start:end]``),
        or EmptyQueryResponse or ErrorResponse (``data`` None)."""
        self._ended(0 if data is None else command_tag_rows(data, start, end), data, start,
                    end, sqlstate, now)

    def _ended(self, tag_rows: i64, data: bytes | None, start: i64, end: i64,
               sqlstate: str | None, now: float) -> None:
        """``_complete``, given the tag's row count (0: none; the rows counted then)."""
        self.copy_mode = COPY_NONE
        entry = self._current()
        rows: i64 = self.rows
        self.rows = 0
        if entry is None:
            return
        started = entry.sent if entry.sent > self.last_end else self.last_end
        self.last_end = now
        if tag_rows:
            rows = tag_rows
        index = 0
        if entry.kind == EXECUTE:
            self._pop()
            if self.portal_carry:
                carry = self.portal_carry.pop(entry.portal, None)
                if carry is not None:
                    if carry[0].bind == entry.bind:
                        rows += carry[1]
                        started -= carry[2]
                    else:  # the portal was bound anew: the suspended one ended unseen
                        self._emit_carry(carry)
        else:
            index = entry.index
            entry.index = index + 1
        native = self.native
        if native is not None:
            if self.holding:  # (feed_backend's ``hold``)
                self.h_entry = entry
                self.h_index = index
                self.h_rows = rows
                self.h_started = started
                self.h_ended = now
                return
            native.statement_done(entry, index, None, rows, sqlstate, started, now)
        elif self.listener is not None:
            tag = data[start:end] if data is not None else None
            entry.kept = True  # (an interpreted listener may keep it)
            self.listener.statement_done(entry, index, tag, rows, sqlstate, started, now)
        if entry.kind == EXECUTE and not entry.kept:
            self.x_spare = entry  # (gone from the queue, and not kept)

    def _suspend(self, now: float) -> None:
        """PortalSuspended: this Execute ends; the portal's statement goes on in a later one."""
        entry = self._current()
        rows = self.rows
        self.rows = 0
        if entry is None or entry.kind != EXECUTE:
            return
        self._pop()
        started = entry.sent if entry.sent > self.last_end else self.last_end
        self.last_end = now
        prev = self.portal_carry.get(entry.portal)
        if prev is not None and prev[0].bind != entry.bind:
            self._emit_carry(prev)
            prev = None
        if prev is None:
            self.portal_carry[entry.portal] = (entry, rows, now - started, now)
        else:
            self.portal_carry[entry.portal] = (
                prev[0], prev[1] + rows, prev[2] + (now - started), now
            )

    def _flush_carry(self) -> None:
        """The suspended portals were closed (transaction end): their statements are done."""
        carried = list(self.portal_carry.values())
        self.portal_carry.clear()
        for carry in carried:
            self._emit_carry(carry)

    def _emit_carry(self, carry: tuple[Pending, int, float, float]) -> None:
        listener = self.listener
        if listener is not None:
            entry, rows, seconds, last = carry
            listener.statement_done(entry, 0, None, rows, None, last - seconds, last)

    def _fail(self, sqlstate: str, now: float) -> None:
        self.sql_errors += 1
        entry = self._current()
        if entry is None:
            self.rows = 0
            self.copy_mode = COPY_NONE
            return
        self._complete(None, 0, 0, sqlstate, now)
        if entry.kind == EXECUTE:
            # The server now skips to Sync: so do we.
            queue = self.queue
            while self.head < self.tail and queue[self.head].kind == EXECUTE:
                self._pop()


def _bad_frontend(t: int, ln: int, max_message: int) -> None:
    if FE_TABLE[t] == 0:
        shown = chr(t) if 32 < t < 127 else f"0x{t:02x}"
        raise ProtocolViolation(f"invalid frontend message type {shown!r}")
    if ln > max_message:
        raise ProtocolViolation(
            f"message of type {chr(t)!r} is {ln} bytes, over proxy.max_message_bytes "
            f"({max_message})"
        )
    raise ProtocolViolation(f"invalid message length {ln} for message type {chr(t)!r}")
