"""The supervisor's view of its workers, as the admin API reads a process (``AdminSource``).

Statistics, slow log, transactions and findings: each worker's state sections (the shape of a
snapshot) merged by ``sqlproxy.statestore.view.fleet_view`` — the fleet's merge, so workers
add up exactly as fleet instances do (calls, rows, errors summed, sketches merged, findings
merged by id). What the workers that have stopped or died counted is kept in ``carried``
(their last answer, or the final state a worker writes when it stops) and merged too, so the
totals never go down when a worker restarts; the durable state store, run here and not in
the workers, restores into ``carried`` at start and snapshots the merged view.

The admin side keeps references into the profiler it was given (the findings view, the
Prometheus collector's per-entry counts), so the merged view is one long-lived ``Profiler``
whose contents are replaced at each refresh; statistics entries that exist already are
updated in place (reset, then the fresh one merged in), which keeps Prometheus counters
monotonic.

A refresh asks every worker for its state over its control socket, which costs the worker
the serialization of its statistics on its event loop: it happens when the admin API is
asked (at most every ``MIN_REFRESH`` seconds) and every ``PERIOD`` seconds, not continuously.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from typing import Any

from sqlproxy.analysis.profiler import Profiler
from sqlproxy.analysis.sketch import LogSketch
from sqlproxy.analysis.stats import SKETCH_ACCURACY, StatEntry
from sqlproxy.analysis.timefmt import iso
from sqlproxy.config import Config
from sqlproxy.logs import get_logger
from sqlproxy.state import profiler_contributors
from sqlproxy.statestore.base import StateStore, StoreStatus
from sqlproxy.statestore.fleet import FleetViews
from sqlproxy.statestore.merge import merge_entry
from sqlproxy.statestore.view import InstanceSections, fleet_view, live_sections
from sqlproxy.workers.control import request, socket_path

__all__ = ["MergedWorkers"]

log = get_logger("sqlproxy.workers")

MIN_REFRESH = 0.5  # seconds: admin requests closer together share one refresh
PERIOD = 10.0  # seconds: background refresh (bounds what a killed worker's totals lose)
ASK_TIMEOUT = 10.0


class _State:
    def __init__(self, value: str) -> None:
        self.value = value


class RemoteSession:
    """A worker's session as its ``describe()`` gave it (with ``worker``)."""

    def __init__(self, desc: dict[str, Any]) -> None:
        self.desc = desc
        self.state = _State(str(desc.get("state", "unknown")))

    def describe(self) -> dict[str, Any]:
        return self.desc


class MergedPools:
    """The transaction pools of all workers, as ``PoolManager.describe`` gives them."""

    def __init__(self, pools: list[dict[str, Any]]) -> None:
        self.pools = pools

    def describe(self) -> list[dict[str, Any]]:
        return [dict(p) for p in self.pools]


class MergedProxy:
    """``ProxyView`` over all workers: sessions keyed worker * 10^12 + session id."""

    def __init__(self) -> None:
        self.accepting = False
        self.sessions: dict[int, RemoteSession] = {}
        self.pools: MergedPools | None = None  # pool.mode = "transaction"


def _reset_into(into: StatEntry, fresh: StatEntry) -> None:
    """Make ``into`` hold exactly ``fresh``'s figures, keeping the object."""
    into.calls = 0
    into.rows = 0
    into.total = 0.0
    into.sumsq = 0.0
    into.min = math.inf
    into.max = 0.0
    into.errors = {}
    into.applications = {}
    into.other_routes = {}
    into.first_seen = math.inf
    into.last_seen = -math.inf
    into.sketch = LogSketch(SKETCH_ACCURACY)
    into.usage = 0.0
    merge_entry(into, fresh)


