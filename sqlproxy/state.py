"""Durable findings: snapshots of the profiler's state in an embedded SQLite file.

The file is a small, explicit, versioned format rather than a pickle, so that a snapshot written
by one sqlproxy version is either read correctly by another or recognised as incompatible:

* table ``meta(key, value)``: ``format`` (:data:`FORMAT_VERSION`), ``written_at``, ``sqlproxy``;
* table ``sections(name, version, data)``: one JSON document per contributing component.

Any component can contribute a section by implementing :class:`StateContributor`
(``state_section``, ``state_version``, ``to_state()``, ``from_state()``). The profiler's own
statistics, slow log and transaction statistics are contributed by adapters defined here (so the
analysis modules stay free of persistence concerns); the pattern detector contributes its
findings through its own methods.

Writes are atomic: the snapshot is built in ``<path>.tmp-<pid>``, fsynced, then moved over the
old file with ``os.replace``. A file that cannot be read (not SQLite, truncated, another format
version) is moved aside to ``<path>.corrupt-<timestamp>`` with a warning; a section that a
contributor refuses is skipped with a warning after a copy of the file is kept aside, so no data
is silently overwritten. Loading never raises.

Serialising happens on the event loop (it must see a consistent state, and takes a few ms for
thousands of fingerprints); the SQLite write runs in a worker thread.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sqlite3
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from sqlproxy import __version__
from sqlproxy.analysis.profiler import Profiler
from sqlproxy.analysis.sketch import LogSketch
from sqlproxy.analysis.slowlog import SlowLog, SlowQuery
from sqlproxy.analysis.stats import StatEntry, StatsStore, TransactionStats
from sqlproxy.logs import get_logger
from sqlproxy.statestore.merge import merge_entry, merge_transactions

__all__ = [
    "FORMAT_VERSION",
    "SlowLogState",
    "StateContributor",
    "StateFile",
    "StatisticsState",
    "TransactionState",
    "entry_to_state",
    "profiler_contributors",
    "restore_sections",
    "sketch_from_state",
    "sketch_to_state",
]

FORMAT_VERSION = 1
log = get_logger("sqlproxy.state")


class StateError(Exception):
    """A section could not be restored (wrong shape, unknown version)."""


@runtime_checkable
class StateContributor(Protocol):
    """A component whose state survives restarts."""

    state_section: str  # unique section name in the file
    state_version: int  # bump when the shape of to_state() changes incompatibly

    def to_state(self) -> Any:
        """A JSON-able snapshot; called on the event loop."""

    def from_state(self, data: Any, version: int) -> None:
        """Restore from a snapshot of ``version``; raise on anything unexpected."""


# ------------------------------------------------------------------------------ sketches
def sketch_to_state(sketch: LogSketch) -> dict[str, Any]:
    """A latency sketch as plain data (its own ``to_state()``)."""
    return {"kind": type(sketch).__name__, "state": sketch.to_state()}


def sketch_from_state(data: dict[str, Any], template: LogSketch) -> LogSketch:
    """Rebuild a sketch of the same class and accuracy as ``template`` (a fresh, empty one)."""
    kind = type(template).__name__
    if data.get("kind") != kind:
        raise StateError(f"sketch kind {data.get('kind')!r} in the file, {kind!r} in use")
    sketch = type(template).from_state(data["state"])
    if sketch.relative_accuracy != template.relative_accuracy:
        raise StateError("sketch accuracy differs from the one in use")
    return sketch


def _num(x: float) -> float | str:
    """JSON has no infinities: keep them as strings."""
    return x if math.isfinite(x) else repr(x)


def _unnum(x: float | str) -> float:
    return float(x)


# ------------------------------------------------------------------------------ profiler adapters
class StatisticsState:
    """The per-fingerprint statistics (``StatsStore``) as a state section."""

    state_section = "statistics"
    state_version = 1

    def __init__(self, profiler: Profiler) -> None:
        self.profiler = profiler

    def to_state(self) -> Any:
        store = self.profiler.stats
        return {
            "evictions": store.evictions,
            "executions": self.profiler.executions,
            "started_at": self.profiler.started_at,
            "entries": [_entry_to_state(e) for e in store.entries.values()],
        }

    def from_state(self, data: Any, version: int) -> None:
        if version != 1:
            raise StateError(f"unknown statistics version {version}")
        store: StatsStore = self.profiler.stats
        entries = [_entry_from_state(d) for d in data["entries"]]
        for e in entries:
            key = (e.fingerprint, e.database, e.user)
            mine = store.entries.get(key)
            if mine is None:
                store.entries[key] = e
            else:  # recorded since start (a late load), or another instance's (a fleet view)
                merge_entry(mine, e)
        excess = len(store.entries) - store.max_entries
        if excess > 0:
            # analysis.max_fingerprints shrank since the snapshot: keep the most used.
            victims = sorted(store.entries.items(), key=lambda kv: kv[1].usage)[:excess]
            if store.on_retire is not None:
                store.on_retire([e for _, e in victims])
            for key, e in victims:
                e.evicted = True  # a session holding it looks its entry up again
                del store.entries[key]
            store.evictions += excess
        store.evictions += int(data["evictions"])
        self.profiler.executions += int(data["executions"])
        self.profiler.started_at = min(self.profiler.started_at, float(data["started_at"]))


# Entries are saved attribute by attribute: every plain attribute a fresh object has is
# written, and restored only if a fresh object of the running version still has it (with the
# type it has there). Fields added or dropped between versions therefore keep their defaults
# instead of making the whole section unreadable; the sketch is converted explicitly.
_TRANSIENT = frozenset({"evicted", "sketch"})


def _fields(obj: Any) -> dict[str, Any]:
    d = getattr(obj, "__dict__", None)
    if d is not None:
        return dict(d)
    # Slotted classes, and mypyc-compiled (native) classes, which list theirs in
    # __mypyc_attrs__ and have no __dict__.
    names = [n for cls in type(obj).__mro__
             for n in (*getattr(cls, "__slots__", ()), *getattr(cls, "__mypyc_attrs__", ()))
             if not n.startswith("__")]
    return {n: getattr(obj, n) for n in names if hasattr(obj, n)}


def _attrs_to_state(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in _fields(obj).items():
        if name in _TRANSIENT or name.startswith("_"):
            continue
        if isinstance(value, float):
            out[name] = _num(value)
        elif isinstance(value, tuple):
            out[name] = list(value)
        elif value is None or isinstance(value, str | int | dict | list):
            out[name] = value
    out["sketch"] = sketch_to_state(obj.sketch)
    return out


def _attrs_from_state(obj: Any, data: dict[str, Any]) -> None:
    fresh = _fields(obj)
    for name, value in data.items():
        if name in _TRANSIENT or name.startswith("_") or name not in fresh:
            continue
        current = fresh[name]
        if isinstance(current, bool):
            value = bool(value)
        elif isinstance(current, float):
            value = _unnum(value)
        elif isinstance(current, int):
            value = int(value)
        elif isinstance(current, str):
            value = str(value)
        elif isinstance(current, tuple):
            value = tuple(value)
        elif isinstance(current, dict):
            if not isinstance(value, dict):
                raise StateError(f"{name}: expected an object")
            value = dict(value)
        elif current is None:
            if isinstance(value, list):
                value = tuple(value)
        elif value is not None:
            raise StateError(f"{name}: cannot restore a {type(current).__name__}")
        setattr(obj, name, value)
    obj.sketch = sketch_from_state(data["sketch"], obj.sketch)


def _entry_to_state(e: StatEntry) -> dict[str, Any]:
    return _attrs_to_state(e)


def entry_to_state(e: StatEntry) -> dict[str, Any]:
    """One entry of the ``statistics`` section (workers encode only the entries that changed
    since the supervisor last asked: ``sqlproxy.workers.worker``)."""
    return _attrs_to_state(e)


def _entry_from_state(d: dict[str, Any]) -> StatEntry:
    e = StatEntry(str(d["fingerprint"]), str(d["database"]), str(d["user"]), str(d["query"]),
                  str(d["kind"]), float(d["first_seen"]))
    _attrs_from_state(e, d)
    return e


class SlowLogState:
    """The slow-query log as a state section (oldest first)."""

    state_section = "slow_log"
    state_version = 1

    def __init__(self, profiler: Profiler) -> None:
        self.profiler = profiler

    def to_state(self) -> Any:
        slow = self.profiler.slow
        return {"total": slow.total, "entries": [
            [s.at, s.duration, s.fingerprint, s.query, s.database, s.user, s.application,
             s.client, s.connection_id, s.rows, s.sqlstate, s.route,
             list(s.parameters) if s.parameters is not None else None]
            for s in slow.entries
        ]}

    def from_state(self, data: Any, version: int) -> None:
        if version != 1:
            raise StateError(f"unknown slow_log version {version}")
        slow: SlowLog = self.profiler.slow
        items = []
        for r in data["entries"]:
            (at, duration, fp, query, db, user, app, client, conn_id, rows, sqlstate, route,
             params) = r
            items.append(SlowQuery(
                float(at), float(duration), str(fp), str(query), str(db), str(user), str(app),
                str(client), int(conn_id), int(rows),
                str(sqlstate) if sqlstate is not None else None, str(route),
                tuple(str(p) for p in params) if params is not None else None,
            ))
        # Restored entries are older than anything recorded since start: put them first.
        current = list(slow.entries)
        slow.entries = deque(items + current, maxlen=slow.entries.maxlen)
        slow.total += int(data["total"])


class TransactionState:
    """Transaction statistics per (database, user) as a state section."""

    state_section = "transactions"
    state_version = 1

    def __init__(self, profiler: Profiler) -> None:
        self.profiler = profiler

    def to_state(self) -> Any:
        return [{"database": db, "user": user, **_attrs_to_state(tx)}
                for (db, user), tx in self.profiler.transactions.items()]

    def from_state(self, data: Any, version: int) -> None:
        if version != 1:
            raise StateError(f"unknown transactions version {version}")
        restored: dict[tuple[str, str], TransactionStats] = {}
        for d in data:
            tx = TransactionStats()
            _attrs_from_state(tx, d)
            restored[(str(d["database"]), str(d["user"]))] = tx
        current = self.profiler.transactions  # recorded since start: merge
        for key, tx in restored.items():
            mine = current.get(key)
            if mine is None:
                current[key] = tx
            else:
                merge_transactions(mine, tx)


def profiler_contributors(profiler: Profiler) -> list[StateContributor]:
    """The profiler's sections, plus any component hanging off it that contributes its own
    (e.g. the pattern detector's findings)."""
    out: list[StateContributor] = [
        StatisticsState(profiler), SlowLogState(profiler), TransactionState(profiler),
    ]
    for name in ("detector", "findings", "endpoints", "windows"):
        part = getattr(profiler, name, None)
        if isinstance(part, StateContributor):
            out.append(part)
    return out


def restore_sections(contributors: list[StateContributor],
                     sections: Mapping[str, tuple[int, str]],
                     **where: str) -> tuple[list[str], bool]:
    """Hand each section (name -> (version, JSON text)) to its contributor; never raises.

    The sections restored, and whether any was refused (logged with ``where``)."""
    by_name = {c.state_section: c for c in contributors}
    restored: list[str] = []
    failed = False
    for name, (version, data) in sections.items():
        c = by_name.get(name)
        if c is None:
            log.info("state_section_ignored", section=name, **where)
            continue
        try:
            c.from_state(json.loads(data), version)
        except Exception as exc:  # any bad section must not stop startup
            failed = True
            log.warning("state_section_unreadable", section=name, version=version,
                        error=f"{type(exc).__name__}: {exc}", **where)
            continue
        restored.append(name)
    return restored, failed


# ------------------------------------------------------------------------------ the file
class StateFile:
    """Reads and atomically writes the state file at ``path``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.snapshots = 0
        self.last_written: float | None = None
        self.last_bytes = 0

    # -- writing -------------------------------------------------------------------------
    @staticmethod
    def collect(contributors: list[StateContributor]) -> list[tuple[str, int, str]]:
        """Serialise every section (on the event loop: the state must be consistent)."""
        out = []
        for c in contributors:
            out.append((c.state_section, c.state_version,
                        json.dumps(c.to_state(), separators=(",", ":"), allow_nan=False)))
        return out

    def write(self, sections: list[tuple[str, int, str]]) -> None:
        """Write ``sections`` to a temporary file, fsync it, and move it over the old one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        now = time.time()
        try:
            conn = sqlite3.connect(tmp)
            try:
                conn.execute("PRAGMA journal_mode=OFF")  # a fresh file: no journal needed
                conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                conn.execute("CREATE TABLE sections (name TEXT PRIMARY KEY, "
                             "version INTEGER NOT NULL, data TEXT NOT NULL)")
                conn.executemany("INSERT INTO meta VALUES (?, ?)", [
                    ("format", str(FORMAT_VERSION)), ("written_at", repr(now)),
                    ("sqlproxy", __version__),
                ])
                conn.executemany("INSERT INTO sections VALUES (?, ?, ?)", sections)
                conn.commit()
            finally:
                conn.close()
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            with contextlib.suppress(OSError):
                dfd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.snapshots += 1
        self.last_written = now
        self.last_bytes = self.path.stat().st_size

    def save(self, contributors: list[StateContributor]) -> None:
        """Collect and write in one go (tests, shutdown)."""
        self.write(self.collect(contributors))

    # -- reading -------------------------------------------------------------------------
    def load(self, contributors: list[StateContributor]) -> bool:
        """Restore every section the file has; never raises. True if a snapshot was loaded."""
        if not self.path.exists():
            return False
        try:
            sections = self._read()
        except (sqlite3.Error, StateError, ValueError, OSError) as exc:
            self._set_aside(f"{type(exc).__name__}: {exc}", move=True)
            return False
        restored, failed = restore_sections(contributors, sections, path=str(self.path))
        if failed:
            self._set_aside("some sections could not be restored", move=False)
        log.info("state_loaded", path=str(self.path), sections=restored)
        return True

    def _read(self) -> dict[str, tuple[int, str]]:
        # Open read-only through a URI so a missing/odd file is never created or modified.
        uri = f"file:{self.path.resolve()}?mode=ro"
        conn = sqlite3.connect(uri, uri=True)
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            fmt = meta.get("format")
            if fmt != str(FORMAT_VERSION):
                raise StateError(f"state file format {fmt!r}, expected {FORMAT_VERSION}")
            rows = conn.execute("SELECT name, version, data FROM sections").fetchall()
        finally:
            conn.close()
        return {str(n): (int(v), str(d)) for n, v, d in rows}

    def _set_aside(self, reason: str, *, move: bool) -> None:
        aside = self.path.with_name(
            f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        try:
            if move:
                os.replace(self.path, aside)
            else:
                shutil.copy2(self.path, aside)
        except OSError as exc:
            log.error("state_file_unusable", path=str(self.path), reason=reason,
                      error=str(exc))
            return
        log.warning("state_file_set_aside", path=str(self.path), moved_to=str(aside),
                    reason=reason, kept_in_place=not move)
