"""The hot path of a plain (unrouted) session: two small protocols and a direct relay,
compiled with mypyc.

Once a session is ready, and unless the direct relay below serves it, every chunk either side
sends goes through one ``data_received``:
the conversation tracker looks at it and it is written on to the other side. Interpreted,
that method costs a Python frame and a chain of attribute lookups per chunk, several times
per transaction; so the session hands both transports over to these compiled protocols
(``transport.set_protocol``) when it goes hot. They hold what they need as native fields (the
tracker, the other transport's bound ``write``) and pass everything else that happens on
the connection (loss, flow control) back to the session's own protocol objects.

asyncio and uvloop call protocol methods by name, so these need not inherit from
``asyncio.Protocol`` (a compiled class cannot).

The direct relay
----------------
Even a compiled ``data_received`` leaves most of the proxy's own CPU time in the event loop:
for every chunk a uvloop stream takes the GIL twice (to hand libuv a read buffer, then to
deliver the data) and runs its transport machinery to write it on. A plain session (no TLS on
either side, one backend) can skip that: ``Relay`` pauses both transports, watches duplicates
of their sockets and moves the bytes itself with ``_sockio`` (a few lines of C that read and
write a non-blocking socket without releasing the GIL): one callback per chunk. The sockets are
watched through one epoll instance per loop (``add_reader``), which the loop watches: one loop
callback, and one taking of the GIL, serve every socket ready at once. It only accelerates the
ordinary case: at the end of either stream, on a socket error, on a protocol violation and at
teardown it steps aside (``stop``): whatever it still holds for a socket goes to that socket's
transport, both transports read again, and the session's ordinary code sees the end, the error
or the goodbye as it would without the relay. A socket that cannot take everything at once gets
the rest when it is writable again (and past ``HIGH_WATER`` waiting bytes the other socket is
not read until ``LOW_WATER``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, Final

from sqlproxy.errors import ProtocolViolation, ProxyError
from sqlproxy.wire.conversation import Conversation

try:
    from sqlproxy.proxy import _sockio
except ImportError:  # pragma: no cover - built with the package; without it, no direct relay
    _sockio = None  # type: ignore[assignment]

__all__ = ["HAVE_RELAY", "BackendPump", "Batch", "ClientPump", "Relay", "StandIn",
           "add_reader", "remove_reader"]

HAVE_RELAY: Final = _sockio is not None
# Bytes waiting for a socket before its source is no longer read, until the wait is down to
# LOW_WATER (asyncio's defaults). One read takes at most _sockio.RECV_SIZE (64 KiB), so at
# most HIGH_WATER + RECV_SIZE bytes wait for a socket.
HIGH_WATER: Final = 64 * 1024
LOW_WATER: Final = 16 * 1024


# Per event loop, the poller (``_sockio.Poller``) its relayed sockets are watched through: the
# loop watches the poller's descriptor, and one callback serves every socket ready then. Read
# through the loop itself, each socket would cost the loop's handle machinery and a taking of
# the GIL per chunk.
_pollers: dict[Any, Any] = {}
_batches: dict[Any, Batch] = {}


class Batch:
    """Work that can wait for the end of the poller's batch (``Poller.set_after``): what a
    socket's callback did first is what the other sockets ready in the same batch wait for.
    The pooled fast path sends an answer on and gives its server back at once, and leaves the
    statement's record (``Conversation.record_held``) to the batch's end: every socket ready
    then is served before any record is made, and the records are made while PostgreSQL and
    the clients work on what was sent. A conversation records what it holds before it takes
    anything else, so its records keep their order."""

    def __init__(self) -> None:
        self.held: list[Conversation] = []  # conversations holding a record back

    def flush(self) -> None:
        """Make the records held back (the poller calls it after each batch). Should one
        fail (a bug: its error is raised), the records after it are made when their
        conversation takes anything next, or when its session ends."""
        held = self.held
        if not len(held):
            return
        try:
            for conv in held:
                conv.record_held()
        finally:
            held.clear()


# Whether the poller's time (CLOCK_MONOTONIC, read once per batch and passed to each reader)
# is time.perf_counter's: then a reader takes it as its chunk's time instead of reading the
# clock again.
POLL_CLOCK: Final = (time.get_clock_info("perf_counter").implementation
                     == "clock_gettime(CLOCK_MONOTONIC)")


def add_reader(loop: Any, fd: int, callback: Callable[[float], object]) -> Batch:
    """``loop.add_reader(fd, callback)``, through the loop's poller: ``callback(now)``,
    ``now`` when the poller saw the socket readable (see POLL_CLOCK). Returns the poller's
    Batch: what the callback leaves for the end of its batch."""
    poller = _pollers.get(loop)
    if poller is None:
        poller = _sockio.Poller()
        batch = Batch()
        try:
            loop.add_reader(poller.fileno(), poller.dispatch)
        except BaseException:
            poller.close()
            raise
        poller.set_after(batch.flush)
        _pollers[loop] = poller
        _batches[loop] = batch
    poller.add(fd, callback)
    return _batches[loop]


def remove_reader(loop: Any, fd: int) -> None:
    """``loop.remove_reader(fd)`` for a socket ``add_reader`` watches (before it is closed);
    the poller goes when it watches nothing."""
    poller = _pollers.get(loop)
    if poller is None or not poller.remove(fd):
        return
    if not len(poller):
        del _pollers[loop]
        batch = _batches.pop(loop)
        try:
            if not loop.is_closed():
                loop.remove_reader(poller.fileno())
            poller.close()
        finally:
            batch.flush()  # (what it holds back; the poller goes whatever a record does)


class StandIn:
    """A compiled protocol standing in for an interpreted one (``owner``) on a transport:
    what it does not handle itself (the end of the stream, the loss, flow control) it passes
    on. The base of every hot-path protocol (here, in fastroute.py, direct.py and fastpool.py)."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner

    def eof_received(self) -> bool | None:
        return None  # let the transport close itself, as asyncio.Protocol does

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.owner.pause_writing()

    def resume_writing(self) -> None:
        self.owner.resume_writing()


