"""The backend-to-client direction of a routed session.

``routing.answers`` (sans-IO) sorts a link's bytes into events: bytes for the client, bytes
only to track, a replica unit's answer complete, a stream finished, a hold to release, an idle
replica's error. Here each event is carried out on the session: delivered to the client and
fed to the link's conversation (statistics, transaction status); a replica's answer, held
while nothing of it has reached the client, either released or — when the replica proved it
could not run the unit (``should_retry``) — thrown away and the unit retried on the primary.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from sqlproxy.errors import ProtocolViolation
from sqlproxy.logs import get_logger
from sqlproxy.routing.answers import DROP_CONNECTION, REPLICA_DOWN, Event, Kind, should_retry
from sqlproxy.wire.messages import error_summary

if TYPE_CHECKING:
    from sqlproxy.proxy.links import Link
    from sqlproxy.proxy.routed import RoutedSession

__all__ = ["finish_replica_unit", "link_data"]

log = get_logger("sqlproxy.routing")
_perf = time.perf_counter


def link_data(session: RoutedSession, link: Link, data: bytes) -> None:
    """Bytes from a backend of ``session``."""
    answers = link.answers
    try:
        events = answers.feed(data)
    except ProtocolViolation as exc:
        session.fail(ProtocolViolation(f"{exc} from backend {link.name}"))
        return
    for event in events:
        _answer(session, link, event)
    if answers.swallow_errors:
        for body in answers.swallow_errors:
            log.info("routing_replay_failed", session=session.id, backend=link.name,
                     error=error_summary(body))
        answers.swallow_errors.clear()
    session.backend_done(link)


def _answer(session: RoutedSession, link: Link, event: Event) -> None:
    kind = event.kind
    if kind is Kind.DELIVER:
        _deliver(session, link, event.data)
    elif kind is Kind.TRACK:
        session.current = link.name
        link.conv.feed_backend(event.data, _perf())
    elif kind is Kind.UNIT_DONE:
        _replica_done(session, link)
    elif kind is Kind.STREAM_DONE:
        finish_replica_unit(link)
    elif kind is Kind.RELEASE:
        _release(session, link)
    elif kind is Kind.IDLE_ERROR:
        link.closed = True  # an idle replica connection speaks: a shutdown FATAL


def _deliver(session: RoutedSession, link: Link, data: bytes) -> None:
    t = session.client_transport
    if t is not None and not t.is_closing():
        t.write(data)
    session.current = link.name
    link.conv.feed_backend(data, _perf())


def _release(session: RoutedSession, link: Link) -> None:
    """Stop holding the replica's answer: pass on what is held and stream the rest."""
    unit = link.unit
    if unit is None or link.answers.hold is None:
        return
    held = link.answers.take_hold()
    session.current = link.name
    link.conv.feed_frontend(bytes(unit.data), unit.sent)
    _deliver(session, link, held)


def _replica_done(session: RoutedSession, link: Link) -> None:
    """A held replica answer is complete: release it, or retry the unit on the primary if
    the replica proved it could not run it."""
    unit = link.unit
    assert unit is not None
    error = link.answers.error
    replay_failed = link.answers.replay_failed
    if should_retry(error, replay_failed, unit.in_tx):
        reason = f"error {error}" if error else "replay failed"
        finish_replica_unit(link)
        if error in REPLICA_DOWN and link.replica is not None:
            session.router.mark_down(link.replica, reason)
        if replay_failed or error in DROP_CONNECTION:
            session.drop_link(link)  # its state is not what we think: start afresh
        session.retry_on_primary(link, unit, reason)
        return
    _release(session, link)
    finish_replica_unit(link)


def finish_replica_unit(link: Link) -> None:
    """The replica unit in flight on ``link`` is over (answered, retried or lost)."""
    if link.unit is not None and link.replica is not None:
        link.replica.unit_finished()
    link.unit = None
    link.answers.end_unit()
