"""Listening sockets for clients that may start TLS directly (PostgreSQL 17 direct TLS).

A libpq 17+ client with ``sslnegotiation=direct`` sends no SSLRequest: its first bytes are a TLS
ClientHello (record type 0x16). A startup packet's first byte is the high byte of its length,
which is never 0x16 (that would be a packet of hundreds of megabytes), so one byte tells the two
apart. It has to be looked at *before* asyncio reads it: ``loop.start_tls`` cannot be handed a
ClientHello that the protocol has already consumed. So when client TLS is configured, sqlproxy
accepts on its own non-blocking sockets, peeks at the first byte (``MSG_PEEK`` leaves it in the
kernel buffer), and hands the socket to ``loop.connect_accepted_socket`` — with the TLS context
when it starts with 0x16, as is otherwise. Either way the session protocol, its transports and
its hot path are the ones a plain ``create_server`` gives.

Like PostgreSQL 17, a direct TLS client must negotiate the ALPN protocol ``postgresql`` (it is
what stops a TLS connection meant for another protocol from being taken as a PostgreSQL one);
one that does not is refused with 08P01 over the TLS channel and closed. Without a certificate
configured (or with ``tls.client_mode = "disable"``) a direct TLS client is closed at once
(nothing it could read can be sent before a handshake).

The wait for the first byte is bounded by ``proxy.startup_timeout`` (a client that says nothing
gets the same 08P01 the session would give it).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, cast

from sqlproxy.logs import get_logger
from sqlproxy.wire.messages import error_response

if TYPE_CHECKING:
    from sqlproxy.proxy.server import ProxyServer
    from sqlproxy.proxy.session import ClientSession

__all__ = ["TLS_HANDSHAKE", "Listener"]

log = get_logger("sqlproxy.listener")

TLS_HANDSHAKE = 0x16  # TLS record content type "handshake": the first byte of a ClientHello
ALPN = "postgresql"
_ACCEPTS_PER_WAKEUP = 256


class Listener:
    """Accepts connections, tells direct TLS from a PostgreSQL startup by the first byte, and
    hands each socket to asyncio with or without TLS."""

    def __init__(self, server: ProxyServer, factory: Callable[[], ClientSession]) -> None:
        self.server = server
        self.factory = factory
        self.sockets: list[socket.socket] = []
        self._waiting: dict[socket.socket, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.direct_tls = 0  # handshakes completed with ALPN "postgresql"
        self.refused = 0  # direct TLS clients refused (no certificate, no ALPN)

    async def start(self, host: str, port: int, backlog: int, reuse_port: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        seen: set[tuple[int, object]] = set()
        try:
            for family, type_, proto, _, addr in infos:
                if (family, addr) in seen:
                    continue
                seen.add((family, addr))
                sock = socket.socket(family, type_, proto)
                self.sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:  # worker processes: the kernel spreads connections over them
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(addr)
                sock.listen(backlog)
                sock.setblocking(False)
        except BaseException:
            self.close()
            raise
        for sock in self.sockets:
            loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        """Stop listening; connections still waiting for their first byte are closed."""
        self._closed = True
        loop = self._loop
        for sock in self.sockets:
            if loop is not None and sock.fileno() != -1:
                loop.remove_reader(sock.fileno())
            sock.close()
        for conn, timer in list(self._waiting.items()):
            timer.cancel()
            self._drop(conn)
        self._waiting.clear()

    async def wait_closed(self) -> None:
        """Let handshakes in progress end (they are bounded by the handshake timeout)."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ accepting
    def _accept(self, lsock: socket.socket) -> None:
        loop = self._loop
        assert loop is not None
        for _ in range(_ACCEPTS_PER_WAKEUP):
            try:
                conn, _ = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: back off rather than spin
                log.warning("accept_failed", error=f"{type(exc).__name__}: {exc}")
                loop.remove_reader(lsock.fileno())
                loop.call_later(1.0, self._resume, lsock)
                return
            conn.setblocking(False)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._waiting[conn] = loop.call_later(
                self.server.config.proxy.startup_timeout, self._silent, conn)
            loop.add_reader(conn.fileno(), self._first_byte, conn)

    def _resume(self, lsock: socket.socket) -> None:
        if not self._closed and self._loop is not None and lsock.fileno() != -1:
            self._loop.add_reader(lsock.fileno(), self._accept, lsock)

    def _drop(self, conn: socket.socket) -> None:
        if self._loop is not None and conn.fileno() != -1:
            self._loop.remove_reader(conn.fileno())
        conn.close()

    def _silent(self, conn: socket.socket) -> None:
        """The client sent nothing within ``proxy.startup_timeout``: what the session says."""
        self._waiting.pop(conn, None)
        timeout = self.server.config.proxy.startup_timeout
        message = f"startup did not complete within {timeout:g} s (proxy.startup_timeout)"
        log.warning("session_error", client=_peer(conn), sqlstate="08P01", error=message)
        with contextlib.suppress(OSError):
            conn.send(error_response("08P01", message))
        self._drop(conn)

    def _first_byte(self, conn: socket.socket) -> None:
        loop = self._loop
        assert loop is not None
        try:
            first = conn.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return  # spurious wakeup: keep waiting
        except OSError:
            first = b""
        timer = self._waiting.pop(conn, None)
        if timer is not None:
            timer.cancel()
        loop.remove_reader(conn.fileno())
        if not first:  # closed (or reset) before saying anything, as port probes do
            conn.close()
            return
        if first[0] != TLS_HANDSHAKE:
            self._spawn(self._plain(conn))
            return
        ctx = self.server.tls_context
        if ctx is None:
            self.refused += 1
            log.warning("direct_tls_refused", client=_peer(conn),
                        reason="no certificate: set tls.cert_file and tls.key_file (and "
                        "tls.client_mode other than \"disable\")")
            conn.close()
            return
        self._spawn(self._direct_tls(conn, ctx))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        loop = self._loop
        assert loop is not None
        task = loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _plain(self, conn: socket.socket) -> None:
        loop = self._loop
        assert loop is not None
        try:
            await loop.connect_accepted_socket(self.factory, conn)
        except OSError as exc:
            log.info("accept_failed", error=f"{type(exc).__name__}: {exc}")

    async def _direct_tls(self, conn: socket.socket, ctx: ssl.SSLContext) -> None:
        loop = self._loop
        assert loop is not None
        peer = _peer(conn)
        try:
            # Once handed over, the socket belongs to the transport (closed with it).
            await loop.connect_accepted_socket(
                lambda: _Handshake(self, peer), conn, ssl=ctx,
                ssl_handshake_timeout=self.server.config.proxy.startup_timeout)
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            log.info("tls_handshake_failed", client=peer, direct=True,
                     error=f"{type(exc).__name__}: {exc}")


class _Handshake(asyncio.Protocol):
    """Owns a direct TLS connection just long enough to check ALPN, then gives the transport
    to a session, in ``connection_made`` — before any application data can be delivered."""

    def __init__(self, listener: Listener, peer: str) -> None:
        self.listener = listener
        self.peer = peer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = cast(asyncio.Transport, transport)
        obj = t.get_extra_info("ssl_object")
        alpn = obj.selected_alpn_protocol() if obj is not None else None
        if alpn != ALPN:
            self.listener.refused += 1
            log.warning("direct_tls_refused", client=self.peer,
                        reason=f'the client did not negotiate ALPN "{ALPN}"')
            t.write(error_response(
                "08P01", "received direct SSL connection request without ALPN protocol "
                f'negotiation extension (ALPN "{ALPN}" is required)'))
            t.close()
            return
        self.listener.direct_tls += 1
        session = self.listener.factory()
        session.tls = obj.version() or "TLS"
        t.set_protocol(session)
        session.connection_made(t)


def _peer(conn: socket.socket) -> str:
    try:
        peer = conn.getpeername()
    except OSError:
        return "?"
    if isinstance(peer, tuple):
        return f"{peer[0]}:{peer[1]}"
    return str(peer)
