"""A client session that may answer reads from the result cache (docs/cache.md).

Used for every session when the cache is on (``[cache]`` has a rule, or ``enabled``): the
server picks the session class once at startup, so without the cache the plain session and
its direct relay stay exactly as they are. Startup and authentication are the plain
session's; after that both directions are framed:

* the client's messages are cut into units (``routing.units``: one Query, or the extended
  messages up to a Sync). A unit with a key (``cache.keys``) that a rule covers
  (``cache.manager.ResultCache.judge``) is looked up; a hit is answered here with the bytes
  the server sent for it the first time and a ReadyForQuery of our own (idle); a miss, and
  every other unit, is forwarded as received.
* answers go back in the order of the units (a FIFO of records, hits included, so that a
  pipelining client gets its answers in order); a miss's answer is kept on the way back and
  stored if it ended idle, without error or asynchronous message, under
  ``cache.max_entry_bytes``.
* what each forwarded unit may write is noted (``routing.tables.written_tables``); when the
  server's ReadyForQuery says the transaction is over and it was not rolled back, the tables
  are invalidated *before* the bytes that end the COMMIT (its CommandComplete and the
  ReadyForQuery, held until then) reach the client.

A unit is looked up only when the session is known (or predicted, behind cacheable reads) to
be idle: never inside a transaction block, so a read-write transaction is never served.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections import deque
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from sqlproxy.cache.keys import (
    binds_unnamed_first,
    canonical_unit,
    entry_key,
    settings_digest,
    statement_identity,
)
from sqlproxy.cache.manager import Plan, ResultCache
from sqlproxy.cache.store import Entry
from sqlproxy.errors import ProtocolViolation
from sqlproxy.logs import get_logger
from sqlproxy.proxy.recorder import SessionListener
from sqlproxy.proxy.session import BackendConnection, ClientSession, SessionState
from sqlproxy.routing.units import Unit, UnitCutter
from sqlproxy.wire.conversation import Conversation
from sqlproxy.wire.frames import Frames, frame_end
from sqlproxy.wire.messages import (
    F_COPY_DATA,
    F_COPY_DONE,
    F_COPY_FAIL,
    F_FLUSH,
    F_TERMINATE,
    SYNC,
)
from sqlproxy.wire.requests import ConversationListener

if TYPE_CHECKING:
    from sqlproxy.proxy.server import ProxyServer

__all__ = ["CachedSession"]

log = get_logger("sqlproxy.cache")
_perf = time.perf_counter
_mono = time.monotonic
_unpack_int32 = struct.Struct("!I").unpack_from

_IDLE = 73  # 'I'
_Z = 90  # ReadyForQuery
_E = 69  # ErrorResponse
_C = 67  # CommandComplete
_PARSE_COMPLETE = 49  # '1'
_PARAMETER_STATUS = 83  # 'S'
_NOTICE = 78  # 'N'
_NOTIFICATION = 65  # 'A'
_READY_IDLE = b"Z\x00\x00\x00\x05I"
_COPY_MESSAGES = frozenset({F_COPY_DATA, F_COPY_DONE, F_COPY_FAIL})
#: CopyInResponse, CopyOutResponse, CopyBothResponse, CopyData, CopyDone from the server.
_COPY_ANSWERS = frozenset({ord("G"), ord("H"), ord("W"), ord("d"), ord("c")})
_MAX_SERVER_MESSAGE = (1 << 30) + (1 << 20)
_MEMO_SIZE = 2048  # units remembered per context (_plan), shared by its sessions
_MEMO_UNIT_BYTES = 1024  # ... when no larger than this
_MEMO_CONTEXTS = 64  # contexts (database, user, settings, statements) remembered


class _Rec:
    """One unit whose answer the client is owed, in order."""

    __slots__ = ("answer", "async_msg", "collect", "commit", "error", "hit", "hold", "idle",
                 "key", "open", "parsed", "plan", "rollback", "since", "started", "strip_parse",
                 "strip_rfq", "unsure", "writes")

    def __init__(self, started: float) -> None:
        self.started = started
        self.hit: bytes | None = None  # a hit: the answer, ReadyForQuery excluded
        self.plan: Plan | None = None  # a covered miss: stored on the way back
        self.key = b""
        self.collect: bytearray | None = None  # the miss's answer so far (None: not kept)
        self.since = 0  # the store's clock when sent (may_store)
        self.answer: Any = None  # remote store: the generations read at lookup
        self.writes: frozenset[str] = frozenset()
        self.hold = False  # deliver only at ReadyForQuery, after invalidation
        self.open = False  # ended by Flush: the rest of the unit follows
        self.strip_parse = 0  # ParseComplete answers to our own Parse, not the client's
        self.strip_rfq = False  # the ReadyForQuery answers our own Sync
        self.error = False
        self.commit = False
        self.rollback = False
        self.async_msg = False
        self.idle = True  # sent while the session was idle
        self.parsed: tuple[bytes, ...] = ()  # named statements it parses
        self.unsure = False  # the session may not be idle after it (_predicted_idle)


class CachedSession(ClientSession):
    """A ClientSession that answers covered reads from the result cache."""

    def __init__(self, server: ProxyServer) -> None:
        super().__init__(server)
        cache = server.cache
        assert cache is not None
        self.cache: ResultCache = cache
        self.frames = Frames(self.config.proxy.max_message_bytes)
        self.cutter = UnitCutter()
        self.units: deque[Unit] = deque()
        self.recs: deque[_Rec] = deque()
        self.open_rec: _Rec | None = None
        self._sbuf = bytearray()  # server bytes not yet framed
        self._held = bytearray()  # the head record's bytes kept until its ReadyForQuery
        self.named: dict[bytes, bytes] = {}  # prepared statement -> identity (keys.py)
        self.unnamed: bytes | None = None  # the unnamed statement's identity, as the client has it
        self.stale_unnamed: bytes | None = None  # the client's last unnamed Parse, when the
        # server's differs (a hit answered a unit that parsed it)
        self.sets: list[str] = []  # SET / RESET texts, in order (the key's settings)
        self.digest = b""
        self.cache_off = False  # temporary tables and the like: this session is not cached
        self.tx_writes: set[str] = set()
        self.tx_ddl = False
        self.waiting = False  # a remote lookup or an invalidation is in flight
        self.paused = False  # server bytes wait for an invalidation in flight
        self.owed_unsure = 0  # records after which the session may not be idle
        self.owed_writes = 0  # records that may write
        self._memo: dict[bytes, tuple[Plan | None, bytes, bytes | None]] | None = None
        self._memo_gen = -1

    # ------------------------------------------------------------------ startup hand-over
    def _go_hot(self, backend: BackendConnection, rest: bytes) -> None:
        # The plain session's conversation (statistics), but no relay and no pumps: this
        # session frames both directions itself.
        self._cancel_startup_timer()
        self.ready_at = _perf()
        listener: ConversationListener = (
            SessionListener(self) if self.recorder is None else self.recorder)
        self.conv = self.info.conv = Conversation(listener, self.config.proxy.max_message_bytes)
        self.state = SessionState.READY
        self._buf.clear()
        self._settings_changed()
        if rest:
            self._server_data(rest)

    def backend_startup_data(self, backend: BackendConnection, data: bytes) -> None:
        if self.state is SessionState.READY:
            self._server_data(data)
        else:
            super().backend_startup_data(backend, data)

    def _settings_changed(self) -> None:
        self._memo = None
        startup = self.startup.parameters if self.startup is not None else {}
        self.digest = settings_digest(self.parameters, startup, self.sets)

    # ------------------------------------------------------------------ client side
    def data_received(self, data: bytes) -> None:
        if self.state is not SessionState.READY:
            super().data_received(data)
            return
        if not self.recs and not self.units and self._fast_hit(data):
            return
        try:
            for t, msg in self.frames.feed(data):
                self._client_message(t, msg)
        except ProtocolViolation as exc:
            self.fail(exc)
            return
        self._pump()

    def _fast_hit(self, data: bytes) -> bool:
        """A repeat hit in one dict lookup and one write: ``data`` is exactly the bytes of a
        unit already planned (``_memo``, dropped whenever the session's settings, statements
        or the cache's plans change), nothing is owed or queued, the session is idle, and
        the store has the answer. The unit must not parse the unnamed statement (that hit
        changes the session's state: the general path handles it). Anything else returns
        False and the general path sees the chunk as if this had not run."""
        if self.paused or self.waiting or self.open_rec is not None or self.cache_off \
                or len(self.frames) or not self.cutter.empty:
            return False
        cache = self.cache
        if cache.remote is not None or self._memo_gen != cache.generation:
            return False
        memo = self._memo
        if memo is None:
            return False
        found = memo.get(data)
        if found is None:
            return False
        plan, key, unnamed = found
        conv = self.conv
        if plan is None or unnamed is not None or conv is None or conv.tx_status != _IDLE:
            return False
        now = _perf()
        entry = cache.store.get(key, _mono())
        if entry is None:
            return False
        answer = entry.value + _READY_IDLE
        conv.feed_frontend(data, now)
        t = self.client_transport
        if t is not None and not t.is_closing():
            t.write(answer)
        done = _perf()
        conv.feed_backend(answer, done)
        cache.stats.hit(plan.coverage.rule, plan.fingerprint, (done - now) * 1000.0)
        return True

    def _client_message(self, t: int, msg: bytes) -> None:
        if t in _COPY_MESSAGES or t == F_TERMINATE or (t == F_FLUSH and self.cutter.empty):
            self._write_server(msg)
            return
        unit = self.cutter.add(t, msg)
        if unit is not None:
            self.units.append(unit)

    def _write_server(self, data: bytes | bytearray) -> None:
        b = self.backend
        if b is None or b.transport is None or b.transport.is_closing():
            return
        self.conv.feed_frontend(bytes(data), _perf())  # type: ignore[union-attr]
        b.transport.write(data)

    def _pump(self) -> None:
        while self.units and not self.waiting and self.state is SessionState.READY:
            self._dispatch(self.units.popleft())

    def _predicted_idle(self) -> bool:
        """Is the session idle when the next unit runs? Known when nothing is owed; else
        predicted when everything owed is a read the cache covers, sent while idle."""
        conv = self.conv
        if conv is None or self.open_rec is not None:
            return False
        if not self.recs:
            return conv.tx_status == _IDLE
        return self.owed_unsure == 0 and conv.tx_status == _IDLE

    def _dispatch(self, unit: Unit) -> None:
        if self.open_rec is not None:
            self._forward(unit, self.open_rec, continued=True)
            return
        plan = None
        key = b""
        unnamed: bytes | None = None
        idle = self._predicted_idle()
        if idle and not self.cache_off and not unit.unknown and not unit.open \
                and not unit.describe_only:
            plan, key, unnamed = self._plan(unit)
        rec = _Rec(_perf())
        rec.idle = idle
        if plan is None:
            self._forward(unit, rec)
            return
        rec.plan = plan
        rec.key = key
        remote = self.cache.remote
        if remote is None:
            entry = self.cache.store.get(key, _mono())
            self._looked_up(unit, rec, entry.value if entry is not None else None, unnamed)
            return
        if not remote.available():
            remote.skipped += 1
            self._looked_up(unit, rec, None, unnamed)
            return
        self.waiting = True
        task = asyncio.get_running_loop().create_task(
            remote.get(key, self.database, plan.tables))

        def done(t: asyncio.Task[tuple[bytes | None, Any]]) -> None:
            self.waiting = False
            if self.state is not SessionState.READY:
                return
            value, gens = (None, None) if t.cancelled() or t.exception() else t.result()
            rec.answer = gens
            self._looked_up(unit, rec, value, unnamed)
            self._pump()

        task.add_done_callback(done)

    def _plan(self, unit: Unit) -> tuple[Plan | None, bytes, bytes | None]:
        """(plan, key, the unnamed statement it parses) of a unit, memoized by its bytes
        while the session's settings, statements and the cache's plans stay the same."""
        memo = self._memo
        if memo is None or self._memo_gen != self.cache.generation:
            memo = self._memo_for()
        data = bytes(unit.data)
        found = memo.get(data)
        if found is not None:
            return found
        plan = None
        key = b""
        unnamed = None
        canon = canonical_unit(data, self.named, self.unnamed)
        if canon is not None:
            plan = self.cache.judge(self.database, canon)
            if plan is not None:
                key = entry_key(self.database, self.user, self.digest, canon.data)
                unnamed = canon.parses_unnamed
        if len(data) <= _MEMO_UNIT_BYTES:
            if len(memo) >= _MEMO_SIZE:
                memo.clear()
            memo[data] = (plan, key, unnamed)
        return plan, key, unnamed

    def _memo_for(self) -> dict[bytes, tuple[Plan | None, bytes, bytes | None]]:
        """The memo of this session's context: what a unit's plan and key depend on besides
        its bytes (the database, the user, the settings, the prepared statements and the
        unnamed one). Sessions in the same context share it (8 pgbench clients, a pool of
        an application's connections): a unit planned by one is one lookup for the others."""
        cache = self.cache
        gen = cache.generation
        memos = cache.memos
        if cache.memos_generation != gen:
            memos.clear()
            cache.memos_generation = gen
        ctx = (self.database, self.user, self.digest, self.unnamed,
               frozenset(self.named.items()))
        memo = memos.get(ctx)
        if memo is None:
            if len(memos) >= _MEMO_CONTEXTS:
                memos.clear()
            memo = memos[ctx] = {}
        self._memo = memo
        self._memo_gen = gen
        return memo

    def _looked_up(self, unit: Unit, rec: _Rec, value: bytes | None,
                   parses_unnamed: bytes | None) -> None:
        plan = rec.plan
        assert plan is not None
        if value is None:
            self.cache.stats.miss(plan.coverage.rule, plan.fingerprint)
            rec.collect = bytearray()
            rec.since = self.cache.store.clock
            self._forward(unit, rec)
            return
        # A hit: the client's unnamed statement is now the one this unit parsed, which the
        # server has not seen (parsed again before a unit that uses it, see _forward).
        if parses_unnamed is not None:
            if self.unnamed != parses_unnamed:
                self._memo = None
            self.unnamed = parses_unnamed
            for name, _, msg in unit.parses:
                if not name:
                    self.stale_unnamed = msg
        rec.hit = value
        self.conv.feed_frontend(bytes(unit.data), rec.started)  # type: ignore[union-attr]
        self._owe(rec)
        if len(self.recs) == 1:
            self._flush_hits()

    def _forward(self, unit: Unit, rec: _Rec, continued: bool = False) -> None:
        data: bytes | bytearray = unit.data
        before = self.unnamed
        for name, _sql, msg in unit.parses:
            ident = statement_identity(msg)
            if name:
                self.named[name] = ident
                rec.parsed += (name,)
                self._memo = None
            else:
                self.unnamed = ident
        if unit.closes:
            self._memo = None
        for name in unit.closes:
            self.named.pop(name, None)
        if unit.has_query:
            self.unnamed = None
            self.stale_unnamed = None
        if self.unnamed != before:
            self._memo = None
        stale = self.stale_unnamed
        if stale is not None and binds_unnamed_first(data):
            data = stale + data  # the server's unnamed statement is the client's again
            rec.strip_parse += 1
            self.stale_unnamed = None
        elif any(not name for name, _, _ in unit.parses):
            self.stale_unnamed = None
        # What it may write, and the settings it changes.
        sqls = list(unit.queries)
        known = not unit.unknown
        parsed = {name for name, _, _ in unit.parses}
        sqls.extend(sql for _, sql, _ in unit.parses)
        for name in unit.binds:
            if name in parsed:
                continue
            bound = self.named.get(name) if name else self.unnamed
            if bound is None:
                known = False
            else:
                sqls.append(bound[: bound.index(0)].decode("utf-8", "replace"))
        w = self.cache.writes(self.database, sqls, known)
        if w.settings or w.reset:
            if w.reset:
                self.sets.clear()
            self.sets.extend(w.settings)
            self._settings_changed()
        if w.session_state:
            self.cache_off = True
        if w.ddl:
            self.tx_ddl = True
        if continued:
            if w.tables and not rec.writes:
                self.owed_writes += 1
            rec.writes = rec.writes | w.tables
        else:
            rec.writes = w.tables
            rec.hold = bool(w.tables) or bool(self.tx_writes) \
                or self.owed_writes > 0
        if unit.open or unit.describe_only:
            if unit.describe_only and not continued and not self.recs \
                    and self.conv is not None and self.conv.tx_status == _IDLE:
                # asyncpg's Parse/Describe/Flush: closed with a Sync of our own (its
                # ReadyForQuery kept from the client), so that the Bind/Execute/Sync that
                # follows is a unit of its own, which the cache may answer.
                data = bytes(data) + SYNC
                rec.strip_rfq = True
            else:
                rec.open = True
                self.open_rec = rec
        elif continued:
            self.open_rec = None
        if rec.open:
            # The client waits for answers before it sends the rest (up to the Sync that
            # ends the transaction): nothing can be held until then.
            rec.hold = False
        elif continued:
            rec.hold = bool(rec.writes) or bool(self.tx_writes) or self.owed_writes > 0
        self._write_server(data)
        if not continued:
            self._owe(rec)

    def _owe(self, rec: _Rec) -> None:
        """Queue a record (the counters keep _predicted_idle O(1) when clients pipeline)."""
        self.recs.append(rec)
        if not (rec.idle and (rec.hit is not None or rec.plan is not None)) or rec.open:
            rec.unsure = True
            self.owed_unsure += 1
        if rec.writes:
            self.owed_writes += 1

    def _paid(self) -> _Rec:
        rec = self.recs.popleft()
        if rec.unsure:
            self.owed_unsure -= 1
        if rec.writes:
            self.owed_writes -= 1
        return rec

    # ------------------------------------------------------------------ server side
    def _server_data(self, data: bytes) -> None:
        buf = self._sbuf
        buf += data
        if self.paused:
            return
        conv = self.conv
        assert conv is not None
        pos = 0
        start = 0  # the first byte not yet delivered (or held)
        try:
            while (end := frame_end(buf, pos, _MAX_SERVER_MESSAGE, "server message")) >= 0:
                typ = buf[pos]
                rec = self.recs[0] if self.recs else None
                if rec is None:  # unsolicited (notice, notification, parameter, FATAL)
                    if typ == _PARAMETER_STATUS:
                        self._parameter(buf, pos, end)
                    pos = end
                    continue
                if typ == _E:
                    rec.error = True
                elif typ == _C:
                    if buf.startswith(b"COMMIT", pos + 5):
                        rec.commit = True
                    elif buf.startswith(b"ROLLBACK", pos + 5):
                        rec.rollback = True
                elif typ in (_NOTICE, _NOTIFICATION):
                    rec.async_msg = True
                elif typ == _PARAMETER_STATUS:
                    rec.async_msg = True
                    self._parameter(buf, pos, end)
                elif typ == _PARSE_COMPLETE and rec.strip_parse:
                    rec.strip_parse -= 1
                    self._pass(buf, start, pos, rec)
                    conv.feed_backend(bytes(buf[start:end]), _perf())
                    start = pos = end
                    continue
                if rec.collect is not None and typ != _Z:
                    if len(rec.collect) + (end - pos) > self.config.cache.max_entry_bytes:
                        if rec.plan is not None:
                            self.cache.stats.too_large(rec.plan.coverage.rule,
                                                       rec.plan.fingerprint)
                        rec.collect = None
                    else:
                        rec.collect += buf[pos:end]
                if typ in _COPY_ANSWERS and rec.hold:
                    # The client needs these to go on with the COPY: pass them (and what
                    # was held before them); the CommandComplete and ReadyForQuery after
                    # the COPY stay held until the invalidation.
                    self._release(buf, start, end)
                    conv.feed_backend(bytes(buf[start:end]), _perf())
                    start = pos = end
                    continue
                if typ != _Z:
                    pos = end
                    continue
                # ReadyForQuery: the record is answered.
                status = buf[pos + 5]
                self._pass(buf, start, pos, rec)
                if not rec.strip_rfq:  # the ReadyForQuery itself always waits for _finished
                    self._held += buf[pos:end]
                conv.feed_backend(bytes(buf[start:end]), _perf())
                start = pos = end
                self._paid()
                waiting = self._finished(rec, status)
                if waiting is not None:
                    self.paused = True
                    del buf[:pos]
                    self._await_invalidation(waiting)
                    return
                self._flush_hits()
        except ProtocolViolation as exc:
            self.fail(ProtocolViolation(f"{exc} from the server"))
            return
        if pos > start:
            rec = self.recs[0] if self.recs else None
            self._pass(buf, start, pos, rec)
            conv.feed_backend(bytes(buf[start:pos]), _perf())
        del buf[:pos]

    def _pass(self, buf: bytearray, start: int, end: int, rec: _Rec | None) -> None:
        """Deliver ``buf[start:end]`` to the client, or hold it (``rec.hold``)."""
        if end <= start:
            return
        if rec is not None and rec.hold and self.recs and self.recs[0] is rec:
            self._held += buf[start:end]
            return
        held = self._held
        t = self.client_transport
        if t is None or t.is_closing():
            held.clear()
            return
        if held:
            held += buf[start:end]
            t.write(bytes(held))
            held.clear()
        else:
            t.write(bytes(buf[start:end]))

    def _release(self, buf: bytearray, start: int, end: int) -> None:
        """Deliver what is held and ``buf[start:end]`` now."""
        held = self._held
        held += buf[start:end]
        t = self.client_transport
        if t is not None and not t.is_closing():
            t.write(bytes(held))
        held.clear()

    def _parameter(self, buf: bytearray, pos: int, end: int) -> None:
        k, _, v = bytes(buf[pos + 5 : end - 1]).partition(b"\x00")
        self.parameters[k.decode()] = v.decode("utf-8", "replace")
        self._settings_changed()

    def _finished(self, rec: _Rec, status: int) -> Awaitable[None] | None:
        """A forwarded record's ReadyForQuery: store its answer, invalidate at commit.
        Returns what the delivery of its last bytes must wait for (a remote invalidation)."""
        if rec.error:
            for name in rec.parsed:
                self.named.pop(name, None)
        self.tx_writes.update(rec.writes)
        waiting: Awaitable[None] | None = None
        if status == _IDLE:
            committed = not rec.rollback or rec.commit
            if rec.error and rec.idle and not rec.commit:
                committed = False  # an implicit transaction that failed wrote nothing
            if self.tx_writes and committed:
                waiting = self._invalidate(frozenset(self.tx_writes))
            if self.tx_ddl and committed:
                self.cache.committed(self.database, ddl=True)
            self.tx_writes.clear()
            self.tx_ddl = False
        plan = rec.plan
        if plan is not None and rec.collect is not None and status == _IDLE and rec.idle \
                and not rec.error and not rec.async_msg and not rec.writes:
            self._store(rec, plan, bytes(rec.collect))
        held = self._held
        if held and waiting is None:
            t = self.client_transport
            if t is not None and not t.is_closing():
                t.write(bytes(held))
            held.clear()
        return waiting

    def _store(self, rec: _Rec, plan: Plan, value: bytes) -> None:
        cache = self.cache
        if not cache.store.may_store(self.database, plan.tables, rec.since):
            return
        ttl = plan.coverage.ttl_s
        if cache.remote is not None:
            cache.remote.put(rec.key, value, self.database, plan.tables, ttl, rec.answer,
                             plan.coverage.rule, plan.fingerprint)
            return
        if len(value) > self.config.cache.max_entry_bytes:
            return
        cache.store.put(Entry(rec.key, value, self.database, plan.tables, _mono() + ttl,
                              plan.coverage.rule, plan.fingerprint))

    def _invalidate(self, written: frozenset[str]) -> Awaitable[None] | None:
        cache = self.cache
        tables = cache.affected(self.database, written)
        cache.invalidate_local(self.database, tables)
        if cache.remote is not None:
            return cache.remote.invalidate(self.database, tables)
        return None

    def _await_invalidation(self, waiting: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await waiting
            finally:
                self.paused = False
                if self.state is SessionState.READY:
                    held = self._held
                    t = self.client_transport
                    if held and t is not None and not t.is_closing():
                        t.write(bytes(held))
                    held.clear()
                    self._flush_hits()
                    self._server_data(b"")

        self.server.track(asyncio.get_running_loop().create_task(run()))

    def _flush_hits(self) -> None:
        """Answer the hits at the head of the queue (nothing is owed before them)."""
        recs = self.recs
        conv = self.conv
        t = self.client_transport
        while recs and recs[0].hit is not None and not self.paused:
            rec = self._paid()
            value = rec.hit
            assert value is not None
            now = _perf()
            if t is not None and not t.is_closing():
                t.write(value + _READY_IDLE)
            if conv is not None:
                conv.feed_backend(value + _READY_IDLE, now)
            plan = rec.plan
            if plan is not None:
                self.cache.stats.hit(plan.coverage.rule, plan.fingerprint,
                                     (now - rec.started) * 1000.0)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["cache"] = {"owed": len(self.recs), "cache_off": self.cache_off,
                        "settings_changed": len(self.sets)}
        return out

