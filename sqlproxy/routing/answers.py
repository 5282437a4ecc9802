"""A routed session's backend-to-client direction (sans-IO): swallow, strip, hold, release.

What a backend of a routed session sends is not all for the client:

* *swallow*: the answers to units the session injected itself (settings and prepared-statement
  replay, see ``replay.py``), up to and including their ReadyForQuery. An error there means
  the backend's state is not what the session thinks (``replay_failed``);
* *strip*: a ReadyForQuery answering a Sync the session added (a describe-only unit closed on
  the primary): the conversation tracker sees it, the client must not;
* *hold* (replicas only): a replica's answer is held back until its ReadyForQuery, so that if
  the replica proves it could not run the unit (``RETRY_ON_PRIMARY``) the unit can be retried on
  the primary before the client has seen a byte of it. An answer that grows past
  ``HOLD_LIMIT`` is *released* (what is held goes out, the rest streams) and can no longer be
  retried;
* an idle replica connection speaking (a shutdown FATAL, a notice) is not the client's either.

``Answers.feed`` frames the bytes (one length check, ``wire.frames``) and returns what to do,
in order, as ``Event``s; the session carries them out. The common case — nothing to swallow or
strip on the primary — passes the chunk through untouched and unframed.
"""

from __future__ import annotations

from enum import Enum

from sqlproxy.wire.frames import MAX_SERVER_MESSAGE, frame_end
from sqlproxy.wire.messages import B_ERROR_RESPONSE, B_READY_FOR_QUERY, error_sqlstate

__all__ = ["HOLD_LIMIT", "RETRY_ON_PRIMARY", "Answers", "Event", "Kind", "should_retry"]

HOLD_LIMIT = 256 * 1024  # bytes of a replica's answer held back for a possible retry

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
#: After these the replica connection's state is unknown or gone: drop it, start afresh.
DROP_CONNECTION = frozenset({"57P01", "57P02", "57P03", "26000", "42P05"})
REPLICA_DOWN = frozenset({"57P01", "57P02", "57P03"})


def should_retry(error: str | None, replay_failed: bool, in_transaction: bool) -> bool:
    """Whether a replica unit that ended with ``error`` (its SQLSTATE, or None) is retried on
    the primary. Never inside a transaction block: its earlier statements ran there."""
    return replay_failed or (error in RETRY_ON_PRIMARY and not in_transaction)


class Kind(Enum):
    DELIVER = "deliver"  # bytes for the client (and the link's conversation)
    TRACK = "track"  # bytes only for the link's conversation (a stripped ReadyForQuery)
    RELEASE = "release"  # a held answer goes out now (hold limit): stream from here on
    UNIT_DONE = "unit_done"  # the held unit's answer is complete: retry it, or release it
    STREAM_DONE = "stream_done"  # a streamed replica unit ended
    IDLE_ERROR = "idle_error"  # an idle replica connection sent an ErrorResponse


class Event:
    __slots__ = ("data", "kind")

    def __init__(self, kind: Kind, data: bytes = b"") -> None:
        self.kind = kind
        self.data = data

    def __repr__(self) -> str:
        return f"Event({self.kind.name}, {len(self.data)} bytes)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Event) and (self.kind, self.data) == (other.kind, other.data)

    __hash__ = None  # type: ignore[assignment]