class _Pump(StandIn):
    """What both pumps of a plain session share."""

    def __init__(self, owner: Any, conv: Conversation, other_transport: Any) -> None:
        super().__init__(owner)
        self.conv = conv
        self.write: Callable[[bytes], object] = other_transport.write
        self.clock: Callable[[], float] = time.perf_counter


class ClientPump(_Pump):
    """The client side of a ready session (owner: the ClientSession): check each chunk,
    forward it to the server."""

    def data_received(self, data: bytes) -> None:
        try:
            self.conv.feed_frontend(data, self.clock())
        except ProtocolViolation as exc:
            self.owner.fail(exc)
            return
        self.write(data)


class BackendPump(_Pump):
    """The server side of a ready session (owner: the BackendConnection): forward each chunk
    to the client, then track it."""

    def data_received(self, data: bytes) -> None:
        self.write(data)
        self.conv.feed_backend(data, self.clock())


class _Side:
    """One socket of a relay: read for the other side's benefit, written with its bytes."""

    def __init__(self, relay: Relay, fd: int, transport: Any,
                 readable: Callable[[float], None]) -> None:
        self.relay = relay
        self.fd = fd
        self.transport = transport
        self.readable = readable  # the relay's callback for this socket
        self.reading = False  # watched for readability
        # What the socket has not taken yet; watched for writability while there is some.
        self.pending: bytearray | None = None
        self.other: _Side = self  # the relay sets the other side
        # Held here: a compiled call of a native attribute costs no module lookup.
        self.send: Callable[[int, bytes | bytearray], int] = _sockio.send

    def watch(self) -> None:
        if not self.reading:
            self.reading = True
            add_reader(self.relay.loop, self.fd, self.readable)

    def unwatch(self) -> None:
        if self.reading:
            self.reading = False
            remove_reader(self.relay.loop, self.fd)

    def write(self, data: bytes) -> None:
        """Send ``data`` (raises OSError if the socket is broken); past HIGH_WATER waiting
        bytes the other socket is no longer read."""
        pending = self.pending
        if pending is not None:
            pending += data
            if len(pending) > HIGH_WATER:
                self.other.unwatch()
            return
        n = self.send(self.fd, data)
        if n == len(data):
            return
        pending = self.pending = bytearray(data[n:])
        self.relay.loop.add_writer(self.fd, self.writable)
        if len(pending) > HIGH_WATER:
            self.other.unwatch()

    def writable(self) -> None:
        pending = self.pending
        if pending is None or not self.relay.active:
            return
        try:
            n = self.send(self.fd, pending)
        except OSError:
            self.relay.stop()  # the transport gets the rest and reports the error
            return
        del pending[:n]
        if not pending:
            self.pending = None
            self.relay.loop.remove_writer(self.fd)
        if len(pending) <= LOW_WATER:
            self.other.watch()


