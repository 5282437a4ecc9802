"""The backend connections of a routed session (*links*), and opening one to a replica.

A link pairs one server connection with what the session keeps of it: its own
``Conversation`` (statistics, transaction status), what was replayed there
(``routing.replay.BackendReplay``), its answers on their way back (``routing.answers``) and the
replica unit in flight. The primary's link wraps the session's own backend connection; a
replica's is opened by ``open_replica`` and logged in by ``routing.replica_login``.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, cast

from sqlproxy.errors import ProtocolViolation, ProxyError
from sqlproxy.proxy.connect import connect_backend
from sqlproxy.proxy.session import ServerSideProtocol
from sqlproxy.routing.answers import Answers
from sqlproxy.routing.health import ReplicaState
from sqlproxy.routing.replay import BackendReplay
from sqlproxy.routing.replica_login import ReplicaLogin
from sqlproxy.routing.scram import ScramKeys
from sqlproxy.routing.units import Unit
from sqlproxy.wire.conversation import Conversation
from sqlproxy.wire.frames import MAX_SERVER_MESSAGE, Frames

if TYPE_CHECKING:
    from sqlproxy.proxy.routed import RoutedSession

__all__ = ["Link", "ReplicaConnection", "connect_replica", "open_replica"]

#: A replica login that failed for one of these reasons will not work for this session.
_AUTH_PROBLEMS = ("password", "authentication", "28P01", "28000")


class Link:
    """One backend connection of a routed session."""

    def __init__(self, name: str, conv: Conversation, replica: ReplicaState | None) -> None:
        self.name = name
        self.conv = conv
        self.replica = replica
        self.transport: asyncio.Transport | None = None
        self.address: tuple[str, int] = ("", 0)
        self.key: tuple[int, bytes] | None = None
        self.replay = BackendReplay(fresh=replica is not None)
        self.answers = Answers(replica=replica is not None)
        self.unit: Unit | None = None  # the replica unit in flight
        self.protocol: ReplicaConnection | None = None  # a replica's own protocol
        self.pump: Any = None  # the fast path's protocol in front of it (fastroute.py)
        self.closed = False

    @property
    def busy(self) -> bool:
        if self.answers.busy:
            return True
        if self.replica is not None:
            return self.unit is not None
        return self.conv.busy

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()


class ReplicaConnection(ServerSideProtocol):
    """The transport protocol of a replica link: its login (``ReplicaLogin``), then the
    session's."""

    session: RoutedSession

    def __init__(self, session: RoutedSession, link: Link, login: ReplicaLogin) -> None:
        self.session = session
        self.link = link
        self.login = login
        self.frames = Frames(MAX_SERVER_MESSAGE, "server message")
        self.waiter: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.link.transport = cast(asyncio.Transport, transport)
        self.link.protocol = self

    def data_received(self, data: bytes) -> None:
        if self.login.done:
            self.session.link_data(self.link, data)
            return
        try:
            messages = self.frames.feed(data)
        except ProtocolViolation as exc:
            self._done(str(exc))
            return
        login = self.login
        for i, (t, msg) in enumerate(messages):
            reply = login.receive(t, msg)
            if reply and self.link.transport is not None:
                self.link.transport.write(reply)
            if login.problem is not None:
                self._done(login.problem)
                return
            if login.done:
                self.link.key = login.key
                rest = b"".join(m for _, m in messages[i + 1 :]) + self.frames.take_rest()
                self._done(None)
                if rest:
                    self.session.link_data(self.link, rest)
                return

    def _done(self, problem: str | None) -> None:
        if not self.waiter.done():
            self.waiter.set_result(problem)

    def connection_lost(self, exc: Exception | None) -> None:
        self._done(f"connection lost: {exc}" if exc else "connection closed")
        self.session.link_lost(self.link, exc)



async def open_replica(session: RoutedSession, link: Link, login: ReplicaLogin,
                       startup_packet: bytes, timeout: float) -> str | None:
    """Connect ``link`` to its replica and log in with the client's startup packet; returns
    None when ready, else why not. Raises OSError, TimeoutError or a ProxyError when the
    connection itself fails."""
    rep = link.replica
    assert rep is not None
    link.address = (rep.url.host, rep.url.port)
    transport, proto = await connect_backend(
        session.server, rep.url, lambda: ReplicaConnection(session, link, login), timeout)
    transport.write(startup_packet)
    return await asyncio.wait_for(proto.waiter, timeout)


async def _client_keys(session: RoutedSession) -> ScramKeys | None:
    """The client's SCRAM keys, recovered once per session from its exchange."""
    scram = session.scram
    if scram.keys is None and scram.complete is not None:
        scram.recovered(await session.router.scram_keys(session.user, scram.complete))
    return scram.keys


async def connect_replica(session: RoutedSession, rep: ReplicaState) -> None:
    """Open and log in a link to ``rep`` for ``session`` (whose ``connecting`` names it),
    then hand it over (``replica_connected``) or note why not: a login that cannot work
    keeps the session's reads on the primary, anything else is retried later."""
    router = session.router
    link = Link(rep.name, session.conversation_for(rep.name), rep)
    try:
        login = ReplicaLogin(session.user, router.routing.passwords.get(session.user),
                             await _client_keys(session))
        assert session.startup is not None
        problem = await open_replica(session, link, login, session.startup.raw,
                                     session.config.proxy.connect_timeout)
    except (OSError, TimeoutError, ProxyError) as exc:
        problem = f"connection failed: {exc}"
        router.mark_down(rep, problem)
    session.connecting = None
    ready = session.ready
    if not ready or problem is not None:
        link.closed = True
        if link.transport is not None:
            link.transport.close()
    if not ready:
        return
    if problem is None:
        session.replica_connected(link)
    elif any(word in problem for word in _AUTH_PROBLEMS):
        session.routing.no_replica = True
        router.warn_once(
            f"auth:{session.user}", "replica_authentication_impossible", user=session.user,
            replica=rep.name, reason=problem, consequence="this user's reads stay on the primary")
    else:  # try again later (it may be restarting), backing off
        session.routing.connect_failed(rep.name, time.monotonic())
    session.dispatch()
