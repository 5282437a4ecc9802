"""The hot path of a plain (unrouted) session: two small protocols, compiled with mypyc.

Once a session is ready, every chunk either side sends goes through one ``data_received``:
the conversation tracker looks at it and it is written on to the other side. Interpreted,
that method costs a Python frame and a chain of attribute lookups per chunk, several times
per transaction; so the session hands both transports over to these compiled protocols
(``transport.set_protocol``) when it goes hot. They hold what they need as native fields (the
tracker, the other transport's bound ``write``) and pass everything else that happens on
the connection (loss, flow control) back to the session's own protocol objects.

asyncio and uvloop call protocol methods by name, so these need not inherit from
``asyncio.Protocol`` (a compiled class cannot).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlproxy.errors import ProtocolViolation
from sqlproxy.wire.conversation import Conversation

__all__ = ["BackendPump", "ClientPump"]


class ClientPump:
    """The client side of a ready session: check each chunk, forward it to the server."""

    def __init__(self, session: Any, conv: Conversation, backend_transport: Any) -> None:
        self.session = session  # the ClientSession: errors, loss and flow control go there
        self.conv = conv
        self.write: Callable[[bytes], object] = backend_transport.write
        self.clock: Callable[[], float] = time.perf_counter

    def data_received(self, data: bytes) -> None:
        try:
            self.conv.feed_frontend(data, self.clock())
        except ProtocolViolation as exc:
            self.session.fail(exc)
            return
        self.write(data)

    def eof_received(self) -> bool | None:
        return None  # let the transport close itself, as asyncio.Protocol does

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.connection_lost(exc)

    def pause_writing(self) -> None:
        self.session.pause_writing()

    def resume_writing(self) -> None:
        self.session.resume_writing()


class BackendPump:
    """The server side of a ready session: forward each chunk to the client, then track it."""

    def __init__(self, backend: Any, conv: Conversation, client_transport: Any) -> None:
        self.backend = backend  # the BackendConnection
        self.conv = conv
        self.write: Callable[[bytes], object] = client_transport.write
        self.clock: Callable[[], float] = time.perf_counter

    def data_received(self, data: bytes) -> None:
        self.write(data)
        self.conv.feed_backend(data, self.clock())

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.backend.connection_lost(exc)

    def pause_writing(self) -> None:
        self.backend.pause_writing()

    def resume_writing(self) -> None:
        self.backend.resume_writing()