class Relay:
    """Moves a plain session's bytes between its two sockets directly (see the module doc).

    Created, it serves both sockets until ``stop``. ``owner`` is the ClientSession (``fail``
    on a protocol violation); the transports stay the session's and get everything back at
    ``stop``. Both must have nothing left to write when the relay starts."""

    def __init__(self, owner: Any, conv: Conversation, loop: Any,
                 client_transport: Any, backend_transport: Any) -> None:
        self.owner = owner
        self.conv = conv
        self.loop = loop
        self.clock: Callable[[], float] = time.perf_counter
        self.recv: Callable[[int], bytes | None] = _sockio.recv
        self.active = False
        cfd = os.dup(client_transport.get_extra_info("socket").fileno())
        try:
            bfd = os.dup(backend_transport.get_extra_info("socket").fileno())
        except BaseException:
            os.close(cfd)
            raise
        client = self.client = _Side(self, cfd, client_transport, self.client_readable)
        backend = self.backend = _Side(self, bfd, backend_transport, self.backend_readable)
        client.other, backend.other = backend, client
        # Take over both sockets (the transports must have nothing left to write).
        client_transport.pause_reading()
        backend_transport.pause_reading()
        self.active = True
        try:
            client.watch()
            backend.watch()
        except BaseException:
            self.stop()  # back to the transports, duplicates closed
            raise

    def _read(self, side: _Side) -> bytes | None:
        """The next chunk from ``side``'s socket, or None: nothing there yet, or the relay
        stepped aside at the end of the stream (the socket's transport is closed, as the pumps'
        ``eof_received`` has it) or on a socket error (the transport, reading again, meets the
        error or the end itself); either way the session then closes as usual."""
        try:
            data = self.recv(side.fd)
        except OSError:
            self.stop()
            return None
        if data is not None and not data:
            self.stop()
            side.transport.close()
            return None
        return data

    def client_readable(self, now: float) -> None:
        if not self.active:
            return
        data = self._read(self.client)
        if data is None:
            return
        try:
            self.conv.feed_frontend(data, now if POLL_CLOCK else self.clock())
        except ProtocolViolation as exc:
            self.owner.fail(exc)
            return
        except Exception as exc:  # a fault of ours: an answer, not a client left waiting
            self.owner.fail(ProxyError(f"internal error in sqlproxy: {type(exc).__name__}: {exc}"))
            return
        try:
            self.backend.write(data)
        except OSError:
            self._hand_over(self.backend, data)

    def backend_readable(self, now: float) -> None:
        if not self.active:
            return
        data = self._read(self.backend)
        if data is None:
            return
        try:
            self.client.write(data)
        except OSError:
            self._hand_over(self.client, data)
        self.conv.feed_backend(data, now if POLL_CLOCK else self.clock())

    def _hand_over(self, out: _Side, data: bytes) -> None:
        """``out``'s socket failed: step aside and give ``data`` to its transport, which
        meets the error in turn and reports the loss to the session."""
        self.stop()
        if not out.transport.is_closing():
            out.transport.write(data)

    def stop(self) -> None:
        """Step aside: hand what is still to be written to the transports, let them read
        again and close the duplicated sockets. Idempotent."""
        if not self.active:
            return
        self.active = False
        for side in (self.client, self.backend):
            side.unwatch()
            if side.pending is not None:
                self.loop.remove_writer(side.fd)
            os.close(side.fd)
            t = side.transport
            if not t.is_closing():
                t.resume_reading()
                if side.pending:
                    t.write(bytes(side.pending))
            side.pending = None
