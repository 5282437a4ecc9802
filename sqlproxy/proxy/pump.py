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


class _Pump:
    """What both pumps pass on to the protocol object they stand in for (``owner``)."""

    def __init__(self, owner: Any, conv: Conversation, other_transport: Any) -> None:
        self.owner = owner
        self.conv = conv
        self.write: Callable[[bytes], object] = other_transport.write
        self.clock: Callable[[], float] = time.perf_counter

    def eof_received(self) -> bool | None:
        return None  # let the transport close itself, as asyncio.Protocol does

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.owner.pause_writing()

    def resume_writing(self) -> None:
        self.owner.resume_writing()


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
