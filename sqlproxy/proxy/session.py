"""One client session: the client-side protocol paired with its backend connection.

Startup is handled message by message (it is rare and small); once the server has sent the first
ReadyForQuery the session switches to the hot path, where each received chunk is checked by the
sans-IO ``Conversation`` and forwarded as received, in one ``write`` call.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import struct
import sys
import time
from enum import Enum
from typing import TYPE_CHECKING, Any, cast

from sqlproxy.analysis.profiler import Profiler
from sqlproxy.analysis.statement import SessionInfo
from sqlproxy.errors import ConnectionFailure, ProtocolViolation, ProxyError
from sqlproxy.logs import get_logger
from sqlproxy.proxy.connect import connect_backend
from sqlproxy.proxy.listener import TLS_HANDSHAKE
from sqlproxy.proxy.pump import HAVE_RELAY, BackendPump, ClientPump, Relay
from sqlproxy.proxy.recorder import SessionListener, SessionRecorder
from sqlproxy.proxy.tls import strip_channel_binding
from sqlproxy.wire.conversation import Conversation
from sqlproxy.wire.frames import Frames
from sqlproxy.wire.messages import (
    AUTH_OK,
    AUTH_SASL,
    B_AUTHENTICATION,
    B_BACKEND_KEY_DATA,
    B_ERROR_RESPONSE,
    B_PARAMETER_STATUS,
    B_READY_FOR_QUERY,
    F_PASSWORD,
    F_TERMINATE,
    MAX_STARTUP_PACKET,
    TERMINATE,
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    backend_key_data,
    error_response,
    parse_error_fields,
    parse_startup_packet,
)
from sqlproxy.wire.requests import ConversationListener, Pending

if TYPE_CHECKING:
    from sqlproxy.proxy.server import ProxyServer

log = get_logger("sqlproxy.session")
_AUTH_MESSAGES = frozenset({F_PASSWORD, F_TERMINATE})
_MAX_AUTH_MESSAGE = 65536
_MAX_STARTUP_MESSAGE = 1 << 24
_unpack_int32 = struct.Struct("!I").unpack_from
_perf = time.perf_counter


class SessionState(Enum):
    STARTUP = "startup"  # waiting for the client's startup packet
    CONNECTING = "connecting"  # opening the backend connection
    AUTHENTICATING = "authenticating"  # relaying the authentication exchange
    READY = "ready"  # hot path
    CLOSED = "closed"


class ServerSideProtocol(asyncio.Protocol):
    """Backpressure for a protocol facing a server: when the client is slow to read what we
    write it, the session's client transport pauses us, and we stop reading from the client
    while the server's transport cannot take more."""

    __slots__ = ()
    session: ClientSession

    def pause_writing(self) -> None:
        t = self.session.client_transport
        if t is not None:
            t.pause_reading()

    def resume_writing(self) -> None:
        t = self.session.client_transport
        if t is not None and not t.is_closing():
            t.resume_reading()


class BackendConnection(ServerSideProtocol):
    """The server side of a session."""

    __slots__ = ("_hot", "address", "conv", "frames", "key", "session", "transport")

    def __init__(self, session: ClientSession, address: tuple[str, int]) -> None:
        self.session = session
        self.address = address
        self.transport: asyncio.Transport | None = None
        # Startup only: the server's messages until ReadyForQuery, checked like any other.
        self.frames = Frames(_MAX_STARTUP_MESSAGE, "server message during startup")
        self._hot = False
        self.key: tuple[int, bytes] | None = None  # the server's BackendKeyData
        self.conv: Conversation | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._hot:
            self.session.client_transport.write(data)  # type: ignore[union-attr]
            self.conv.feed_backend(data, _perf())  # type: ignore[union-attr]
            return
        self.session.backend_startup_data(self, data)

    def go_hot(self, conv: Conversation) -> None:
        self.conv = conv
        self._hot = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.session.backend_lost(self, exc)


