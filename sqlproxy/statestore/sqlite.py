"""The embedded default: this instance's state in a SQLite file (``sqlproxy.state.StateFile``),
restored before the proxy starts and snapshotted every ``state.snapshot_seconds``."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from sqlproxy.logs import get_logger
from sqlproxy.state import StateFile
from sqlproxy.statestore.base import Contributors, FleetState, InstanceSnapshot, StoreStatus

log = get_logger("sqlproxy.state")


class SqliteStore:
    def __init__(self, path: str, instance: str, contributors: Contributors,
                 period: Callable[[], float]) -> None:
        self.file = StateFile(path)
        self.instance = instance
        self.contributors = contributors
        self.period = period  # read at every cycle: a reload changes it live
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._ok: bool | None = None
        self._error: str | None = None
        self._failures = 0
        self._next_at = 0.0  # time.monotonic() of the next periodic snapshot

    async def restore(self) -> None:
        # A local file: restored at once, before the proxy accepts anything.
        self.file.load(self.contributors())

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            period = self.period()
            self._next_at = time.monotonic() + period
            await asyncio.sleep(period)
            await self.snapshot()

    async def snapshot(self) -> bool:
        async with self._lock:
            try:
                sections = StateFile.collect(self.contributors())
                await asyncio.to_thread(self.file.write, sections)
            except Exception as exc:  # a full disk must not take the proxy down
                self._ok = False
                self._failures += 1
                self._error = f"{type(exc).__name__}: {exc}"
                log.error("state_snapshot_failed", path=str(self.file.path), error=self._error)
                return False
        self._ok = True
        self._error = None
        return True

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.snapshot()

    def status(self) -> StoreStatus:
        retry = max(0.0, self._next_at - time.monotonic()) if self._ok is False else None
        return StoreStatus(
            kind="sqlite", where=str(self.file.path), instance=self.instance, ok=self._ok,
            error=self._error, retry_in_s=retry, failures=self._failures, restored=True,
            last_success=self.file.last_written, fleet_instances=0)

    def others(self) -> list[InstanceSnapshot]:
        return []

    def fleet_state(self) -> FleetState:
        return FleetState(0, None, [])
