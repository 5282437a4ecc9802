"""The pool of server connections of one (database, user) pair, as a pure state machine.

No I/O, no event loop: the pooled session (``proxy/pooled.py``) asks, the pool answers, and the
session carries the answer out. That keeps every rule of lending testable without a server:

* ``checkout`` lends an idle server connection (the most recently used: its caches are warm,
  and the least recently used ones age out by ``server_idle_timeout_s``), or grants the right
  to *open* one while fewer than ``size`` exist or are being opened, or queues the client
  (FIFO, so nobody starves).
* ``checkin`` takes one back. A waiting client gets it at once (a hand-over, no idle stop).
  One returned past ``server_lifetime_s``, or not clean (the session says so: a transaction
  still open, an unknown state), is closed instead, and its slot goes to the next waiter as
  the right to open a new one.
* A *login* (a client authenticating through to the server, see the session) needs a fresh
  connection, so it waits for a slot like any client; when the pool is full of idle servers
  the oldest idle one is closed to make room: the total never exceeds ``size``.
* ``expire`` reports the waiters past ``max_wait_ms`` (they get SQLSTATE 53300) and the idle
  servers past their idle timeout or lifetime (closed down to ``min_idle``).

The figures kept (waits, checkouts, opens and closes by reason, how long every connection was
busy at once, the most ever busy per application) feed ``/api/pools``, the metrics, the
``pool_saturated`` / ``connection_churn`` findings and the sizing advice (``advice.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar, cast

from mypy_extensions import i64

__all__ = ["OPEN", "Handoff", "Limits", "Pool", "PoolStats", "ServerInfo", "WaitQueue", "Waiter"]

S = TypeVar("S")  # a server connection (any hashable object)
C = TypeVar("C")  # a client (any hashable object)

_WAIT_SAMPLES: Final = 4096


class _Open:
    """The right to open a new server connection (a slot reserved for the caller)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "OPEN"


OPEN = _Open()


@dataclass(frozen=True)
class Limits:
    size: int = 20
    min_idle: int = 0
    max_wait_s: float = 5.0
    idle_timeout_s: float = 600.0  # 0: never
    lifetime_s: float = 3600.0  # 0: never


class Waiter(Generic[C]):
    """A client queued for a server (or, ``login``, for a slot to open one)."""

    def __init__(self, client: C, since: float, login: bool = False,
                 app: str | None = None, tag: object = None) -> None:
        self.client = client
        self.since = since
        self.login = login  # wants a slot for a new connection, not a server
        self.app = app  # its application_name, counted when it gets a server
        self.tag = tag  # what its owner (a caller of ``queue``) asked to find here


class WaitQueue(Generic[C]):
    """The clients waiting for a server, first come first served: a list read from
    ``head`` on. (A deque's ``append`` and ``popleft`` are method calls by name from compiled
    code; these are native.)"""

    def __init__(self) -> None:
        self.items: list[Waiter[C]] = []
        self.head: i64 = 0

    def __len__(self) -> int:
        return len(self.items) - self.head

    def __bool__(self) -> bool:
        return len(self.items) > self.head

    def __iter__(self) -> Iterator[Waiter[C]]:
        return iter(self.items[self.head :])

    def __getitem__(self, i: int) -> Waiter[C]:
        """The ``i``-th waiter (0: the first)."""
        if i < 0 or i >= len(self.items) - self.head:
            raise IndexError("no such waiter")
        return self.items[self.head + i]

    def append(self, waiter: Waiter[C]) -> None:
        self.items.append(waiter)

    def popleft(self) -> Waiter[C]:
        items = self.items
        head = self.head
        if head >= len(items):
            raise IndexError("no waiter")
        waiter = items[head]
        head += 1
        if head == len(items):
            del items[:]
            head = 0
        elif head >= 64 and 2 * head >= len(items):
            del items[:head]  # the ones served, now and then
            head = 0
        else:
            items[head - 1] = cast(Waiter[C], _SERVED)  # (not kept alive by the queue)
        self.head = head
        return waiter

    def remove(self, waiter: Waiter[C]) -> None:
        items = self.items
        for i in range(self.head, len(items)):
            if items[i] is waiter:
                del items[i]
                return
        raise ValueError("not waiting")


_SERVED: Final[Waiter[object]] = Waiter(None, 0.0)  # what a served waiter's slot holds


class _AppCount:
    """Server connections one application holds now, and the most it ever held."""

    def __init__(self, app: str) -> None:
        self.app = app
        self.active = 0
        self.max_active = 0


class Handoff(Generic[S, C]):
    """``client`` now holds ``server``, or (``server`` is OPEN) may open a new one."""

    def __init__(self, client: C, server: S | _Open, waited_s: float,
                 evict: S | None = None) -> None:
        self.client = client
        self.server = server
        self.waited_s = waited_s
        self.evict = evict  # an idle server closed to make room for this login: close it

    def __repr__(self) -> str:
        return f"Handoff({self.client!r}, {self.server!r}, {self.waited_s!r}, {self.evict!r})"


