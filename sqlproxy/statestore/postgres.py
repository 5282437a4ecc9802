"""A fleet's state in one PostgreSQL database: each instance writes its own rows and reads the
others', so that any instance can show the merged view of all of them.

Schema ``sqlproxy_state`` (created on first start, under an advisory lock so that instances
starting together do not race; left alone if it exists, so a role with only row privileges
works once an administrator created it):

* ``meta(key, value)``: ``format`` = :data:`SCHEMA_VERSION`. A database of another format is
  never written to: the store reports the mismatch and keeps retrying (someone may migrate it);
* ``instances(instance, written_at, snapshot_seconds, started_at, sqlproxy, writer)``: one row
  per instance, ``written_at`` by the database's clock (instances' clocks may disagree);
  ``writer`` is a random id per process, to notice two processes sharing one instance name;
* ``sections(instance, name, version, data jsonb)``: the same sections as the SQLite file;
* ``set_aside(...)``: sections this instance could not restore, copied before being
  overwritten (the SQLite store keeps a copy of the file for the same reason).

The database is never on the proxy's path. One background task connects (with
``state.timeout``), restores this instance's own rows, then every ``snapshot_seconds`` writes a
snapshot and reads the snapshots the other instances wrote within ``fleet_window`` of their
own periods. Any failure drops the connection and retries with exponential backoff; until the
own rows have been read back nothing is written, so a database that was down at start never
gets its older state overwritten by a fresh process's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import secrets
import time
from collections.abc import Callable
from typing import Any

import asyncpg

from sqlproxy import __version__
from sqlproxy.config import redact_url
from sqlproxy.logs import get_logger
from sqlproxy.state import StateFile, restore_sections
from sqlproxy.statestore.backoff import CAP_SECONDS, INITIAL_SECONDS, retry_delay
from sqlproxy.statestore.base import (
    Contributors,
    FleetState,
    InstanceSnapshot,
    Sections,
    StoreStatus,
)

__all__ = ["SCHEMA", "SCHEMA_VERSION", "PostgresStore", "StoreError"]

SCHEMA = "sqlproxy_state"
SCHEMA_VERSION = 1
_LOCK_KEY = 0x73716C70_73746174  # pg_advisory_xact_lock key for creating the schema

log = get_logger("sqlproxy.state")

_DDL = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {SCHEMA}.meta (
    key text PRIMARY KEY,
    value text NOT NULL
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.instances (
    instance text PRIMARY KEY,
    written_at timestamptz NOT NULL,
    snapshot_seconds double precision NOT NULL,
    started_at timestamptz NOT NULL,
    sqlproxy text NOT NULL,
    writer text NOT NULL
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.sections (
    instance text NOT NULL REFERENCES {SCHEMA}.instances ON DELETE CASCADE,
    name text NOT NULL,
    version integer NOT NULL,
    data jsonb NOT NULL,
    PRIMARY KEY (instance, name)
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.set_aside (
    instance text NOT NULL,
    name text NOT NULL,
    version integer NOT NULL,
    data jsonb NOT NULL,
    reason text NOT NULL,
    set_aside_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO {SCHEMA}.meta VALUES ('format', '{SCHEMA_VERSION}') ON CONFLICT (key) DO NOTHING;
"""

_UPSERT_INSTANCE = f"""
INSERT INTO {SCHEMA}.instances AS i
    (instance, written_at, snapshot_seconds, started_at, sqlproxy, writer)
VALUES ($1, now(), $2, to_timestamp($3), $4, $5)
ON CONFLICT (instance) DO UPDATE SET written_at = now(),
    snapshot_seconds = excluded.snapshot_seconds, started_at = excluded.started_at,
    sqlproxy = excluded.sqlproxy, writer = excluded.writer
RETURNING extract(epoch FROM i.written_at)::float8
"""

_UPSERT_SECTION = f"""
INSERT INTO {SCHEMA}.sections (instance, name, version, data) VALUES ($1, $2, $3, $4::jsonb)
ON CONFLICT (instance, name) DO UPDATE SET version = excluded.version, data = excluded.data
"""

_FLEET = f"""
SELECT instance, sqlproxy, snapshot_seconds,
       extract(epoch FROM written_at)::float8 AS written_at,
       extract(epoch FROM now() - written_at)::float8 AS age
FROM {SCHEMA}.instances
WHERE instance <> $1 AND written_at > now() - make_interval(secs => $2 * snapshot_seconds)
"""


class StoreError(Exception):
    """The state database cannot be used as it is (e.g. another format)."""