class Answers:
    """One backend connection's answers on their way to the client (see the module doc)."""

    __slots__ = (
        "buf",
        "error",
        "hold",
        "in_unit",
        "replay_failed",
        "replica",
        "strip",
        "swallow",
        "swallow_errors",
    )

    def __init__(self, replica: bool) -> None:
        self.replica = replica
        self.buf = bytearray()  # an incomplete message, while framing
        self.swallow = 0  # ReadyForQuery messages of injected units still to swallow
        self.replay_failed = False  # an injected unit failed (reset by the next unit)
        self.swallow_errors: list[bytes] = []  # their ErrorResponse bodies, for the log
        self.strip = 0  # ReadyForQuery messages to keep from the client (our own Syncs)
        self.in_unit = False  # a replica unit is in flight
        self.hold: bytearray | None = None  # its answer, held back (None: streaming)
        self.error: str | None = None  # SQLSTATE of the first error in the unit's answer

    @property
    def busy(self) -> bool:
        """Answers are still owed to the session (injected units, stripped Syncs)."""
        return bool(self.swallow or self.strip)

    def start_unit(self, hold: bool) -> None:
        """A replica unit was sent: hold its answer (or stream it, for an open unit)."""
        self.in_unit = True
        self.hold = bytearray() if hold else None
        self.error = None

    def end_unit(self) -> None:
        self.in_unit = False
        self.hold = None
        self.error = None
        self.replay_failed = False

    def take_hold(self) -> bytes:
        """The held answer, which the session now releases; the rest streams."""
        held = bytes(self.hold) if self.hold is not None else b""
        self.hold = None
        return held

    def feed(self, data: bytes) -> list[Event]:
        if not self.replica:
            if not (self.swallow or self.strip or self.buf):
                return [Event(Kind.DELIVER, data)]
            return self._primary(data)
        return self._replica(data)

    # ------------------------------------------------------------------ primary
    def _primary(self, data: bytes) -> list[Event]:
        buf = self.buf
        buf += data
        pos = 0
        events: list[Event] = []
        client = bytearray()
        while self.swallow or self.strip:
            end = frame_end(buf, pos, MAX_SERVER_MESSAGE, "server message")
            if end < 0:
                break
            t = buf[pos]
            if self.swallow:
                self._swallow(t, buf, pos, end)
            elif t == B_READY_FOR_QUERY:
                self.strip -= 1
                if client:
                    events.append(Event(Kind.DELIVER, bytes(client)))
                    client.clear()
                events.append(Event(Kind.TRACK, bytes(buf[pos:end])))
            else:
                client += buf[pos:end]
            pos = end
        if not (self.swallow or self.strip):
            client += buf[pos:]  # the rest streams untouched
            pos = len(buf)
        del buf[:pos]
        if client:
            events.append(Event(Kind.DELIVER, bytes(client)))
        return events

    def _swallow(self, t: int, buf: bytearray, pos: int, end: int) -> None:
        if t == B_ERROR_RESPONSE:
            self.replay_failed = True
            self.swallow_errors.append(bytes(buf[pos + 5 : end]))
        elif t == B_READY_FOR_QUERY:
            self.swallow -= 1

    # ------------------------------------------------------------------ replica
    def _replica(self, data: bytes) -> list[Event]:
        buf = self.buf
        buf += data
        pos = 0
        events: list[Event] = []
        out = bytearray()
        while (end := frame_end(buf, pos, MAX_SERVER_MESSAGE, "server message")) >= 0:
            t = buf[pos]
            if self.swallow:
                self._swallow(t, buf, pos, end)
            elif not self.in_unit:
                if t == B_ERROR_RESPONSE:
                    events.append(Event(Kind.IDLE_ERROR, bytes(buf[pos + 5 : end])))
            else:
                if t == B_ERROR_RESPONSE and self.error is None:
                    self.error = error_sqlstate(bytes(buf[pos + 5 : end]))
                out += buf[pos:end]
                if t == B_READY_FOR_QUERY:
                    if self.hold is None:
                        events.append(Event(Kind.DELIVER, bytes(out)))
                        events.append(Event(Kind.STREAM_DONE))
                    else:
                        self.hold += out
                        events.append(Event(Kind.UNIT_DONE))
                    out = bytearray()
                    self.in_unit = False  # the session ends the unit (end_unit) as it acts
            pos = end
        del buf[:pos]
        if out:
            if self.hold is not None:
                self.hold += out
                if len(self.hold) > HOLD_LIMIT:
                    events.append(Event(Kind.RELEASE))
            else:
                events.append(Event(Kind.DELIVER, bytes(out)))
        return events
