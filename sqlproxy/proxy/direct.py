"""A compiled protocol that reads and writes its socket directly: the base of the pooled
pumps (``fastpool.py``). Once ``start_direct`` succeeds, the socket is read through a duplicate
watched by the loop's poller (``pump.add_reader``) and written with ``_sockio.send`` while the
transport has nothing waiting (what a socket does not take goes to its transport, which keeps
the order); until then, and after ``stop_direct`` (end of stream, socket error, close), its
transport carries on. Reading pauses for backpressure whoever reads.

Whether the transport has anything waiting is known without asking it on every send: while the
socket is read directly, the transport's write buffer limits are 0, so it calls
``pause_writing`` as soon as it holds a byte (whoever wrote it: this protocol or the session's
general path) and ``resume_writing`` once it has written all of it. Compiled with mypyc (see
setup.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from mypy_extensions import i64

from sqlproxy.proxy.pump import Batch, StandIn, add_reader, remove_reader

try:
    from sqlproxy.proxy import _sockio
except ImportError:  # pragma: no cover - built with the package
    _sockio = None  # type: ignore[assignment]

__all__ = ["DirectSocket"]


def _no_recv(fd: int) -> bytes | None:
    raise OSError("no direct relay (sqlproxy.proxy._sockio is not built)")


def _no_send(fd: int, data: bytes) -> int:
    raise OSError("no direct relay (sqlproxy.proxy._sockio is not built)")


class DirectSocket(StandIn):
    """A socket read and written directly (the module doc), once
    ``start_direct`` succeeds; until then, and after ``stop_direct``, its transport's."""

    def __init__(self, owner: Any) -> None:
        super().__init__(owner)
        self.transport: Any = None
        self.fd: i64 = -1  # a duplicate of the transport's socket, watched by the loop
        self.fd_obj: Any = -1  # the same, boxed once (passed to _sockio as it is)
        self.loop: Any = None
        self.batch: Batch | None = None  # the poller's while watched: the end of its batch
        self.watching = False
        self.paused = False  # reading paused (backpressure), whoever reads
        self.spilled = False  # the transport holds bytes to write (between pause and resume)
        # Held here: a compiled call of a native attribute costs no lookup by name.
        self.recv: Callable[[int], bytes | None] = _sockio.recv if _sockio is not None \
            else _no_recv
        self.sendto: Callable[[int, bytes], int] = _sockio.send if _sockio is not None \
            else _no_send

    def data_received(self, data: bytes) -> None:
        raise NotImplementedError

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_direct()
        self.owner.connection_lost(exc)

    def start_direct(self, loop: Any) -> bool:
        """Read and write the transport's socket directly from now on, if it is a plain
        socket with nothing left to write. False: the transport carries on."""
        t = self.transport
        if _sockio is None or self.fd >= 0 or t is None or t.is_closing() \
                or t.get_extra_info("ssl_object") is not None or t.get_write_buffer_size():
            return False
        sock = t.get_extra_info("socket")
        if sock is None:
            return False
        self.fd = os.dup(sock.fileno())
        self.fd_obj = self.fd
        self.loop = loop
        self.spilled = False
        t.set_write_buffer_limits(high=0)  # pause_writing at the first byte held (``spilled``)
        t.pause_reading()
        try:
            self.watch()
        except BaseException:
            self.stop_direct()
            raise
        return True

    def watch(self) -> None:
        if self.fd >= 0 and not self.watching and not self.paused:
            self.watching = True
            self.batch = add_reader(self.loop, self.fd, self.readable)

    def unwatch(self) -> None:
        if self.watching:
            self.watching = False
            self.batch = None
            remove_reader(self.loop, self.fd)

    def readable(self, now: float) -> None:
        """The socket is readable (the poller's callback; ``now``: its time, pump.POLL_CLOCK)."""
        fd = self.fd
        if fd < 0:
            return
        try:
            data = self.recv(self.fd_obj)
        except OSError:
            self.stop_direct()  # the transport, reading again, meets the error itself
            return
        if data is None:
            return
        if len(data) == 0:  # the end of the stream: the transport closes, as eof_received has it
            self.stop_direct()
            t = self.transport
            if t is not None:
                t.close()
            return
        self.received(data, now)

    def received(self, data: bytes, now: float) -> None:
        """A chunk read directly at ``now`` (the poller's time): ``data_received`` unless a
        subclass uses the time."""
        self.data_received(data)

    def stop_direct(self) -> None:
        """Give the socket back to the transport (and close the duplicate). Idempotent."""
        fd = self.fd
        if fd < 0:
            return
        self.unwatch()
        self.fd = -1
        self.fd_obj = -1
        os.close(fd)
        t = self.transport
        if t is not None and not t.is_closing():
            t.set_write_buffer_limits()  # the defaults again: backpressure past 64 KiB
            if not self.paused:
                t.resume_reading()

    def pause_reading(self) -> None:
        if self.paused:
            return
        self.paused = True
        if self.fd >= 0:
            self.unwatch()
        elif self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.paused:
            return
        self.paused = False
        t = self.transport
        if self.fd >= 0:
            self.watch()
        elif t is not None and not t.is_closing():
            t.resume_reading()

    def pause_writing(self) -> None:
        if self.fd >= 0:
            self.spilled = True
        self.owner.pause_writing()

    def resume_writing(self) -> None:
        self.spilled = False
        self.owner.resume_writing()

    def send(self, data: bytes) -> None:
        """Write ``data``: to the socket directly while the transport has nothing waiting
        (``spilled``: what the socket does not take goes to the transport, which keeps the
        order), else to the transport."""
        t = self.transport
        fd = self.fd
        if fd >= 0 and not self.spilled:
            try:
                n = self.sendto(self.fd_obj, data)
            except OSError:  # the transport meets the error in turn and reports the loss
                n = 0
            if n == len(data):
                return
            data = data[n:]
        if not t.is_closing():
            t.write(data)