def _parse(rows: list[tuple[str, str, int, str]]) -> dict[str, dict[str, tuple[int, Any]]]:
    """Section rows as parsed JSON per instance (run in a worker thread: it can be MBs)."""
    out: dict[str, dict[str, tuple[int, Any]]] = {}
    for instance, name, version, data in rows:
        out.setdefault(instance, {})[name] = (version, json.loads(data))
    return out


class PostgresStore:
    def __init__(self, url: str, instance: str, contributors: Contributors,
                 period: Callable[[], float], *, window: int = 3, timeout: float = 5.0) -> None:
        self.url = url
        self.where = redact_url(url)
        self.instance = instance
        self.contributors = contributors
        self.period = period  # read at every cycle: a reload changes it live
        self.window = window
        self.timeout = timeout
        self.writer = secrets.token_hex(8)
        self.started_at = time.time()
        self._conn: Any = None  # asyncpg.Connection
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._restored = False
        self._wrote = False
        self._conflict: str | None = None  # another process writes under our name
        self._ok: bool | None = None
        self._error: str | None = None
        self._failures = 0
        self._streak = 0  # failures in a row
        self._next_at = 0.0  # time.monotonic() of the next attempt
        self._last_success: float | None = None
        # Other instances: their last snapshot, and time.monotonic() when it was read.
        self._others: dict[str, tuple[InstanceSnapshot, float]] = {}
        self._local: Sections | None = None  # what this instance wrote last
        self._generation = 0  # bumped when _local or _others change

    # ------------------------------------------------------------------ lifecycle
    async def restore(self) -> None:
        """Nothing here: the proxy starts whether or not the database answers; the
        background task restores this instance's rows once it reaches the database."""

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.snapshot()
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), self.timeout)
            except Exception:
                conn.terminate()

    async def snapshot(self) -> bool:
        if not self._restored:
            log.warning("state_snapshot_skipped", where=self.where, instance=self.instance,
                        reason="this instance's state was not read back from the state "
                               "database yet: writing now would overwrite it")
            return False
        try:
            async with self._lock:
                await self._write(await self._connect())
        except Exception as exc:
            self._failed(exc)
            return False
        self._succeeded()
        return True

    async def _run(self) -> None:
        while True:
            try:
                async with self._lock:
                    conn = await self._connect()
                    if not self._restored:
                        await self._restore(conn)
                    await self._write(conn)
                    await self._refresh(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = self._failed(exc)
            else:
                self._succeeded()
                delay = self.period()
            self._next_at = time.monotonic() + delay
            await asyncio.sleep(delay)

    # ------------------------------------------------------------------ database work
    async def _connect(self) -> Any:
        conn = self._conn
        if conn is not None and not conn.is_closed():
            return conn
        conn = await asyncpg.connect(
            self.url, timeout=self.timeout, command_timeout=self.timeout,
            server_settings={"application_name": f"sqlproxy-state {self.instance}"[:63]})
        try:
            await self._prepare(conn)
        except BaseException:
            conn.terminate()
            raise
        self._conn = conn
        return conn

    async def _prepare(self, conn: Any) -> None:
        if await conn.fetchval(f"SELECT to_regclass('{SCHEMA}.set_aside')") is None:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
                await conn.execute(_DDL)
        fmt = await conn.fetchval(f"SELECT value FROM {SCHEMA}.meta WHERE key = 'format'")
        if fmt != str(SCHEMA_VERSION):
            raise StoreError(f"the state database holds format {fmt!r} in {SCHEMA}.meta; this "
                             f"sqlproxy uses {SCHEMA_VERSION}: not touching it")

    async def _restore(self, conn: Any) -> None:
        rows = await conn.fetch(f"SELECT name, version, data::text AS data FROM {SCHEMA}.sections"
                                " WHERE instance = $1", self.instance)
        sections = {str(r["name"]): (int(r["version"]), str(r["data"])) for r in rows}
        restored, failed = restore_sections(self.contributors(), sections,
                                            where=self.where, instance=self.instance)
        if failed:
            bad = [n for n in sections if n not in restored]
            await conn.execute(
                f"INSERT INTO {SCHEMA}.set_aside (instance, name, version, data, reason) "
                f"SELECT instance, name, version, data, 'could not be restored by sqlproxy "
                f"{__version__}' FROM {SCHEMA}.sections WHERE instance = $1 AND name = ANY($2)",
                self.instance, bad)
            log.warning("state_sections_set_aside", where=self.where, instance=self.instance,
                        sections=bad, table=f"{SCHEMA}.set_aside")
        self._restored = True
        if sections:
            log.info("state_loaded", where=self.where, instance=self.instance,
                     sections=restored)

    async def _write(self, conn: Any) -> None:
        sections = StateFile.collect(self.contributors())  # on the loop: a consistent state
        async with conn.transaction():
            writer = await conn.fetchval(
                f"SELECT writer FROM {SCHEMA}.instances WHERE instance = $1 FOR UPDATE",
                self.instance)
            if self._wrote and writer not in (None, self.writer) and self._conflict is None:
                self._conflict = (f"another process writes under the instance name "
                                  f"{self.instance!r}: give each instance its own "
                                  "([state] instance, SQLPROXY_STATE__INSTANCE)")
                log.error("state_instance_conflict", where=self.where, instance=self.instance,
                          detail=self._conflict)
            written_at = await conn.fetchval(
                _UPSERT_INSTANCE, self.instance, float(self.period()), self.started_at,
                __version__, self.writer)
            await conn.execute(
                f"DELETE FROM {SCHEMA}.sections WHERE instance = $1 AND name <> ALL($2)",
                self.instance, [name for name, _, _ in sections])
            await conn.executemany(_UPSERT_SECTION,
                                   [(self.instance, n, v, d) for n, v, d in sections])
        self._wrote = True
        self._last_success = float(written_at)
        self._local = sections
        self._generation += 1

    async def _refresh(self, conn: Any) -> None:
        """Read the other instances' snapshots: only those written since the last read."""
        rows = await conn.fetch(_FLEET, self.instance, float(self.window))
        now = time.monotonic()
        fresh = {str(r["instance"]): r for r in rows}
        changed = [name for name, r in fresh.items()
                   if name not in self._others
                   or self._others[name][0].written_at != float(r["written_at"])]
        parsed: dict[str, dict[str, tuple[int, Any]]] = {}
        if changed:
            data = await conn.fetch(
                f"SELECT instance, name, version, data::text FROM {SCHEMA}.sections "
                "WHERE instance = ANY($1)", changed)
            parsed = await asyncio.to_thread(_parse, [tuple(r) for r in data])
        others: dict[str, tuple[InstanceSnapshot, float]] = {}
        for name, r in fresh.items():
            if name in parsed:
                snap = InstanceSnapshot(
                    instance=name, sqlproxy=str(r["sqlproxy"]),
                    written_at=float(r["written_at"]), age_s=float(r["age"]),
                    snapshot_seconds=float(r["snapshot_seconds"]), sections=parsed[name])
                others[name] = (snap, now)
            elif name in self._others:
                others[name] = self._others[name]
        if others.keys() != self._others.keys() or parsed:
            self._generation += 1
        self._others = others

    # ------------------------------------------------------------------ status
    def _failed(self, exc: BaseException) -> float:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()
        self._ok = False
        self._failures += 1
        self._streak += 1
        error = redact_url(f"{type(exc).__name__}: {exc}".rstrip(": "))
        delay = retry_delay(self._streak, random.uniform(0.8, 1.2),
                            initial=min(INITIAL_SECONDS, self.period()),
                            cap=max(CAP_SECONDS, self.period()))
        if self._streak == 1 or error != self._error:
            log.warning("state_store_failed", where=self.where, instance=self.instance,
                        error=error, retry_in_s=round(delay, 3), failures=self._failures)
        self._error = error
        self._next_at = time.monotonic() + delay
        return delay

    def _succeeded(self) -> None:
        if self._ok is False:
            log.info("state_store_recovered", where=self.where, instance=self.instance,
                     failed_attempts=self._streak)
        self._ok = True
        self._error = None
        self._streak = 0

    def status(self) -> StoreStatus:
        failing = self._ok is False
        return StoreStatus(
            kind="postgresql", where=self.where, instance=self.instance, ok=self._ok,
            error=self._error,
            retry_in_s=max(0.0, self._next_at - time.monotonic()) if failing else None,
            failures=self._failures, restored=self._restored,
            last_success=self._last_success, fleet_instances=len(self.others()),
            warning=self._conflict)

    def fleet_state(self) -> FleetState:
        others = self.others()
        # An instance leaving the window changes the view too.
        generation = hash((self._generation, tuple(sorted(o.instance for o in others))))
        return FleetState(generation, self._local, others)

    def others(self) -> list[InstanceSnapshot]:
        """The other instances whose last snapshot is at most ``window`` of their periods old
        (their age as the database told it, plus the time since we read it)."""
        now = time.monotonic()
        out = []
        for snap, read_at in self._others.values():
            age = snap.age_s + (now - read_at)
            if age <= self.window * snap.snapshot_seconds:
                out.append(dataclasses.replace(snap, age_s=age))
        return out