class MergedWorkers:
    """Implements ``sqlproxy.admin.source.AdminSource`` for a supervisor."""

    def __init__(self, supervisor: Any, store_factory: Any = None) -> None:
        self.sup = supervisor
        cfg: Config = supervisor.config
        self.proxy = MergedProxy()
        self.profiler: Profiler | None = None
        self.carried: Profiler | None = None
        if cfg.analysis.enabled:
            self.profiler = self._unbounded(Profiler(cfg.analysis))
            self.carried = self._unbounded(Profiler(cfg.analysis))
        self._backends: list[dict[str, Any]] = []
        self._answers: dict[int, dict[str, Any]] = {}  # worker -> its last state answer
        self._refreshed = 0.0
        self._viewed = False
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.store: StateStore | None = store_factory(self.contributors) \
            if store_factory is not None and self.profiler is not None else None
        # With a fleet database: this machine (all its workers, as one instance) and the
        # other instances, as a single process shows them.
        self.fleet: FleetViews | None = (
            FleetViews(self.store, cfg.state.instance_id, lambda: self.config.analysis)
            if self.store is not None else None)
        supervisor.on_exit.append(self.worker_exited)

    @staticmethod
    def _unbounded(p: Profiler) -> Profiler:
        p.stats.max_entries = sys.maxsize  # each worker bounds its own; this holds their sum
        p.detector.findings.max_entries = sys.maxsize
        return p

    @property
    def config(self) -> Config:
        cfg: Config = self.sup.config
        return cfg

    def contributors(self) -> list[Any]:
        """The state store's sections: restored into ``carried``, snapshots of the view."""
        target = self.profiler if self._viewed else self.carried
        return profiler_contributors(target) if target is not None else []

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self.store is not None:
            await self.store.restore()
            self.store.start()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._answers.clear()  # the workers are gone: what they counted is in ``carried``
        await self._rebuild()
        if self.store is not None:
            await self.store.close()  # the final snapshot: every worker's final state

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(PERIOD)
            try:
                await self.refresh(force=True)
            except Exception as exc:  # the admin must outlive a bad answer
                log.error("workers_refresh_failed", error=f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ workers' state
    def worker_exited(self, slot: Any, pid: int) -> None:
        """Keep what a stopped or dead worker counted: its final state if it left one, else
        its last answer."""
        final = self.sup.read_final(slot, pid)
        last = self._answers.pop(slot.index, None)
        sections = final
        if sections is None and last is not None and last.get("pid") == pid:
            sections = last.get("sections")
        if sections and self.carried is not None:
            self._fold(self.carried, {k: (int(v[0]), v[1]) for k, v in sections.items()})

    @staticmethod
    def _fold(into: Profiler, sections: InstanceSections) -> None:
        by_name = {c.state_section: c for c in profiler_contributors(into)}
        for name, (version, data) in sections.items():
            c = by_name.get(name)
            if c is not None:
                try:
                    c.from_state(data, version)
                except Exception as exc:
                    log.warning("workers_section_skipped", section=name,
                                error=f"{type(exc).__name__}: {exc}")

    async def _ask(self, index: int) -> dict[str, Any] | None:
        try:
            return await request(socket_path(self.sup.rundir, index), {"op": "state"},
                                 timeout=ASK_TIMEOUT)
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            return None  # starting, stopping or dead: its last answer stands

    async def refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._refreshed < MIN_REFRESH:
            return
        async with self._lock:
            if not force and time.monotonic() - self._refreshed < MIN_REFRESH:
                return
            alive = [s for s in self.sup.slots if s.alive]
            answers = await asyncio.gather(*(self._ask(s.index) for s in alive))
            for slot, answer in zip(alive, answers, strict=True):
                if answer is not None and answer.get("pid") == slot.pid:
                    _reassemble(answer)
                    self._answers[slot.index] = answer
            await self._rebuild()
            self._refreshed = time.monotonic()

    async def _rebuild(self) -> None:
        answers = [self._answers[i] for i in sorted(self._answers)]
        sessions: dict[int, RemoteSession] = {}
        for a in answers:
            for d in a.get("sessions", []):
                sessions[int(a["worker"]) * 10**12 + int(d["id"])] = RemoteSession(d)
        self.proxy.sessions = sessions
        self.proxy.accepting = any(a.get("accepting") for a in answers)
        self._backends = _merge_backends([a.get("backends", []) for a in answers])
        self.proxy.pools = MergedPools(merge_pools([a.get("pools", []) for a in answers])) \
            if self.config.pool.mode == "transaction" else None
        if self.profiler is None or self.carried is None:
            return
        parts: list[tuple[str, InstanceSections]] = [
            ("carried", live_sections(profiler_contributors(self.carried)))]
        parts += [(f"worker-{a['worker']}", {k: (int(v[0]), v[1])
                                             for k, v in a.get("sections", {}).items()})
                  for a in answers]
        fresh, problems = await asyncio.to_thread(fleet_view, self.config.analysis, parts)
        for problem in problems:
            log.warning("workers_section_skipped", problem=problem)
        self._install(fresh)
        self._viewed = True

    def _install(self, fresh: Profiler) -> None:
        view = self.profiler
        assert view is not None
        old = view.stats.entries
        entries: dict[tuple[str, str, str], StatEntry] = {}
        for key, e in fresh.stats.entries.items():
            kept = old.get(key)
            if kept is not None:
                _reset_into(kept, e)
                e = kept
            entries[key] = e
        view.stats.entries = entries
        view.stats.evictions = fresh.stats.evictions
        view.slow = fresh.slow
        view.transactions = fresh.transactions
        view.detector = fresh.detector
        view.detectors = fresh.detectors
        view.windows = fresh.windows
        view.endpoints = fresh.endpoints
        view.executions = fresh.executions
        view.started_at = fresh.started_at

    async def reset(self, what: str) -> None:
        """``POST /api/reset`` on the supervisor: every worker resets, and so does what the
        supervisor carries for stopped workers."""
        if self.carried is not None:
            self.carried.reset(what)
        alive = [s for s in self.sup.slots if s.alive]
        await asyncio.gather(*(self._reset_one(s.index, what) for s in alive))
        await self.refresh(force=True)

    async def _reset_one(self, index: int, what: str) -> None:
        try:
            await request(socket_path(self.sup.rundir, index), {"op": "reset", "what": what},
                          timeout=ASK_TIMEOUT)
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as exc:
            log.warning("workers_reset_failed", worker=index,
                        error=f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ AdminSource
    def backends(self) -> list[dict[str, Any]]:
        return [dict(b) for b in self._backends] or [{
            "name": "primary", "role": "primary",
            "address": self.config.proxy.primary_url.address, "healthy": None,
            "in_rotation": True, "lag_ms": 0.0, "lag_bytes": 0, "server_connections": 0,
            "error": None, "checked_at": None}]

    async def fleet_profiler(self) -> Profiler | None:
        view = await self.fleet.view() if self.fleet is not None else None
        return view if view is not None else self.profiler

    def fleet_instances(self) -> list[dict[str, Any]]:
        status = self.state_status()
        me: dict[str, Any] = {
            "instance": self.config.state.instance_id, "local": True, "sqlproxy": _version(),
            "snapshot_seconds": self.config.state.snapshot_seconds,
            "last_snapshot": status.to_dict()["last_snapshot"] if status else None,
            "age_s": None, "workers": self.sup.count}
        others = self.store.others() if self.store is not None else []
        return [me, *({
            "instance": o.instance, "local": False, "sqlproxy": o.sqlproxy,
            "snapshot_seconds": o.snapshot_seconds, "last_snapshot": iso(o.written_at),
            "age_s": round(o.age_s, 3),
        } for o in sorted(others, key=lambda o: o.instance))]

    def state_status(self) -> StoreStatus | None:
        return self.store.status() if self.store is not None else None

    def workers(self) -> list[dict[str, Any]]:
        """Each worker: its index, process, restarts and sessions (``/api/workers``)."""
        out = []
        for slot in self.sup.slots:
            a = self._answers.get(slot.index, {})
            out.append({"worker": slot.index, "pid": slot.pid, "alive": slot.alive,
                        "restarts": slot.restarts,
                        "started_at": slot.started_wall or None, "last_exit": slot.last_exit,
                        "sessions": len(a.get("sessions", [])) if slot.alive else 0,
                        "rejected": a.get("rejected", {}), "timeouts": a.get("timeouts", {})})
        return out


def _reassemble(answer: dict[str, Any]) -> None:
    """Put the statistics entries a worker sends beside its sections back into the section
    (see ``Worker.state``)."""
    entries = answer.pop("statistics_entries", None)
    stats = answer.get("sections", {}).get("statistics")
    if entries is not None and stats is not None:
        stats[1]["entries"] = entries


def _version() -> str:
    from sqlproxy import __version__

    return __version__


def _merge_backends(per_worker: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The first worker's view of each backend, with the server connections (and routing
    counters) of all workers summed."""
    out: list[dict[str, Any]] = []
    index: dict[str, dict[str, Any]] = {}
    summed = ("server_connections", "routed", "fallbacks", "pinned_sessions", "outstanding",
              "retried", "failures")
    for backends in per_worker:
        for b in backends:
            name = str(b.get("name"))
            have = index.get(name)
            if have is None:
                index[name] = dict(b)
                out.append(index[name])
                continue
            for k in summed:
                if isinstance(b.get(k), int) and isinstance(have.get(k), int):
                    have[k] += b[k]
    return out


#: Pool figures that do not add up over workers: the largest worker's stands for all.
_POOL_MAX = frozenset({"all_busy_share", "uptime_s", "max", "p50", "p99"})


def _merge_pool_value(have: Any, more: Any, key: str) -> Any:
    if isinstance(have, bool) or isinstance(more, bool):
        return have
    if isinstance(have, int | float) and isinstance(more, int | float):
        return max(have, more) if key in _POOL_MAX else have + more
    if isinstance(have, dict) and isinstance(more, dict):
        out = dict(have)
        for k, v in more.items():
            out[k] = _merge_pool_value(out[k], v, k) if k in out else v
        return out
    if isinstance(have, list) and isinstance(more, list):
        return have + more
    return have


def merge_pools(per_worker: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One pool per (database, user, backend) for the machine: each worker has its own pool with its
    share of ``pool.size`` (see ``worker.share_pool``), so sizes, servers, clients, checkouts,
    opens and closes add up; the wait percentiles, the share of time all were busy and the
    uptime are the largest worker's (a pool that made clients wait on one worker did so on
    the machine); the peaks (``max_active``, per application) are summed, an upper bound of
    what was busy at once; pinned clients are listed from every worker."""
    out: list[dict[str, Any]] = []
    index: dict[tuple[Any, Any, Any], dict[str, Any]] = {}
    for pools in per_worker:
        for pool in pools:
            key = (pool.get("database"), pool.get("user"), pool.get("backend", "primary"))
            have = index.get(key)
            if have is None:
                index[key] = dict(pool, workers=1)
                out.append(index[key])
                continue
            for k, v in pool.items():
                if k not in ("database", "user", "backend"):
                    have[k] = _merge_pool_value(have[k], v, k) if k in have else v
            have["workers"] = int(have.get("workers", 1)) + 1
    return out