class ServerInfo:
    """A server connection's times, and the application count its holder adds to (kept
    here, not in a dictionary by client: one attribute per checkout and check-in)."""

    def __init__(self, created: float, last_used: float) -> None:
        self.created = created
        self.last_used = last_used
        self.app: _AppCount | None = None
        self.gone = False  # forgotten by its pool (a caller may keep this record at hand)
        self.pump: Any = None  # the caller's, kept here at hand (the pool does not read it)


@dataclass
class PoolStats:
    checkouts: int = 0
    waits: int = 0  # checkouts that had to wait
    wait_timeouts: int = 0
    max_wait_s: float = 0.0
    wait_total_s: float = 0.0
    opened: int = 0
    open_failures: int = 0
    closed: dict[str, int] = field(default_factory=dict)  # reason -> count
    max_active: int = 0
    max_waiting: int = 0
    all_busy_s: float = 0.0  # time with every slot busy (active + opening == size)
    max_active_by_app: dict[str, int] = field(default_factory=dict)


class Pool(Generic[S, C]):
    """Lending the server connections of one pool (see the module doc)."""

    def __init__(self, limits: Limits, now: float) -> None:
        self.limits = limits
        # Right end: the most recently returned. A list: its append and pop are native calls
        # (a deque's cost a lookup by name); the left end is taken only to make room.
        self.idle: list[S] = []
        self.servers: dict[S, ServerInfo] = {}
        self.active = 0
        self.opening = 0
        self.waiters: WaitQueue[C] = WaitQueue()
        self.stats = PoolStats()
        self.started = now
        self._all_busy_since: float | None = None
        # Per application: its count, and the count each client holding a server adds to;
        # the last application counted is kept at hand (most pools serve one).
        self._apps: dict[str, _AppCount] = {}
        self._app_of: dict[C, _AppCount] = {}
        self._last_app = _AppCount("")
        # The last _WAIT_SAMPLES waits for a server (0 for none), in a ring.
        self._waits: list[float] = []
        self._next_wait = 0
        # False: a client may not open a new connection (the proxy cannot log in as this
        # user on its own); clients wait for a server instead.
        self.may_open = True
        # What ``hand_on`` answers when the general rules of ``checkin`` apply.
        self.slow: Waiter[C] = Waiter(cast(C, None), 0.0)
        # The record of the server ``checkout`` lent last (its caller finds its ``pump``).
        self.lent_info: ServerInfo | None = None

    # ------------------------------------------------------------------ figures
    @property
    def total(self) -> int:
        """Server connections open or being opened."""
        return len(self.servers) + self.opening

    def wait_percentile(self, q: float) -> float:
        return self.wait_percentiles([q])[0]

    def wait_percentiles(self, qs: list[float]) -> list[float]:
        """The waits at quantiles ``qs`` (of the last checkouts), from one sort."""
        samples = sorted(self._waits)
        if not samples:
            return [0.0 for _ in qs]
        n = len(samples)
        return [samples[min(n - 1, int(q * n))] for q in qs]

    def busy_share(self, now: float) -> float:
        """Share of the pool's life with every slot busy."""
        life = now - self.started
        if life <= 0:
            return 0.0
        busy = self.stats.all_busy_s
        if self._all_busy_since is not None:
            busy += now - self._all_busy_since
        return min(1.0, busy / life)

    def _busy_changed(self, now: float) -> None:
        # On every checkout and check-in: kept to a few comparisons.
        st = self.stats
        active = self.active
        if active > st.max_active:
            st.max_active = active
        waiting = len(self.waiters)
        if waiting > st.max_waiting:
            st.max_waiting = waiting
        since = self._all_busy_since
        if active + self.opening >= self.limits.size:
            if since is None:
                self._all_busy_since = now
        elif since is not None:
            st.all_busy_s += now - since
            self._all_busy_since = None

    def _lent(self, client: C, app: str | None, waited: float, info: ServerInfo | None
              ) -> None:
        """``client`` got a server (``info``'s; None: the right to open one) after waiting
        ``waited`` seconds. (The caller says whether the pool's business changed.)"""
        st = self.stats
        st.checkouts += 1
        waits = self._waits
        if len(waits) < _WAIT_SAMPLES:
            waits.append(waited)
        else:
            i = self._next_wait
            waits[i] = waited
            self._next_wait = i + 1 if i + 1 < _WAIT_SAMPLES else 0
        if waited > 0:
            st.waits += 1
            st.wait_total_s += waited
            if waited > st.max_wait_s:
                st.max_wait_s = waited
        if app is not None:
            count = self._last_app
            if count.app != app:
                apps = self._apps
                if app in apps:
                    count = apps[app]
                else:
                    count = apps[app] = _AppCount(app)
                self._last_app = count
            if info is not None:
                info.app = count
            else:
                self._app_of[client] = count
            count.active += 1
            if count.active > count.max_active:
                count.max_active = count.active
                st.max_active_by_app[app] = count.active

    def released(self, client: C, info: ServerInfo | None = None) -> None:
        """The client no longer holds a server (``info``'s, if any), for the per-application
        concurrency."""
        if info is not None:
            count = info.app
            if count is not None:
                count.active -= 1
                info.app = None
                return
        app_of = self._app_of
        # (``in``/``del`` rather than ``pop``: a method call costs a lookup by name.)
        if app_of and client in app_of:
            app_of[client].active -= 1
            del app_of[client]

    # ------------------------------------------------------------------ lending
    def checkout(self, client: C, now: float, app: str | None = None) -> S | _Open | None:
        """A server for ``client``, OPEN (it may open one), or None: it waits in the queue
        until a ``Handoff`` names it (or ``expire`` times it out)."""
        if self.idle and not self.waiters:
            server = self.idle.pop()
            info = self.servers[server]
            self.lent_info = info
            info.last_used = now
            self.active += 1
            self._lent(client, app, 0.0, info)
            self._busy_changed(now)
            return server
        if self.may_open and self.total < self.limits.size and not self.waiters:
            self.opening += 1
            self.active += 1
            self._lent(client, app, 0.0, None)
            self._busy_changed(now)
            return OPEN
        waiters = self.waiters
        waiters.append(Waiter(client, now, app=app))
        # Queued: as busy as before, one waiter more (a changed size is seen at the tick).
        st = self.stats
        if len(waiters) > st.max_waiting:
            st.max_waiting = len(waiters)
        return None

    def queue(self, waiter: Waiter[C]) -> None:
        """``checkout`` of a client that waits (no idle server to lend it at once, no slot to
        open one): its ``waiter``, kept and reused by the caller (its ``since`` and ``app``
        set; never queued twice at once)."""
        waiters = self.waiters
        waiters.append(waiter)
        st = self.stats
        if len(waiters) > st.max_waiting:
            st.max_waiting = len(waiters)

    def login(self, client: C, now: float) -> tuple[bool, S | None]:
        """A slot for a login connection: (granted now, an idle server to close to make room).
        Not granted: the client waits for a ``Handoff`` with OPEN."""
        if self.total < self.limits.size and not self.waiters:
            self.opening += 1
            self.active += 1
            self._busy_changed(now)
            return True, None
        if self.idle and not self.waiters:
            victim = self.idle.pop(0)  # the least recently used
            self._forget(victim, "login")
            self.opening += 1
            self.active += 1
            self._busy_changed(now)
            return True, victim
        self.waiters.append(Waiter(client, now, login=True))
        self._busy_changed(now)
        return False, None

    def opened(self, server: S, now: float) -> None:
        """A connection opened under OPEN (or a login) is ready, held by its opener."""
        self.opening -= 1
        self.servers[server] = ServerInfo(now, now)
        self.stats.opened += 1

    def open_failed(self, client: C, now: float, *, failed: bool = True
                    ) -> list[Handoff[S, C]]:
        """Opening failed (or, ``failed`` False, was not needed after all): the slot is free
        again."""
        self.opening -= 1
        self.active -= 1
        if failed:
            self.stats.open_failures += 1
        self.released(client)
        return self._fill(now)

    def checkin(self, server: S, now: float, client: C, *, clean: bool = True,
                reason: str = "dirty") -> tuple[list[Handoff[S, C]], bool]:
        """``client`` gives ``server`` back. Returns the hand-overs to carry out and whether
        the session must close ``server`` (not clean, or past its lifetime)."""
        self.active -= 1
        info = self.servers.get(server)
        self.released(client, info)
        if info is None:  # already forgotten (closed under us)
            return self._fill(now), True
        lifetime = self.limits.lifetime_s
        if not clean or (lifetime and now - info.created >= lifetime):
            self._forget(server, reason if not clean else "lifetime")
            return self._fill(now), True
        info.last_used = now
        if self.waiters and not self.waiters[0].login:
            # Straight to the next waiter: as busy as before, one waiter fewer.
            w = self.waiters.popleft()
            self.active += 1
            waited = now - w.since
            self._lent(w.client, w.app, waited, info)
            return [Handoff(w.client, server, waited)], False
        self.idle.append(server)
        if self.waiters:  # a login waiting: it closes this idle one for room
            return self._fill(now), False
        self._busy_changed(now)
        return [], False

    def hand_on(self, server: S, info: ServerInfo | None, now: float, client: C
                ) -> Waiter[C] | None:
        """``checkin`` of a clean ``server`` (``info``: its record, ``servers[server]``, kept
        by the caller) in the common cases, without a ``Handoff``: the waiter that holds it
        now (first in the queue), or None (it is idle now). ``slow`` when the general rules
        apply (a server forgotten or past its lifetime, a login first in the queue): nothing
        was done, ``checkin`` does it."""
        if info is None or info.gone:
            return self.slow
        lifetime = self.limits.lifetime_s
        if lifetime and now - info.created >= lifetime:
            return self.slow
        waiters = self.waiters
        if waiters:
            w = waiters[0]
            if w.login:
                return self.slow
            waiters.popleft()
            # As busy as before (one lent, one back), one waiter fewer: no figure changes.
            self.released(client, info)
            info.last_used = now
            self._lent(w.client, w.app, now - w.since, info)
            return w
        self.active -= 1
        self.released(client, info)
        info.last_used = now
        self.idle.append(server)
        self._busy_changed(now)
        return None

    def _fill(self, now: float) -> list[Handoff[S, C]]:
        """Give free slots (and idle servers) to waiters, in order."""
        out: list[Handoff[S, C]] = []
        while self.waiters:
            w = self.waiters[0]
            if not w.login and self.idle:
                server = self.idle.pop()
                info = self.servers[server]
                info.last_used = now
                self.waiters.popleft()
                self.active += 1
                waited = now - w.since
                self._lent(w.client, w.app, waited, info)
                out.append(Handoff(w.client, server, waited))
                continue
            victim: S | None = None
            if not w.login and not self.may_open:
                break
            if self.total >= self.limits.size:
                if not (w.login and self.idle):
                    break
                victim = self.idle.pop(0)
                self._forget(victim, "login")
            self.waiters.popleft()
            self.opening += 1
            self.active += 1
            waited = now - w.since
            if not w.login:
                self._lent(w.client, w.app, waited, None)
            out.append(Handoff(w.client, OPEN, waited, victim))
        self._busy_changed(now)
        return out

    def remove(self, server: S, now: float, reason: str) -> list[Handoff[S, C]]:
        """An idle or lent server connection is gone (closed by us or by the server)."""
        if server not in self.servers:
            return []
        with contextlib.suppress(ValueError):
            self.idle.remove(server)
        self._forget(server, reason)
        return self._fill(now)

    def _forget(self, server: S, reason: str) -> None:
        info = self.servers.pop(server, None)
        if info is not None:
            info.gone = True
            self.stats.closed[reason] = self.stats.closed.get(reason, 0) + 1
            count = info.app
            if count is not None:  # its holder no longer holds a live server
                count.active -= 1
                info.app = None

    def cancel_wait(self, client: C) -> None:
        """A waiting client left."""
        for w in self.waiters:
            if w.client == client:
                self.waiters.remove(w)
                break

    def is_idle(self, server: S) -> bool:
        return server in self.idle

    # ------------------------------------------------------------------ time
    def expire(self, now: float) -> tuple[list[C], list[S]]:
        """Waiters past ``max_wait_s`` (removed: they get 53300), and idle servers to close
        (idle or alive too long, beyond ``min_idle``)."""
        late: list[C] = []
        while self.waiters and now - self.waiters[0].since >= self.limits.max_wait_s:
            w = self.waiters.popleft()
            late.append(w.client)
            self.stats.wait_timeouts += 1
            self.stats.wait_total_s += now - w.since
        to_close: list[S] = []
        lim = self.limits
        for server in list(self.idle):
            if len(self.idle) <= lim.min_idle:
                break
            info = self.servers[server]
            why = ("idle_timeout" if lim.idle_timeout_s and now - info.last_used
                   >= lim.idle_timeout_s else
                   "lifetime" if lim.lifetime_s and now - info.created >= lim.lifetime_s
                   else None)
            if why is not None:
                self.idle.remove(server)
                self._forget(server, why)
                to_close.append(server)
        self._busy_changed(now)
        return late, to_close

    def spares_wanted(self) -> int:
        """How many connections to open now for ``min_idle`` (``open_spare`` each)."""
        if self.waiters:
            return 0
        missing = self.limits.min_idle - len(self.idle) - self.opening
        return max(0, min(missing, self.limits.size - self.total))

    def open_spare(self) -> None:
        """A connection is being opened for ``min_idle``, held by nobody."""
        self.opening += 1

    def spare_opened(self, server: S, now: float) -> list[Handoff[S, C]]:
        self.opening -= 1
        self.servers[server] = ServerInfo(now, now)
        self.stats.opened += 1
        self.idle.append(server)
        return self._fill(now)

    def spare_failed(self, now: float) -> list[Handoff[S, C]]:
        self.opening -= 1
        self.stats.open_failures += 1
        return self._fill(now)
