"""The in-process store: an LRU bounded by bytes, indexed by the tables each entry reads,
and the per-rule / per-fingerprint counters (pure, no I/O; time is passed in).

Accounting: an entry costs its answer's bytes plus ``ENTRY_OVERHEAD`` (the key, the entry
object, its LRU slot) plus ``TABLE_OVERHEAD`` per table it is indexed under — measured with
tracemalloc (tests/cache/test_store.py), so that ``max_bytes`` bounds the memory the cache
really holds, not only the answers.

Invalidation is by (database, table): a committed write drops every entry of that database
reading the table; ``ALL`` ("*") drops every entry of the database. A store that was sent
to the server before an invalidation of one of its tables and answered after it would put a
stale answer back: ``clock``/``may_store`` refuse it (the answer is still delivered, just not
kept).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["ALL", "ENTRY_OVERHEAD", "TABLE_OVERHEAD", "Counters", "Entry", "LocalStore",
           "Stats"]

ALL = "*"
ENTRY_OVERHEAD = 400
TABLE_OVERHEAD = 120


@dataclass(slots=True)
class Counters:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    bytes: int = 0
    entries: int = 0
    evictions: int = 0
    invalidations: int = 0
    expirations: int = 0
    too_large: int = 0
    hit_ms_total: float = 0.0

    def as_dict(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {
            "hits": self.hits, "misses": self.misses, "stores": self.stores,
            "bytes": self.bytes, "entries": self.entries, "evictions": self.evictions,
            "invalidations": self.invalidations, "expirations": self.expirations,
            "too_large": self.too_large,
        }
        looked = self.hits + self.misses
        out["hit_ratio"] = self.hits / looked if looked else 0.0
        out["hit_mean_ms"] = self.hit_ms_total / self.hits if self.hits else 0.0
        return out


@dataclass(slots=True)
class Stats:
    """Counters in total, per rule and per fingerprint (bounded: the least recent dropped)."""

    max_fingerprints: int = 5000
    total: Counters = field(default_factory=Counters)
    rules: dict[str, Counters] = field(default_factory=dict)
    fingerprints: OrderedDict[str, Counters] = field(default_factory=OrderedDict)

    def of(self, rule: str, fingerprint: str) -> tuple[Counters, Counters, Counters]:
        r = self.rules.get(rule)
        if r is None:
            r = self.rules[rule] = Counters()
        f = self.fingerprints.get(fingerprint)
        if f is None:
            f = self.fingerprints[fingerprint] = Counters()
            while len(self.fingerprints) > self.max_fingerprints:
                self.fingerprints.popitem(last=False)
        else:
            self.fingerprints.move_to_end(fingerprint)
        return self.total, r, f

    def hit(self, rule: str, fingerprint: str, ms: float) -> None:
        for c in self.of(rule, fingerprint):
            c.hits += 1
            c.hit_ms_total += ms

    def miss(self, rule: str, fingerprint: str) -> None:
        for c in self.of(rule, fingerprint):
            c.misses += 1

    def too_large(self, rule: str, fingerprint: str) -> None:
        for c in self.of(rule, fingerprint):
            c.too_large += 1

    def stored(self, rule: str, fingerprint: str, size: int) -> None:
        for c in self.of(rule, fingerprint):
            c.stores += 1
            c.bytes += size
            c.entries += 1

    def dropped(self, rule: str, fingerprint: str, size: int, why: str) -> None:
        for c in self.of(rule, fingerprint):
            c.bytes -= size
            c.entries -= 1
            if why == "eviction":
                c.evictions += 1
            elif why == "invalidation":
                c.invalidations += 1
            elif why == "expiration":
                c.expirations += 1


class Entry:
    """One cached answer: the server's bytes up to (not including) ReadyForQuery."""

    __slots__ = ("database", "expires", "fingerprint", "key", "rule", "size", "tables", "value")

    def __init__(self, key: bytes, value: bytes, database: str, tables: frozenset[str],
                 expires: float, rule: str, fingerprint: str) -> None:
        self.key = key
        self.value = value
        self.database = database
        self.tables = tables
        self.expires = expires
        self.rule = rule
        self.fingerprint = fingerprint
        self.size = len(value) + ENTRY_OVERHEAD + TABLE_OVERHEAD * (len(tables) + 1)