class ClientSession(asyncio.Protocol):
    """The client side of a session; owns the backend connection and the conversation."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.config = server.config
        self.id = server.next_session_id()
        self.state = SessionState.STARTUP
        self.client_transport: asyncio.Transport | None = None
        self.backend: BackendConnection | None = None
        self.startup: StartupMessage | None = None
        self.conv: Conversation | None = None
        self.proxy_key: tuple[int, bytes] | None = None
        self.connected_at = time.time()
        self.ready_at = 0.0  # perf_counter when startup completed (for the idle sweep)
        self.tls: str | None = None  # the client's TLS version once the handshake is done
        self.admitted = False  # counted against the connection limits (ProxyServer.admit)
        self._hot = False
        self._buf = bytearray()  # the startup packet, until complete
        self._auth_frames = Frames(_MAX_AUTH_MESSAGE, "message during authentication")
        self._startup_timer: asyncio.TimerHandle | None = None
        self._backend_timer: asyncio.TimerHandle | None = None
        self._pending_to_backend = bytearray()
        self._relayed_fatal = False
        self._closing = False
        self.relay: Relay | None = None  # the direct relay of a hot plain session (pump.py)
        self.parameters: dict[str, str] = {}
        self.profiler: Profiler | None = server.profiler
        self.info = SessionInfo(self.id, "?")  # what the profiler knows of the session
        self.route = "primary"
        # Records each statement and the transaction-block figures (see recorder.py).
        self.recorder: SessionRecorder | None = (
            SessionRecorder(self.profiler, self, self.info, self.route)
            if self.profiler is not None else None
        )

    @property
    def peer(self) -> str:
        """The client's address ("host:port"), "?" until known."""
        return self.info.peer

    @property
    def application_name(self) -> str:
        return self.info.application_name

    # ------------------------------------------------------------------ asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.client_transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.info.peer = f"{peer[0]}:{peer[1]}"
        elif peer:
            self.info.peer = str(peer)
        loop = asyncio.get_running_loop()
        self._startup_timer = loop.call_later(
            self.config.proxy.startup_timeout, self._startup_timed_out
        )
        self.server.sessions[self.id] = self

    def data_received(self, data: bytes) -> None:
        if self._hot:
            conv = self.conv
            try:
                conv.feed_frontend(data, _perf())  # type: ignore[union-attr]
            except ProtocolViolation as exc:
                self.fail(exc)
                return
            self.backend.transport.write(data)  # type: ignore[union-attr]
            return
        try:
            self._startup_data(data)
        except ProxyError as exc:
            self.fail(exc)

    def pause_writing(self) -> None:
        b = self.backend
        if b is not None and b.transport is not None:
            b.transport.pause_reading()

    def resume_writing(self) -> None:
        b = self.backend
        if b is not None and b.transport is not None and not b.transport.is_closing():
            b.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_relay()
        was = self.state
        self.state = SessionState.CLOSED
        self._hot = False
        self._cancel_startup_timer()
        self.server.session_closed(self)
        if self.profiler is not None:
            # Judges the session's last burst; a short session feeds the churn meter.
            self.profiler.session_closed(self.info, self.connected_at, self.ready_at)
        backend = self.backend
        if backend is not None and backend.transport is not None:
            if self.conv is not None and self.conv.busy and backend.key is not None:
                # The client went away mid-query: stop the server's work before closing.
                self.server.send_cancel(backend.address, backend.key)
            if not backend.transport.is_closing():
                if was is SessionState.READY:
                    backend.transport.write(TERMINATE)
                backend.transport.close()
        if self.startup is not None and self.config.log.connections:
            log.info("client_disconnected", session=self.id, client=self.peer,
                     user=self.startup.user, database=self.startup.database,
                     application_name=self.application_name)

    # ------------------------------------------------------------------ startup phase
    def _startup_data(self, data: bytes) -> None:
        if self.state is SessionState.STARTUP:
            self._buf += data
            while self.state is SessionState.STARTUP and len(self._buf) >= 4:
                length = _unpack_int32(self._buf, 0)[0]
                if length < 8 or length > MAX_STARTUP_PACKET:
                    if self._buf[0] == TLS_HANDSHAKE:  # only when started without a certificate
                        raise ProtocolViolation(
                            "direct TLS connection (sslnegotiation=direct) refused: TLS was "
                            "not enabled when sqlproxy started (tls.cert_file, tls.key_file, "
                            "tls.client_mode)")
                    raise ProtocolViolation(f"invalid length of startup packet: {length}")
                if len(self._buf) < length:
                    return
                packet = bytes(self._buf[:length])
                del self._buf[:length]
                self._startup_packet(packet)
            return
        if self.state is SessionState.CONNECTING:
            self._pending_to_backend += data
            return
        if self.state is SessionState.AUTHENTICATING:
            self._check_auth_frames(data)
            b = self.backend
            if b is not None and b.transport is not None:
                b.transport.write(data)

    def _check_auth_frames(self, data: bytes) -> None:
        """During authentication the client may only send password/SASL messages or Terminate."""
        frames = self._auth_frames
        for t, msg in frames.feed(data):
            if t not in _AUTH_MESSAGES:
                raise ProtocolViolation(f"unexpected message type {chr(t)!r} during authentication")
            if t == F_PASSWORD:
                self._client_auth_message(msg[5:])
        if len(frames) and frames.buf[0] not in _AUTH_MESSAGES:  # refused before it is whole
            raise ProtocolViolation(
                f"unexpected message type {chr(frames.buf[0])!r} during authentication")

    def _client_auth_message(self, body: bytes) -> None:
        """A password/SASL message from the client (startup only; a routed session watches
        the SCRAM exchange to authenticate to replicas)."""

    def _server_auth_message(self, code: int, body: bytes) -> None:
        """An Authentication message from the server: its code and the bytes after it."""

    def _startup_packet(self, packet: bytes) -> None:
        msg = parse_startup_packet(packet)
        transport = self.client_transport
        assert transport is not None
        if isinstance(msg, SSLRequest | GSSENCRequest):
            if self._buf:
                # Bytes after an SSLRequest before our answer: a TLS ClientHello sent blindly or
                # a confused client. PostgreSQL refuses this too.
                raise ProtocolViolation("received unencrypted data after SSL request")
            ctx = self.server.tls_context
            if isinstance(msg, GSSENCRequest) or ctx is None or self.tls is not None:
                transport.write(b"N")
                return
            # No byte may reach this protocol until the handshake is done: pause now, not
            # when the start_tls task first runs.
            transport.pause_reading()
            transport.write(b"S")
            asyncio.get_running_loop().create_task(self._start_tls(transport, ctx))
            return
        if isinstance(msg, CancelRequest):
            self._closing = True
            self.state = SessionState.CLOSED
            sent = self.server.forward_cancel(msg.pid, msg.secret)
            if sent is None:
                transport.close()
            else:  # closed once the server has processed it, as PostgreSQL does
                sent.add_done_callback(lambda _: transport.close())
            return
        if self.tls is None and self.config.tls.client_mode == "require":
            raise ProxyError(
                "connection without TLS refused: tls.client_mode is \"require\"",
                sqlstate="28000", detail="connect with sslmode=require or stronger",
            )
        self.startup = msg
        # Interned: the pool and the statistics compare it with the last one seen on every
        # statement, and the same name from every connection is then one object (identity).
        self.info.application_name = sys.intern(msg.application_name)
        self.info.database = msg.database
        self.info.user = msg.user
        problem = self.server.admit(self)
        if problem is not None:
            raise problem
        self.state = SessionState.CONNECTING
        if self._buf:  # sent right behind the startup packet: for the server, once connected
            self._pending_to_backend += self._buf
            self._buf.clear()
        if self.config.log.connections:
            log.info("client_connected", session=self.id, client=self.peer, user=msg.user,
                     database=msg.database, application_name=msg.application_name)
        if not self._connect_now(msg):
            asyncio.get_running_loop().create_task(self._connect_backend(msg))

    def _connect_now(self, msg: StartupMessage) -> bool:
        """Log the client in without waiting for anything, if this kind of session can (a
        pooled one answering from its pool); else ``_connect_backend`` runs as a task."""
        return False

    async def _start_tls(self, transport: asyncio.Transport, ctx: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        try:
            new = await loop.start_tls(transport, self, ctx, server_side=True)
        except (OSError, ConnectionError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            log.info("tls_handshake_failed", session=self.id, client=self.peer,
                     error=f"{type(exc).__name__}: {exc}")
            self._closing = True
            transport.abort()
            return
        if new is None or self.state is SessionState.CLOSED:
            return
        self.client_transport = new
        obj = new.get_extra_info("ssl_object")
        self.tls = obj.version() if obj is not None else "TLS"
        if self._buf:  # cannot happen (reading was paused); refuse rather than mix layers
            self.fail(ProtocolViolation("received unencrypted data after SSL request"))

    async def _connect_backend(self, msg: StartupMessage) -> None:
        url = self.config.proxy.primary_url
        address = (url.host, url.port)
        loop = asyncio.get_running_loop()
        try:
            _, backend = await connect_backend(
                self.server, url, lambda: BackendConnection(self, address),
                self.config.proxy.connect_timeout)
        except ProxyError as exc:
            self.fail(exc)
            return
        except (TimeoutError, OSError) as exc:
            reason = (
                f"timeout after {self.config.proxy.connect_timeout:g} s (proxy.connect_timeout)"
                if isinstance(exc, asyncio.TimeoutError) else (exc.strerror or str(exc)))
            self.fail(ConnectionFailure(
                f'connection to server at "{url.host}", port {url.port} failed: {reason}',
            ))
            return
        if self.state is SessionState.CLOSED:
            if backend.transport is not None:
                backend.transport.close()
            return
        self.backend = backend
        self.state = SessionState.AUTHENTICATING
        assert backend.transport is not None
        backend.transport.write(msg.raw)
        # proxy.connect_timeout also covers a server that accepts TCP but never answers.
        self._backend_timer = loop.call_later(
            self.config.proxy.connect_timeout, self._backend_silent, backend
        )
        if self._pending_to_backend:
            pending = bytes(self._pending_to_backend)
            self._pending_to_backend.clear()
            try:
                self._startup_data(pending)
            except ProxyError as exc:  # in a task: the client gets the error, not the loop
                self.fail(exc)

    def backend_startup_data(self, backend: BackendConnection, data: bytes) -> None:
        """Messages from the server before its first ReadyForQuery: relay, swapping the key."""
        if self._backend_timer is not None:
            self._backend_timer.cancel()
            self._backend_timer = None
        try:
            messages = backend.frames.feed(data)
        except ProtocolViolation as exc:
            self.fail(exc)
            return
        out = bytearray()
        transport = self.client_transport
        for i, (t, msg) in enumerate(messages):
            if t == B_BACKEND_KEY_DATA:
                pid = _unpack_int32(msg, 5)[0]
                secret = msg[9:]
                backend.key = (pid, secret)
                self.proxy_key = self.server.register_cancel_key(
                    self, self._client_pid(pid), len(secret))
                out += backend_key_data(self.proxy_key[0], self.proxy_key[1])
                continue
            if t == B_AUTHENTICATION and len(msg) >= 9 and _unpack_int32(msg, 5)[0] == AUTH_SASL:
                # Channel binding cannot span two TLS sessions: offer plain SCRAM only.
                out += strip_channel_binding(msg)
            else:
                out += msg
            if t == B_READY_FOR_QUERY:
                rest = b"".join(m for _, m in messages[i + 1 :]) + backend.frames.take_rest()
                if transport is not None:
                    transport.write(bytes(out))
                self._go_hot(backend, rest)
                return
            if t == B_ERROR_RESPONSE:
                self._relayed_fatal = True
                fields = parse_error_fields(msg[5:])
                log.info("authentication_failed", session=self.id, client=self.peer,
                         user=self.startup.user if self.startup else None,
                         sqlstate=fields.get("C"), message=fields.get("M"))
            elif t == B_PARAMETER_STATUS:
                k, _, v = msg[5:-1].partition(b"\x00")
                self.parameter_status(k.decode(), v.decode("utf-8", "replace"))
            elif t == B_AUTHENTICATION and len(msg) >= 9:
                code = _unpack_int32(msg, 5)[0]
                self._server_auth_message(code, msg[9:])
                if code == AUTH_OK:
                    self._check_auth_done()
        if out and transport is not None:
            transport.write(bytes(out))

    def _check_auth_done(self) -> None:
        pass

    def _client_pid(self, pid: int) -> int:
        """The PID the client is given for its server's ``pid`` (a pooled session has no
        server of its own: see docs/reliability.md)."""
        return pid

    def _go_hot(self, backend: BackendConnection, rest: bytes) -> None:
        self._cancel_startup_timer()
        self.ready_at = _perf()
        # Profiled: a compiled listener records each statement (see recorder.py); else the
        # session only hears of parameter changes.
        listener: ConversationListener = (
            SessionListener(self) if self.recorder is None else self.recorder
        )
        self.conv = self.info.conv = Conversation(listener, self.config.proxy.max_message_bytes)
        self.state = SessionState.READY
        backend.go_hot(self.conv)
        self._buf.clear()
        self._hot = True
        # From here on, both transports talk to the compiled pumps (see pump.py).
        client, server = self.client_transport, backend.transport
        if client is not None and server is not None:
            pump = BackendPump(backend, self.conv, client)
            # Duck-typed protocols: asyncio and uvloop call their methods by name.
            client.set_protocol(cast(Any, ClientPump(self, self.conv, server)))
            server.set_protocol(cast(Any, pump))
            if rest:
                pump.data_received(rest)
            if (HAVE_RELAY and self.config.proxy.direct_relay and self.tls is None
                    and server.get_extra_info("ssl_object") is None
                    and client.get_write_buffer_size() == 0
                    and server.get_write_buffer_size() == 0
                    and not client.is_closing() and not server.is_closing()):
                try:
                    self.relay = Relay(self, self.conv, asyncio.get_running_loop(),
                                       client, server)
                except Exception as exc:  # e.g. out of descriptors: the transports carry on
                    log.warning("direct_relay_unavailable", session=self.id,
                                error=f"{type(exc).__name__}: {exc}")
        elif rest:
            backend.data_received(rest)

    def stop_relay(self) -> None:
        """Give both sockets back to their transports (before writing to them, closing them
        or when one is lost)."""
        relay = self.relay
        if relay is not None:
            self.relay = None
            relay.stop()

    # ------------------------------------------------------------------ conversation listener
    def statement_done(
        self,
        pending: Pending,
        index: int,
        tag: bytes | None,
        rows: int,
        sqlstate: str | None,
        started: float,
        ended: float,
    ) -> None:
        # A plain session's conversation calls its recorder directly; sessions that listen
        # themselves (routed ones) hand the statement on, with the route it ran on.
        recorder = self.recorder
        if recorder is not None:
            recorder.route = self.route
            recorder.statement_done(pending, index, tag, rows, sqlstate, started, ended)

    def parameter_status(self, name: str, value: str) -> None:
        self.parameters[name] = value
        if name == "application_name":
            self.info.application_name = sys.intern(value)

    def transaction_status(self, previous: int, current: int, now: float) -> None:
        if self.recorder is not None:
            self.recorder.transaction_status(previous, current, now)

    @property
    def database(self) -> str:
        return self.startup.database if self.startup is not None else ""

    @property
    def user(self) -> str:
        return self.startup.user if self.startup is not None else ""

    # ------------------------------------------------------------------ errors and teardown
    def _startup_timed_out(self) -> None:
        self._startup_timer = None
        if self.state in (SessionState.STARTUP, SessionState.CONNECTING,
                          SessionState.AUTHENTICATING):
            self.fail(ProtocolViolation(
                "startup did not complete within "
                f"{self.config.proxy.startup_timeout:g} s (proxy.startup_timeout)"
            ))

    def _cancel_startup_timer(self) -> None:
        if self._startup_timer is not None:
            self._startup_timer.cancel()
            self._startup_timer = None
        if self._backend_timer is not None:
            self._backend_timer.cancel()
            self._backend_timer = None

    def _backend_silent(self, backend: BackendConnection) -> None:
        self._backend_timer = None
        if self.backend is backend and self.state is SessionState.AUTHENTICATING:
            host, port = backend.address
            log.warning("backend_connect_timeout", session=self.id, backend=f"{host}:{port}",
                        timeout_s=self.config.proxy.connect_timeout)
            self.fail(ConnectionFailure(
                f'connection to server at "{host}", port {port} failed: no answer within '
                f"{self.config.proxy.connect_timeout:g} s (proxy.connect_timeout)"
            ), quiet=True)

    def fail(self, exc: ProxyError, *, quiet: bool = False) -> None:
        """Send the client an ErrorResponse for ``exc`` and close the session.

        ``quiet``: the caller has logged its own event (timeouts, shutdown)."""
        if self._closing:
            return
        self._closing = True
        self.stop_relay()
        if not quiet:
            log.warning("session_error", session=self.id, client=self.peer,
                        sqlstate=exc.sqlstate, error=exc.message)
        t = self.client_transport
        if t is not None and not t.is_closing():
            t.write(error_response(exc.sqlstate, exc.message, detail=exc.detail))
            t.close()
        b = self.backend
        if b is not None and b.transport is not None and not b.transport.is_closing():
            if self.conv is not None and self.conv.busy and b.key is not None:
                self.server.send_cancel(b.address, b.key)
            elif self.state is SessionState.READY:
                b.transport.write(TERMINATE)  # a clean goodbye: no "unexpected EOF" logged
            b.transport.close()

    def backend_lost(self, backend: BackendConnection, exc: Exception | None) -> None:
        self.stop_relay()
        t = self.client_transport
        if t is None or t.is_closing() or self.state is SessionState.CLOSED:
            return
        conv = self.conv
        if self._relayed_fatal or (conv is not None and (conv.terminated or conv.fatal)):
            # The client already has the server's own FATAL error (or asked to leave).
            t.close()
            return
        self.fail(ConnectionFailure(
            "server closed the connection unexpectedly",
            detail=f"backend {backend.address[0]}:{backend.address[1]}"
            + (f": {exc}" if exc else ""),
        ))

    def cancel_backend_query(self) -> asyncio.Task[None] | None:
        """Cancel what the session's server connection is running (a client's CancelRequest)."""
        b = self.backend
        if b is not None and b.key is not None:
            return self.server.send_cancel(b.address, b.key)
        return None

    def describe(self) -> dict[str, Any]:
        """A JSON-able view of the session for the admin API."""
        conv = self.conv
        current: dict[str, Any] | None = None
        pending = conv.pending() if conv is not None else []
        if pending:
            head = pending[0]
            current = {"query": head.sql[:1000], "running_ms": (_perf() - head.sent) * 1000}
        return {
            "id": self.id,
            "client": self.peer,
            "user": self.startup.user if self.startup else None,
            "database": self.startup.database if self.startup else None,
            "application_name": self.application_name,
            "state": self.state.value,
            "transaction_status": chr(conv.tx_status) if conv else None,
            "current": current,
            "backends": ["primary"] if self.backend is not None else [],
            "connected_at": self.connected_at,
            "tls": self.tls,
            "direct_relay": self.relay is not None,
        }


def random_secret(length: int) -> bytes:
    return os.urandom(length)
