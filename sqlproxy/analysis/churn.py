"""Connection churn seen from the client side: an application that opens a connection per
request (connect, a few statements, disconnect) pays a TCP handshake and a login every time,
and in session mode holds a fresh server backend (a process fork on PostgreSQL) for each. A
client-side pool (SQLAlchemy's QueuePool, psycopg_pool, HikariCP, pg.Pool) fixes it.

``ChurnMeter.closed`` is told of every client session that ends (a rare event next to
statements: one deque append unless it reports). A session shorter than ``SHORT_SESSION_S``
is *short*; once one (application, database, user) ended ``CHURN_SESSIONS`` short sessions
within ``CHURN_WINDOW_S``, those sessions, and every further short one while the rate holds,
are reported as ``connection_churn`` occurrences: their login time (connect to the first
ReadyForQuery) is the time the finding cost. Pure: no clock of its own, no I/O.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from hashlib import blake2b

__all__ = ["CHURN_SESSIONS", "CHURN_WINDOW_S", "SHORT_SESSION_S", "Churn", "ChurnMeter",
           "churn_fingerprint"]

SHORT_SESSION_S = 1.0
CHURN_SESSIONS = 20
CHURN_WINDOW_S = 60.0
_MAX_KEYS = 1024  # (application, database, user) triples followed at once


def churn_fingerprint(scope: str, database: str, user: str) -> str:
    """The fingerprint of a connection finding (16 hex chars, like a statement's): one per
    ``scope`` ("sessions", "pool"), database and user."""
    key = "\x00".join((scope, database, user)).encode("utf-8", "surrogatepass")
    return blake2b(key, digest_size=8).hexdigest()


@dataclass(frozen=True, slots=True)
class Churn:
    """Short sessions to report now: how many, their login seconds, the most in a window."""

    sessions: int
    login_s: float
    in_window: int


@dataclass(slots=True)
class _Recent:
    ends: deque[float] = field(default_factory=deque)  # end times of short sessions, in window
    pending: list[float] = field(default_factory=list)  # login seconds not yet reported


class ChurnMeter:
    def __init__(self, short_s: float = SHORT_SESSION_S, sessions: int = CHURN_SESSIONS,
                 window_s: float = CHURN_WINDOW_S) -> None:
        self.short_s = short_s
        self.sessions = sessions
        self.window_s = window_s
        self._recent: dict[tuple[str, str, str], _Recent] = {}

    def closed(self, application: str, database: str, user: str, lifetime_s: float,
               login_s: float, now: float) -> Churn | None:
        """A session of ``lifetime_s`` (its login took ``login_s``) ended at ``now``."""
        if lifetime_s >= self.short_s:
            return None
        key = (application, database, user)
        r = self._recent.get(key)
        if r is None:
            if len(self._recent) >= _MAX_KEYS:
                self._recent.clear()  # application names come from clients
            r = self._recent[key] = _Recent()
        ends = r.ends
        ends.append(now)
        horizon = now - self.window_s
        while ends[0] < horizon:
            ends.popleft()
        r.pending.append(max(0.0, login_s))
        if len(r.pending) > len(ends):  # those older than the window are no longer churn
            del r.pending[: len(r.pending) - len(ends)]
        if len(ends) < self.sessions:
            return None
        out = Churn(len(r.pending), sum(r.pending), len(ends))
        r.pending.clear()
        return out