class LocalStore:
    """The in-process LRU (``cache.max_bytes``)."""

    __slots__ = ("_all_at", "_by_db", "_by_table", "_entries", "_invalidated_at", "bytes",
                 "clock", "max_bytes", "stats")

    def __init__(self, max_bytes: int, stats: Stats | None = None) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.stats = stats if stats is not None else Stats()
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()
        self._by_table: dict[tuple[str, str], set[bytes]] = {}
        self._by_db: dict[str, set[bytes]] = {}
        self.clock = 0  # one tick per invalidation
        self._invalidated_at: dict[tuple[str, str], int] = {}
        self._all_at: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float) -> Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= now:
            self._drop(entry, "expiration")
            return None
        self._entries.move_to_end(key)
        return entry

    def may_store(self, database: str, tables: Iterable[str], since: int) -> bool:
        """False when one of ``tables`` was invalidated after ``clock`` was ``since``."""
        if self.clock == since:
            return True
        if self._all_at.get(database, 0) > since:
            return False
        inv = self._invalidated_at
        return all(inv.get((database, t), 0) <= since for t in tables)

    def put(self, entry: Entry) -> bool:
        """Store ``entry`` (replacing one with its key), evicting the least recently used
        while over ``max_bytes``. False (not stored) when it alone exceeds it."""
        if entry.size > self.max_bytes:
            return False
        old = self._entries.get(entry.key)
        if old is not None:
            self._drop(old, "replaced")
        while self.bytes + entry.size > self.max_bytes and self._entries:
            self._drop(next(iter(self._entries.values())), "eviction")
        self._entries[entry.key] = entry
        self.bytes += entry.size
        db = entry.database
        for t in entry.tables:
            self._by_table.setdefault((db, t), set()).add(entry.key)
        self._by_db.setdefault(db, set()).add(entry.key)
        self.stats.stored(entry.rule, entry.fingerprint, entry.size)
        return True

    def invalidate(self, database: str, tables: Iterable[str]) -> int:
        """Drop every entry of ``database`` that reads one of ``tables`` (``ALL``: every
        entry of the database). Returns how many were dropped."""
        self.clock += 1
        keys: set[bytes] = set()
        for t in tables:
            if t == ALL:
                self._all_at[database] = self.clock
                keys.update(self._by_db.get(database, ()))
            else:
                self._invalidated_at[(database, t)] = self.clock
                keys.update(self._by_table.get((database, t), ()))
        dropped = 0
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None:
                self._drop(entry, "invalidation")
                dropped += 1
        return dropped

    def expire(self, now: float, limit: int = 1000) -> int:
        """Drop up to ``limit`` expired entries (from the least recently used end)."""
        dropped = 0
        for entry in list(self._entries.values())[:limit]:
            if entry.expires <= now:
                self._drop(entry, "expiration")
                dropped += 1
        return dropped

    def shrink_to(self, max_bytes: int) -> None:
        """Evict the least recently used entries until at most ``max_bytes`` are held."""
        while self.bytes > max_bytes and self._entries:
            self._drop(next(iter(self._entries.values())), "eviction")

    def clear(self) -> None:
        for entry in list(self._entries.values()):
            self._drop(entry, "invalidation")

    def _drop(self, entry: Entry, why: str) -> None:
        del self._entries[entry.key]
        self.bytes -= entry.size
        db = entry.database
        for t in entry.tables:
            keys = self._by_table.get((db, t))
            if keys is not None:
                keys.discard(entry.key)
                if not keys:
                    del self._by_table[(db, t)]
        keys = self._by_db.get(db)
        if keys is not None:
            keys.discard(entry.key)
            if not keys:
                del self._by_db[db]
        self.stats.dropped(entry.rule, entry.fingerprint, entry.size, why)
