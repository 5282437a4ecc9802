"""A client session whose read-only units may run on read replicas.

Only used when ``routing.enabled`` and replicas are configured (the server picks the session
class once at startup): the plain ``ClientSession`` hot path stays untouched.

How it works
------------
Startup and authentication are the plain session's: the client authenticates against the
primary. After that, the client's bytes are cut into *units* — one Query, or the extended-
protocol messages up to a Sync (or a Flush, after which the rest up to the Sync follows the same
backend: the client is waiting for answers) — and each unit is routed as a whole by
``routing.policy.decide`` when nothing is in flight. Units pipelined behind a unit running on the
primary follow it there; a unit on a replica runs alone, so its responses can be held back and,
if the replica proves it could not run it (read-only transaction, recovery conflict, shutdown,
lost connection), thrown away and the unit retried on the primary before the client has seen any
of it.

Each backend (a *link*) has its own ``Conversation`` for statistics and transaction status.
Before a unit is sent to a link, what the session built elsewhere is replayed there as extra
units whose responses are swallowed: session settings (SET/RESET, applied in order), and the
named prepared statements the unit uses (Parse with the client's own Parse message, Close for
statements the client closed elsewhere).

Replica connections are opened lazily as the client's user and database. A trusted user needs
nothing; a SCRAM-SHA-256 user is authenticated with the ClientKey recovered from the exchange the
client had with the primary (observed during startup only, see ``routing.scram``); otherwise
``routing.passwords``. When none works, the session's reads stay on the primary (warned once).

Read-your-writes: after a unit that may write completes on the primary (outside a transaction
block), the session's reads stay on the primary until a replica has replayed past the primary's
WAL position read after the write (see ``routing.health``). With ``read_your_writes = "table"``
the tables written are noted in the router too, and any session's read of such a table waits
for a replica that has replayed past it (see ``routing.tables``).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from sqlproxy.analysis.classify import Shape, StatementKind
from sqlproxy.analysis.normalize import Normalized
from sqlproxy.errors import ConnectionFailure, ProtocolViolation, ProxyError
from sqlproxy.logs import get_logger
from sqlproxy.proxy.session import (
    BackendConnection,
    ClientSession,
    ServerSideProtocol,
    SessionState,
)
from sqlproxy.proxy.tls import backend_sslmode, open_backend_socket
from sqlproxy.routing.health import ReplicaState, Router
from sqlproxy.routing.policy import Decision, RoutedStatement, SessionView, Target, decide
from sqlproxy.routing.scram import ScramCapture, ScramClient, ScramError, ScramKeys
from sqlproxy.routing.tables import ALL, written_tables
from sqlproxy.wire.conversation import Conversation, Pending
from sqlproxy.wire.messages import TERMINATE, build, cstr

if TYPE_CHECKING:
    from sqlproxy.proxy.server import ProxyServer

log = get_logger("sqlproxy.routing")
_perf = time.perf_counter
_int32 = struct.Struct("!I")
_unpack_int32 = _int32.unpack_from

_SYNC = build(b"S", b"")
_IDLE = 73  # 'I'
#: Errors from a replica that prove the unit could not run there: retry on the primary.
RETRY_ON_PRIMARY = frozenset(
    {
        "25006",  # read_only_sql_transaction: it wrote after all
        "40001",  # serialization_failure: recovery conflict
        "40P01",  # deadlock_detected: recovery conflict on buffer pins
        "55000",  # object_not_in_prerequisite_state: "recovery is in progress"
        "0A000",  # feature_not_supported: e.g. SERIALIZABLE on a standby
        "57P01", "57P02", "57P03",  # shutdown, crash, not accepting connections
        "26000", "42P05",  # our prepared-statement bookkeeping was wrong: be safe
    }
)  # fmt: skip
HOLD_LIMIT = 256 * 1024  # bytes of a replica's answer held back for a possible retry
_SESSION_TAGS = (b"SET", b"RESET", b"DISCARD", b"DEALLOCATE")
_DEALLOCATE_RE = re.compile(r"deallocate\s+(?:prepare\s+)?(.+)$")


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
        self.data = bytearray()
        self.queries: list[str] = []  # simple Query texts
        self.parses: list[tuple[bytes, str, bytes]] = []  # (name, sql, whole Parse message)
        self.binds: list[bytes] = []  # statement names bound
        self.describes: list[bytes] = []  # statement names described
        self.closes: list[bytes] = []  # statement names closed
        self.has_query = False
        self.open = False  # ended by Flush: the rest follows until Sync
        self.describe_only = False  # Parse/Describe/Close then Flush: see RoutedSession._send
        self.unknown = False  # an Execute of an earlier portal, a FunctionCall
        self.sent = 0.0
        self.in_tx = False  # sent inside a transaction block: never retried elsewhere
        self.tables: frozenset[str] = frozenset()  # what it reads (read_your_writes = "table")


class Link:
    """One backend connection of a routed session."""

    def __init__(self, name: str, conv: Conversation, replica: ReplicaState | None) -> None:
        self.name = name
        self.conv = conv
        self.replica = replica
        self.transport: asyncio.Transport | None = None
        self.address: tuple[str, int] = ("", 0)
        self.key: tuple[int, bytes] | None = None
        self.prepared: dict[bytes, bytes] = {}  # statement name -> the Parse message sent
        self.to_close: set[bytes] = set()
        self.settings_gen = 0
        self.settings_applied = 0
        self.swallow = 0  # ReadyForQuery messages of injected units still to swallow
        self.swallow_failed = False
        self.strip = 0  # ReadyForQuery messages to keep from the client (our own Syncs)
        self.rbuf = bytearray()  # an incomplete message, while framing
        self.unit: Unit | None = None  # the replica unit in flight
        self.hold: bytearray | None = None  # its answer, held back (None: streaming)
        self.error: str | None = None  # SQLSTATE of an error in the held answer
        self.ready = replica is None
        self.closed = False

    @property
    def busy(self) -> bool:
        if self.swallow or self.strip:
            return True
        if self.replica is not None:
            return self.unit is not None
        return self.conv.busy


class ReplicaConnection(ServerSideProtocol):
    """The transport protocol of a replica link: our own startup and authentication.

    Credentials, in order: the client's SCRAM keys recovered from its exchange with the primary
    (``keys``, see ``routing.scram``), or ``routing.passwords[user]``; trust needs neither.
    """

    session: RoutedSession

    def __init__(self, session: RoutedSession, link: Link, password: str | None,
                 keys: ScramKeys | None = None) -> None:
        self.session = session
        self.link = link
        self.password = password
        self.keys = keys
        self.buf = bytearray()
        self.started = False
        self.waiter: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._scram: ScramClient | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.link.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.started:
            self.session.link_data(self.link, data)
            return
        self.buf += data
        buf = self.buf
        pos = 0
        while len(buf) - pos >= 5:
            t = buf[pos]
            end = pos + 1 + _unpack_int32(buf, pos + 1)[0]
            if end > len(buf):
                break
            body = bytes(buf[pos + 5 : end])
            pos = end
            if t == 82:  # 'R'
                try:
                    problem = self._auth(body)
                except (ScramError, UnicodeDecodeError) as exc:
                    problem = f"SCRAM authentication failed: {exc}"
                if problem is not None:
                    self._done(problem)
                    return
            elif t == 75:  # 'K' BackendKeyData
                self.link.key = (_unpack_int32(body, 0)[0], body[4:])
            elif t == 69:  # 'E'
                fields = dict(
                    (chr(f[0]), f[1:].decode("utf-8", "replace"))
                    for f in body.split(b"\x00") if f
                )
                self._done(f"{fields.get('C', '?')}: {fields.get('M', '')}")
                return
            elif t == 90:  # 'Z' ReadyForQuery: ready
                self.started = True
                rest = bytes(buf[pos:])
                buf.clear()
                self._done(None)
                if rest:
                    self.session.link_data(self.link, rest)
                return
        del buf[:pos]

    def _send(self, msg: bytes) -> None:
        if self.link.transport is not None:
            self.link.transport.write(msg)

    def _auth(self, body: bytes) -> str | None:
        code = _unpack_int32(body, 0)[0]
        if code == 0:
            return None
        pw = self.password
        user = self.session.user
        if code == 10:  # SASL
            if b"SCRAM-SHA-256\x00" not in body[4:]:
                return "authentication: no supported SASL mechanism"
            if self.keys is not None:
                self._scram = ScramClient(keys=self.keys)
            elif pw is not None:
                self._scram = ScramClient(password=pw)
            else:
                return ("password required: SCRAM keys not derivable and no routing.passwords "
                        "entry for this user")
            self._send(build(b"p", self._scram.initial_response()))
            return None
        if code == 11 and self._scram is not None:  # SASLContinue
            self._send(build(b"p", self._scram.final_message(body[4:].decode())))
            return None
        if code == 12 and self._scram is not None:  # SASLFinal
            self._scram.verify_final(body[4:].decode())
            return None
        if code not in (3, 5):
            return f"authentication: unsupported authentication request {code}"
        if pw is None:
            return "password required (no routing.passwords entry for this user)"
        if code == 3:  # cleartext
            self._send(build(b"p", cstr(pw)))
        else:  # MD5
            salt = body[4:8]
            inner = hashlib.md5((pw + user).encode()).hexdigest().encode()
            self._send(build(b"p", cstr("md5" + hashlib.md5(inner + salt).hexdigest())))
        return None

    def _done(self, problem: str | None) -> None:
        if not self.waiter.done():
            self.waiter.set_result(problem)

    def connection_lost(self, exc: Exception | None) -> None:
        self._done(f"connection lost: {exc}" if exc else "connection closed")
        self.session.link_lost(self.link, exc)


class RoutedSession(ClientSession):
    """A ClientSession that routes units between the primary and the replicas."""

    def __init__(self, server: ProxyServer) -> None:
        super().__init__(server)
        router = server.router
        assert router is not None
        self.router: Router = router
        self.primary_link: Link | None = None
        self.links: dict[str, Link] = {}  # replica name -> link
        self.fbuf = bytearray()
        self.cur = Unit()
        self.units: deque[Unit] = deque()
        self.open_link: Link | None = None  # a unit ended by Flush continues there
        self.tx_link: Link | None = None  # where the last unit ran (its transaction)
        self.statements: dict[bytes, tuple[str, bytes]] = {}  # the client's named statements
        self.pinned = False
        self.dirty = False  # a unit that may write is in flight on the primary
        self.horizon = 0  # read-your-writes: cycle whose primary LSN replicas must pass
        self.written: set[str] = set()  # tables written by the dirty unit(s) ("table" mode)
        self.settings: list[str] = []
        self.settings_gen = 0
        self.pending_settings: list[str] = []
        self.unit_failed = False
        self.no_replica = False  # authentication to replicas impossible for this session
        # Replicas this session could not connect to: name -> (retry after, failures).
        self.failed_replicas: dict[str, tuple[float, int]] = {}
        self.connecting: str | None = None
        self._current = "primary"
        self.scram_capture: ScramCapture | None = None  # the client's exchange with the primary
        self.scram_keys: ScramKeys | None = None

    # ------------------------------------------------------------------ authentication
    def _server_auth_message(self, code: int, body: bytes) -> None:
        if code == 10:  # AuthenticationSASL: watch the exchange (startup only, never hot)
            self.scram_capture = ScramCapture()
            return
        capture = self.scram_capture
        if capture is not None:
            try:
                capture.server_message(code, body)
            except (ScramError, UnicodeDecodeError):
                self.scram_capture = None

    def _client_auth_message(self, body: bytes) -> None:
        capture = self.scram_capture
        if capture is not None and not capture.complete:
            try:
                capture.client_message(body)
            except (ScramError, UnicodeDecodeError):
                self.scram_capture = None

    async def _replica_keys(self) -> ScramKeys | None:
        """The client's SCRAM keys, recovered once per session from its exchange."""
        if self.scram_keys is None:
            capture = self.scram_capture
            if capture is None or not capture.complete:
                return None
            self.scram_keys = await self.router.scram_keys(self.user, capture)
            if self.scram_keys is not None:
                self.scram_capture = None  # not needed any more
        return self.scram_keys

    # ------------------------------------------------------------------ startup hand-over
    def _go_hot(self, backend: BackendConnection, rest: bytes) -> None:
        # Like the plain session, except that the primary's bytes keep coming through
        # backend_startup_data (the backend is never put on its own hot path).
        self._cancel_startup_timer()
        self.ready_at = _perf()
        conv = Conversation(self, self.config.proxy.max_message_bytes)
        self.conv = self.info.conv = conv
        link = Link("primary", conv, None)
        link.transport = backend.transport
        link.address = backend.address
        link.key = backend.key
        self.primary_link = link
        self.state = SessionState.READY
        self._buf.clear()
        self.router.functions(self.database)
        if rest:
            self.link_data(link, rest)

    def backend_startup_data(self, backend: BackendConnection, data: bytes) -> None:
        if self.primary_link is not None:
            self.link_data(self.primary_link, data)
        else:
            super().backend_startup_data(backend, data)

    # ------------------------------------------------------------------ client side
    def data_received(self, data: bytes) -> None:
        if self.state is not SessionState.READY:
            super().data_received(data)
            return
        try:
            self._client_data(data)
        except ProtocolViolation as exc:
            self.fail(exc)

    def _client_data(self, data: bytes) -> None:
        buf = self.fbuf
        buf += data
        n = len(buf)
        pos = 0
        max_message = self.config.proxy.max_message_bytes
        while n - pos >= 5:
            t = buf[pos]
            ln = _unpack_int32(buf, pos + 1)[0]
            if ln < 4 or ln > max_message:
                raise ProtocolViolation(f"invalid message length {ln} for message type "
                                        f"{chr(t)!r}")
            end = pos + 1 + ln
            if end > n:
                break
            self._client_message(t, bytes(buf[pos:end]))
            pos = end
        del buf[:pos]
        self._pump()

    def _client_message(self, t: int, msg: bytes) -> None:
        link = self.open_link
        if link is not None:
            self._forward(link, msg)
            if t == 83:  # Sync ends the open unit
                self.open_link = None
            return
        if t in (100, 99, 102):  # CopyData, CopyDone, CopyFail: to the COPY (on the primary)
            target = self.primary_link
            if self.tx_link is not None and self.tx_link.conv.copy_mode:
                target = self.tx_link
            if target is not None:
                self._forward(target, msg)
            return
        if t == 88:  # Terminate
            for lk in self._all_links():
                if lk.transport is not None and not lk.transport.is_closing():
                    lk.conv.feed_frontend(msg, _perf())
                    lk.transport.write(msg)
            return
        unit = self.cur
        if t == 72 and not unit.data:  # a bare Flush: to whoever owes answers
            for lk in self._all_links():
                if lk.busy:
                    self._forward(lk, msg)
                    break
            return
        unit.data += msg
        if t == 80:  # Parse
            nul = msg.index(0, 5)
            name = msg[5:nul]
            sql = msg[nul + 1 : msg.index(0, nul + 1)].decode("utf-8", "replace")
            unit.parses.append((name, sql, msg))
        elif t == 66:  # Bind
            nul = msg.index(0, 5)
            unit.binds.append(msg[nul + 1 : msg.index(0, nul + 1)])
        elif t == 69:  # Execute
            if not unit.binds:
                unit.unknown = True
        elif t == 68:  # Describe
            if msg[5] == 83:
                unit.describes.append(msg[6 : msg.index(0, 6)])
        elif t == 67:  # Close
            if msg[5] == 83:
                unit.closes.append(msg[6 : msg.index(0, 6)])
        elif t == 81:  # Query
            unit.queries.append(msg[5 : msg.index(0, 5)].decode("utf-8", "replace"))
            unit.has_query = True
            self._end_unit()
        elif t == 70:  # FunctionCall
            unit.unknown = True
            self._end_unit()
        elif t == 83:  # Sync
            self._end_unit()
        elif t == 72:  # Flush
            if not unit.binds and not unit.unknown and not unit.has_query:
                unit.describe_only = True  # (asyncpg prepares this way)
            else:
                unit.open = True
            self._end_unit()

    def _end_unit(self) -> None:
        self.units.append(self.cur)
        self.cur = Unit()

    def _forward(self, link: Link, msg: bytes) -> None:
        if link.transport is None or link.transport.is_closing():
            return
        if link.replica is None or link.hold is None:
            self._current = link.name
            link.conv.feed_frontend(msg, _perf())
        elif link.unit is not None:
            link.unit.data += msg
        link.transport.write(msg)

    # ------------------------------------------------------------------ dispatch
    def _all_links(self) -> list[Link]:
        links = list(self.links.values())
        if self.primary_link is not None:
            links.insert(0, self.primary_link)
        return links

    def _pump(self) -> None:
        primary = self.primary_link
        if primary is None or self.state is not SessionState.READY:
            return
        while self.units and self.open_link is None and self.connecting is None:
            unit = self.units[0]
            if any(lk.busy for lk in self.links.values()):
                return  # a replica unit runs alone
            if primary.busy:
                # Pipelined behind the primary: follow it there (always correct).
                if self._preamble(primary, unit, dry_run=True):
                    return
                self._decide(unit)
                self.units.popleft()
                self._send(primary, unit)
                continue
            link = self._route(unit)
            if link is None:
                return  # connecting to a replica; pumped again when done
            self.units.popleft()
            self._send(link, unit)

    def _unit_statements(self, unit: Unit) -> list[RoutedStatement] | None:
        out: list[RoutedStatement] = []
        for sql in unit.queries:
            out.extend(self._statements(sql))
        parsed = set()
        for name, sql, _ in unit.parses:
            parsed.add(name)
            out.extend(self._statements(sql))
        for name in unit.binds:
            if name in parsed:
                continue
            known = self.statements.get(name)
            if known is None:
                return None
            out.extend(self._statements(known[0]))
        return out

    def _statements(self, sql: str) -> list[RoutedStatement]:
        return [RoutedStatement(n.text, shape, n.hints) for n, shape in self._statements_nr(sql)]

    def _in_tx(self) -> Link | None:
        tx = self.tx_link
        if tx is not None and tx.conv.tx_status != _IDLE and not tx.closed:
            return tx
        return None

    def _decide(self, unit: Unit) -> Decision | None:
        """The policy's decision for ``unit`` (None: unknown statements), noting pins and
        writes for the session."""
        tx = self._in_tx()
        stmts = None if unit.unknown else self._unit_statements(unit)
        table_mode = self.router.table_mode
        if stmts is None:
            self.dirty = True
            if table_mode:
                self.written.add(ALL)
            return None
        view = SessionView(
            pinned=self.pinned,
            in_transaction=tx is not None,
            transaction_on_replica=tx is not None and tx.replica is not None,
            replicas_usable=not self.no_replica,
        )
        decision = decide(stmts, view, self.router.functions(self.database))
        if decision.pin and not self.pinned:
            self.pinned = True
            self.router.pinned_sessions += 1
            log.info("session_pinned", session=self.id, reason=decision.reason)
        if decision.writes:
            self.dirty = True
            if table_mode:
                self.written |= written_tables(stmts, self.router.functions(self.database))
        elif table_mode and decision.target is Target.REPLICA:
            unit.tables = frozenset(t for st in stmts for t in st.shape.tables)
        if decision.target is Target.PRIMARY and "volatile function" in decision.reason:
            self.router.load_functions(self.database)  # maybe a function we do not know yet
        if not stmts:
            return None
        if decision.target is Target.REPLICA and all(
            st.shape.kind is StatementKind.TRANSACTION and not st.shape.read_only_txn
            for st in stmts
        ):
            return None  # a lone COMMIT outside a block: nothing to gain
        return decision

    def _route(self, unit: Unit) -> Link | None:
        primary = self.primary_link
        assert primary is not None
        tx = self._in_tx()
        decision = self._decide(unit)
        unit.in_tx = tx is not None
        if tx is not None:
            return tx  # transactions stay on one backend, whatever the statement
        if unit.describe_only:
            return primary
        if decision is None or decision.target is Target.PRIMARY:
            return primary
        min_lsn = None
        horizon = self.horizon
        if unit.tables:
            horizon = max(horizon, self.router.table_horizon(self.database, unit.tables))
        if horizon:
            min_lsn = self.router.lsn_after(horizon)
            if min_lsn is None:
                self.router.fallbacks += 1
                return primary
        rep = self.router.choose(min_lsn, self._excluded())
        if rep is None:
            self.router.fallbacks += 1
            return primary
        link = self.links.get(rep.name)
        if link is None or link.closed:
            self._connect_replica(rep)
            return None
        return link

    def _excluded(self) -> frozenset[str]:
        failed = self.failed_replicas
        if not failed:
            return frozenset()
        now = time.monotonic()
        return frozenset(name for name, (until, _) in failed.items() if now < until)

    def _connect_replica(self, rep: ReplicaState) -> None:
        self.connecting = rep.name
        self.server.track(asyncio.get_running_loop().create_task(self._open_replica(rep)))

    async def _replica_transport(
        self, rep: ReplicaState, factory: Callable[[], ReplicaConnection]
    ) -> tuple[asyncio.BaseTransport, ReplicaConnection]:
        """Connect to a replica, with TLS as its URL's sslmode or tls.server_sslmode says."""
        loop = asyncio.get_running_loop()
        mode = backend_sslmode(self.config, rep.url)
        if mode == "disable":
            return await loop.create_connection(factory, rep.url.host, rep.url.port)
        sock, use_tls = await open_backend_socket(rep.url.host, rep.url.port, mode)
        ctx = self.server.backend_tls_context(mode) if use_tls else None
        try:
            return await loop.create_connection(
                factory, sock=sock, ssl=ctx,
                server_hostname=rep.url.host if ctx is not None else None,
            )
        except BaseException:
            sock.close()
            raise

    async def _open_replica(self, rep: ReplicaState) -> None:
        link = Link(rep.name, Conversation(self, self.config.proxy.max_message_bytes), rep)
        link.address = (rep.url.host, rep.url.port)
        link.settings_gen = -1  # a fresh connection: replay everything
        problem: str | None
        password = self.router.routing.passwords.get(self.user)
        proto: ReplicaConnection | None = None
        try:
            keys = await self._replica_keys()
            _, proto = await asyncio.wait_for(
                self._replica_transport(rep, lambda: ReplicaConnection(self, link, password,
                                                                       keys)),
                timeout=self.config.proxy.connect_timeout,
            )
            assert self.startup is not None and proto is not None
            assert link.transport is not None
            link.transport.write(self.startup.raw)
            problem = await asyncio.wait_for(proto.waiter, self.config.proxy.connect_timeout)
        except (OSError, TimeoutError, ProxyError) as exc:
            problem = f"connection failed: {exc}"
            self.router.mark_down(rep, problem)
        self.connecting = None
        if self.state is not SessionState.READY:
            if link.transport is not None:
                link.transport.close()
            return
        if problem is not None:
            link.closed = True
            if link.transport is not None:
                link.transport.close()
            if "password" in problem or "authentication" in problem or "28P01" in problem \
                    or "28000" in problem:
                self.no_replica = True
                self.router.warn_once(
                    f"auth:{self.user}", "replica_authentication_impossible", user=self.user,
                    replica=rep.name, reason=problem,
                    consequence="this user's reads stay on the primary")
            else:
                # Try again later (it may be restarting), backing off: 0.25 s .. 30 s.
                _, failures = self.failed_replicas.get(rep.name, (0.0, 0))
                self.failed_replicas[rep.name] = (
                    time.monotonic() + min(30.0, 0.25 * 2**failures), failures + 1)
        else:
            link.ready = True
            self.links[rep.name] = link
            self.failed_replicas.pop(rep.name, None)
        self._pump()

    def _preamble(self, link: Link, unit: Unit, dry_run: bool = False) -> bytes:
        """The injected units that make ``link`` ready for ``unit`` (settings, statements)."""
        out = bytearray()
        units = 0
        if link.settings_gen != self.settings_gen or link.settings_applied < len(self.settings):
            if link.settings_gen != self.settings_gen:
                todo = (["RESET ALL"] if link.settings_gen >= 0 else []) + self.settings
            else:
                todo = self.settings[link.settings_applied :]
            if todo:
                out += build(b"Q", cstr("; ".join(todo)))
                units += 1
            if not dry_run:
                link.settings_gen = self.settings_gen
                link.settings_applied = len(self.settings)
        ext = bytearray()
        for name in list(link.to_close):
            ext += build(b"C", b"S" + name + b"\x00")
            if not dry_run:
                link.prepared.pop(name, None)
                link.to_close.discard(name)
        parsed_here = {name for name, _, _ in unit.parses}
        for name in (*unit.binds, *unit.describes):
            if name in parsed_here:
                continue
            known = self.statements.get(name)
            if known is None or link.prepared.get(name) == known[1]:
                continue
            if name in link.prepared and name != b"":
                ext += build(b"C", b"S" + name + b"\x00")
            ext += known[1]
            if not dry_run:
                link.prepared[name] = known[1]
                link.conv.statements[name] = known[0]
        for name, _, _ in unit.parses:
            if name and name in link.prepared and name not in self.statements:
                ext += build(b"C", b"S" + name + b"\x00")
                if not dry_run:
                    link.prepared.pop(name, None)
        if unit.has_query and b"" in link.prepared and unit.binds:
            pass  # a Query drops the unnamed statement; the Bind re-parses it above
        if ext:
            out += ext + _SYNC
            units += 1
        if not dry_run:
            link.swallow += units
        return bytes(out)

    def _send(self, link: Link, unit: Unit) -> None:
        transport = link.transport
        if transport is None or transport.is_closing():
            if link.replica is not None:
                self._retry_on_primary(link, unit, "connection closed")
                return
            self.fail(ConnectionFailure("server closed the connection unexpectedly"))
            return
        pre = self._preamble(link, unit)
        now = _perf()
        unit.sent = now
        data = bytes(unit.data)
        if unit.describe_only and link.replica is None and not unit.in_tx:
            # Parse/Describe answered by the primary, closed with a Sync of our own (its
            # ReadyForQuery kept from the client), so that the Bind/Execute the client sends
            # next is a unit of its own, routed — and retried — like any other. The Sync also
            # ends the implicit transaction, so the primary holds no locks meanwhile.
            data += _SYNC
            link.strip += 1
        elif unit.describe_only:
            unit.open = True
        rep = link.replica
        if rep is None:
            self._current = "primary"
            link.conv.feed_frontend(data, now)
            self.router.primary_routed += 1
        else:
            link.unit = unit
            rep.outstanding += 1
            rep.routed += 1
            if unit.open:
                link.hold = None
                link.conv.feed_frontend(data, now)
            else:
                link.hold = bytearray()
                link.error = None
        transport.write(pre + data if pre else data)
        # Bookkeeping of the client's statements as they now exist on this link.
        for name, sql, msg in unit.parses:
            self.statements[name] = (sql, msg)
            link.prepared[name] = msg
        for name in unit.closes:
            self.statements.pop(name, None)
            link.prepared.pop(name, None)
            for other in self._all_links():
                if other is not link and name in other.prepared:
                    other.to_close.add(name)
        if unit.has_query:
            self.statements.pop(b"", None)
            link.prepared.pop(b"", None)
        if unit.open:
            self.open_link = link
        self.tx_link = link

    # ------------------------------------------------------------------ backend side
    def link_data(self, link: Link, data: bytes) -> None:
        """Bytes from a backend of this session."""
        if link.replica is not None:
            self._replica_data(link, data)
        elif link.swallow or link.strip or link.rbuf:
            self._primary_framed(link, data)
        else:
            self._deliver(link, data)
        self._after(link)

    def _deliver(self, link: Link, data: bytes) -> None:
        t = self.client_transport
        if t is not None and not t.is_closing():
            t.write(data)
        self._current = link.name
        link.conv.feed_backend(data, _perf())

    def _primary_framed(self, link: Link, data: bytes) -> None:
        """Swallow the answers to injected units, keep our own Syncs' ReadyForQuery from the
        client, pass the rest on untouched."""
        buf = link.rbuf
        buf += data
        n = len(buf)
        pos = 0
        client = bytearray()
        conv_out = bytearray()
        while (link.swallow or link.strip) and n - pos >= 5:
            t = buf[pos]
            end = pos + 1 + _unpack_int32(buf, pos + 1)[0]
            if end > n:
                break
            if link.swallow:
                self._swallow(link, t, buf, pos, end)
            else:
                conv_out += buf[pos:end]
                if t == 90:
                    link.strip -= 1
                else:
                    client += buf[pos:end]
            pos = end
        if link.swallow or link.strip:
            del buf[:pos]
        else:
            rest = bytes(buf[pos:])
            buf.clear()
            client += rest
            conv_out += rest
        transport = self.client_transport
        if client and transport is not None and not transport.is_closing():
            transport.write(bytes(client))
        if conv_out:
            self._current = link.name
            link.conv.feed_backend(bytes(conv_out), _perf())

    def _swallow(self, link: Link, t: int, buf: bytearray, pos: int, end: int) -> None:
        """An answer to what we injected (settings replay, a Parse): not for the client."""
        if t == 69:  # ErrorResponse: the replay failed
            link.swallow_failed = True
            log.info("routing_replay_failed", session=self.id, backend=link.name,
                     error=_error_text(bytes(buf[pos + 5 : end])))
        elif t == 90:  # ReadyForQuery ends one injected unit
            link.swallow -= 1

    def _replica_data(self, link: Link, data: bytes) -> None:
        """A replica's answer: framed, held back for a retry until complete (or too big)."""
        buf = link.rbuf
        buf += data
        n = len(buf)
        pos = 0
        out = bytearray()
        while n - pos >= 5:
            t = buf[pos]
            end = pos + 1 + _unpack_int32(buf, pos + 1)[0]
            if end > n:
                break
            if link.swallow:
                self._swallow(link, t, buf, pos, end)
            elif link.unit is None:
                # An idle replica link speaks: a shutdown FATAL, a notice. Not the client's.
                if t == 69:
                    link.closed = True
            else:
                if t == 69 and link.error is None:
                    link.error = _sqlstate(bytes(buf[pos + 5 : end]))
                out += buf[pos:end]
                if t == 90:
                    self._replica_unit_end(link, out)
                    out = bytearray()
            pos = end
        del buf[:pos]
        if out:
            if link.hold is not None:
                link.hold += out
                if len(link.hold) > HOLD_LIMIT:
                    self._release(link)
            else:
                self._deliver(link, bytes(out))

    def _replica_unit_end(self, link: Link, out: bytearray) -> None:
        if link.hold is None:
            self._deliver(link, bytes(out))
            self._finish_replica_unit(link)
            return
        link.hold += out
        self._replica_done(link)

    def _release(self, link: Link) -> None:
        """Stop holding the replica's answer: pass on what is held and stream the rest."""
        unit = link.unit
        hold = link.hold
        link.hold = None
        if unit is None or hold is None:
            return
        self._current = link.name
        link.conv.feed_frontend(bytes(unit.data), unit.sent)
        self._deliver(link, bytes(hold))

    def _replica_done(self, link: Link) -> None:
        unit = link.unit
        assert unit is not None
        error = link.error
        replay_failed = link.swallow_failed
        retry = replay_failed or (error in RETRY_ON_PRIMARY and not unit.in_tx)
        link.swallow_failed = False
        if retry:
            reason = f"error {error}" if error else "replay failed"
            link.hold = None
            self._finish_replica_unit(link)
            if error in ("57P01", "57P02", "57P03") and link.replica is not None:
                self.router.mark_down(link.replica, reason)
            if replay_failed or error in ("57P01", "57P02", "57P03", "26000", "42P05"):
                self._drop_link(link)  # its state is not what we think: start afresh
            self._retry_on_primary(link, unit, reason)
            return
        self._release(link)
        self._finish_replica_unit(link)

    def _finish_replica_unit(self, link: Link) -> None:
        if link.unit is not None and link.replica is not None:
            link.replica.outstanding -= 1
        link.unit = None
        link.error = None

    def _retry_on_primary(self, link: Link, unit: Unit, reason: str) -> None:
        if link.replica is not None:
            link.replica.retried += 1
        log.info("routing_retry_on_primary", session=self.id, replica=link.name, reason=reason)
        primary = self.primary_link
        if primary is None:
            return
        unit.open = False
        self.dirty = True  # it may have been a write in disguise: read-your-writes
        if self.router.table_mode:
            self.written.add(ALL)
        self.units.appendleft(unit)
        if not primary.busy:
            self.units.popleft()
            self._send(primary, unit)

    def _after(self, link: Link) -> None:
        """After a backend's bytes: a finished unit frees the session for the next."""
        if link.replica is not None and link.closed and link.unit is None:
            self._drop_link(link)
        if link.busy:
            return
        if link.conv.tx_status == _IDLE:
            if self.pending_settings and not self.unit_failed:
                self._commit_settings(link)
            self.pending_settings.clear()
            self.unit_failed = False
            if link.replica is None and self.dirty:
                self.dirty = False
                self.horizon = self.router.horizon()
                if self.written:
                    self.router.note_writes(self.database, self.written, self.horizon)
                    self.written = set()
        self._pump()

    # ------------------------------------------------------------------ settings
    def statement_done(self, pending: Pending, index: int, tag: bytes | None, rows: int,
                       sqlstate: str | None, started: float, ended: float) -> None:
        self.route = self._current
        super().statement_done(pending, index, tag, rows, sqlstate, started, ended)
        if sqlstate is not None:
            self.unit_failed = True
            return
        if tag == b"ROLLBACK":
            self.pending_settings.clear()
            return
        if not pending.sql or (tag is not None and not tag.startswith(_SESSION_TAGS)):
            return  # only SET / RESET / DISCARD / DEALLOCATE change what a replica must replay
        stmts = self._statements_nr(pending.sql)
        if index >= len(stmts):
            return
        n, shape = stmts[index]
        if shape.kind is StatementKind.SET:
            if n.text.startswith(("set local ", "set transaction ")):
                return
            self.pending_settings.append(_literal_text(n))
        elif shape.kind is StatementKind.UTILITY and shape.command in ("deallocate", "discard"):
            self._forget_statements(n.text)

    def _statements_nr(self, sql: str) -> list[tuple[Normalized, Shape]]:
        profiler = self.profiler
        if profiler is not None:
            return [(s.normalized, s.shape) for s in profiler.statements(self.info, sql)]
        cache = self.router.cache
        return [(n, cache.shape(n)) for n in cache.scan(sql)]

    def _commit_settings(self, link: Link) -> None:
        for text in self.pending_settings:
            if text.lower().startswith(("reset all", "discard all")):
                self.settings.clear()
                self.settings_gen += 1
            else:
                self.settings.append(text)
        link.settings_gen = self.settings_gen
        link.settings_applied = len(self.settings)

    def _forget_statements(self, text: str) -> None:
        if text.startswith("discard"):
            if text not in ("discard all",):
                return
            self.pending_settings.append("discard all")
            names = None
        else:
            m = _DEALLOCATE_RE.match(text)
            if m is None:
                return
            arg = m.group(1).strip()
            names = None if arg == "all" else {arg.strip('"').encode()}
        for lk in self._all_links():
            if lk.name != self._current:
                lk.to_close.update(lk.prepared if names is None else
                                   (x for x in names if x in lk.prepared))
            else:
                for x in (list(lk.prepared) if names is None else names):
                    lk.prepared.pop(x, None)
        if names is None:
            self.statements.clear()
        else:
            for x in names:
                self.statements.pop(x, None)

    # ------------------------------------------------------------------ teardown
    def link_lost(self, link: Link, exc: Exception | None) -> None:
        link.transport = None
        link.closed = True
        unit = link.unit
        if unit is not None and link.replica is not None:
            self.router.mark_down(link.replica, f"connection lost: {exc}" if exc else
                                  "connection lost")
            held = link.hold is not None
            link.hold = None
            self._finish_replica_unit(link)
            self.links.pop(link.name, None)
            if held and self.state is SessionState.READY and not unit.in_tx:
                self._retry_on_primary(link, unit, "connection lost")
                return
            if self.state is SessionState.READY:
                self.fail(ConnectionFailure(
                    "replica connection lost in the middle of a statement",
                    detail=f"replica {link.name}"))
            return
        if self.links.get(link.name) is link:
            del self.links[link.name]
        if self.tx_link is link:
            self.tx_link = None
            if link.conv.tx_status != _IDLE and self.state is SessionState.READY:
                self.fail(ConnectionFailure(
                    "replica connection lost inside a transaction block",
                    detail=f"replica {link.name}"))
                return
        if self.state is SessionState.READY:
            self._pump()

    def _drop_link(self, link: Link) -> None:
        if self.links.get(link.name) is link:
            del self.links[link.name]
        link.closed = True
        if self.tx_link is link and link.unit is None:
            self.tx_link = None
        t = link.transport
        if t is not None and not t.is_closing():
            t.write(TERMINATE)
            t.close()

    def _close_replicas(self) -> None:
        for link in list(self.links.values()):
            self._drop_link(link)

    def connection_lost(self, exc: Exception | None) -> None:
        for link in list(self.links.values()):
            if link.unit is not None and link.key is not None:
                self.server.send_cancel(link.address, link.key)
        self._close_replicas()
        super().connection_lost(exc)

    def fail(self, exc: ProxyError, *, quiet: bool = False) -> None:
        self._close_replicas()
        super().fail(exc, quiet=quiet)

    def cancel_backend_query(self) -> asyncio.Task[None] | None:
        for link in self.links.values():
            if link.unit is not None and link.key is not None:
                return self.server.send_cancel(link.address, link.key)
        return super().cancel_backend_query()

    def pause_writing(self) -> None:
        super().pause_writing()
        for link in self.links.values():
            if link.transport is not None:
                link.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        for link in self.links.values():
            if link.transport is not None and not link.transport.is_closing():
                link.transport.resume_reading()

    @property
    def replica_backends(self) -> dict[str, Link]:
        """This session's open replica connections, by replica name."""
        return self.links

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["backends"] = (["primary"] if self.primary_link is not None else []) + list(
            self.links)
        out["pinned"] = self.pinned
        return out


def _ends_with_rfq(out: bytearray) -> bool:
    return len(out) >= 6 and out[-6] == 90 and _unpack_int32(out, len(out) - 5)[0] == 5


def _sqlstate(body: bytes) -> str:
    for field in body.split(b"\x00"):
        if field[:1] == b"C":
            return field[1:].decode("ascii", "replace")
    return "XX000"


def _error_text(body: bytes) -> str:
    fields = {f[:1]: f[1:].decode("utf-8", "replace") for f in body.split(b"\x00") if f}
    return f"{fields.get(b'C', '?')}: {fields.get(b'M', '')}"


_PARAM_RE = re.compile(r"\$([0-9]+)")


def _literal_text(n: Normalized) -> str:
    """A statement's text with its literals back in place (for replaying SET elsewhere)."""
    values = n.values
    if not values:
        return n.text

    def put(m: re.Match[str]) -> str:
        i = int(m.group(1)) - 1
        return values[i] if 0 <= i < len(values) else m.group(0)

    return _PARAM_RE.sub(put, n.text)
