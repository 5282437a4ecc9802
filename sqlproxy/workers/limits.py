"""Connection counts shared by the workers, so that ``max_client_connections`` and the per
user / per database caps hold for the machine, not per worker.

One shared array of 64-bit integers (``multiprocessing.RawArray``), one region per worker:
its admitted sessions in total, then two open-addressing tables (users, databases) of
(key hash, count) pairs. A worker writes only its own region, so the supervisor can clear the
region of a worker that died (its sessions died with it). Admission reads every region and
writes its own under one lock: a few hundred integer reads, at connect and at disconnect,
never per statement.

A key is a 63-bit BLAKE2b hash of the user or database name: two names colliding would share
a count (about one chance in 10^18 per pair). A hash slot, once taken, keeps its key while the
region has room (so that probe chains stay intact); a full table is compacted, dropping the
keys whose count is back to zero.
"""

from __future__ import annotations

import hashlib
import multiprocessing
from typing import Any

__all__ = ["SharedLimits"]

SLOTS = 512  # per table; distinct users (databases) with sessions on one worker at once
_REGION = 1 + 4 * SLOTS  # total, users (hash, count) x SLOTS, databases (hash, count) x SLOTS
_LOCK_TIMEOUT = 2.0


def _hash(name: str) -> int:
    h = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    return (h >> 1) | 1  # positive in an int64, never 0 (0 = an empty slot)


class SharedLimits:
    """The machine-wide counts, seen from one worker (``bind``) or the supervisor."""

    def __init__(self, workers: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.workers = workers
        self.array: Any = ctx.RawArray("q", workers * _REGION)
        self.lock: Any = ctx.Lock()
        self.worker = -1

    def bind(self, worker: int) -> None:
        """Count this process's sessions in ``worker``'s region."""
        self.worker = worker

    # ------------------------------------------------------------------ reading
    def _count(self, region: int, table: int, h: int) -> int:
        a = self.array
        base = region * _REGION + 1 + table * 2 * SLOTS
        i = h % SLOTS
        for _ in range(SLOTS):
            k = a[base + 2 * i]
            if k == h:
                return int(a[base + 2 * i + 1])
            if k == 0:
                return 0
            i = (i + 1) % SLOTS
        return 0

    def total(self) -> int:
        return sum(int(self.array[r * _REGION]) for r in range(self.workers))

    def count(self, user: str | None = None, database: str | None = None) -> int:
        """Sessions of ``user`` (or in ``database``) on all workers; all sessions without."""
        if user is None and database is None:
            return self.total()
        table, h = (0, _hash(user)) if user is not None else (1, _hash(database or ""))
        return sum(self._count(r, table, h) for r in range(self.workers))

    # ------------------------------------------------------------------ writing (own region)
    def _add(self, table: int, h: int, delta: int) -> None:
        a = self.array
        base = self.worker * _REGION + 1 + table * 2 * SLOTS
        i = h % SLOTS
        for _ in range(SLOTS):
            k = a[base + 2 * i]
            if k == 0 and delta < 0:
                return  # not counted here (cleared by the supervisor meanwhile)
            if k == h or k == 0:
                a[base + 2 * i] = h
                a[base + 2 * i + 1] = max(0, a[base + 2 * i + 1] + delta)
                return
            i = (i + 1) % SLOTS
        self._compact(table)
        if delta > 0:
            self._add(table, h, delta)

    def _compact(self, table: int) -> None:
        a = self.array
        base = self.worker * _REGION + 1 + table * 2 * SLOTS
        live = [(a[base + 2 * i], a[base + 2 * i + 1]) for i in range(SLOTS)
                if a[base + 2 * i + 1] > 0]
        for i in range(2 * SLOTS):
            a[base + i] = 0
        for h, n in live:
            self._add(table, h, n)

    def admit(self, user: str, database: str, max_total: int, max_per_user: int,
              max_per_database: int) -> str | None:
        """Count a new session if the limits allow it; else the name of the limit it hits."""
        hu, hd = _hash(user), _hash(database)
        locked = self.lock.acquire(timeout=_LOCK_TIMEOUT)
        try:  # a worker killed inside the lock must not stop the others admitting for good
            if self.total() >= max_total:
                return "max_client_connections"
            if max_per_user and sum(self._count(r, 0, hu)
                                    for r in range(self.workers)) >= max_per_user:
                return "max_connections_per_user"
            if max_per_database and sum(self._count(r, 1, hd)
                                        for r in range(self.workers)) >= max_per_database:
                return "max_connections_per_database"
            self.array[self.worker * _REGION] += 1
            self._add(0, hu, 1)
            self._add(1, hd, 1)
            return None
        finally:
            if locked:
                self.lock.release()

    def release(self, user: str, database: str) -> None:
        """Uncount a session admitted by ``admit``."""
        locked = self.lock.acquire(timeout=_LOCK_TIMEOUT)
        try:
            a = self.array
            a[self.worker * _REGION] = max(0, a[self.worker * _REGION] - 1)
            self._add(0, _hash(user), -1)
            self._add(1, _hash(database), -1)
        finally:
            if locked:
                self.lock.release()

    def clear(self, worker: int) -> None:
        """Forget a dead worker's sessions (the supervisor, before restarting it)."""
        locked = self.lock.acquire(timeout=_LOCK_TIMEOUT)
        try:
            for i in range(worker * _REGION, (worker + 1) * _REGION):
                self.array[i] = 0
        finally:
            if locked:
                self.lock.release()
