"""A worker process: today's runtime (event loop, proxy, hot path) on a shared listen address.

Differences from a single process, all set up here: the listen socket has ``SO_REUSEPORT``
(the supervisor reserved the port, so port 0 means one port for all), the cancel secrets begin
with the worker's index, the connection limits are counted in the supervisor's shared memory,
and a control socket answers the other workers' cancel requests and the supervisor's
questions. The admin API and the durable state are the supervisor's: a worker runs neither.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlproxy.analysis.stats import StatEntry
from sqlproxy.config import Config, load_config
from sqlproxy.errors import ConfigError
from sqlproxy.logs import configure_logging, get_logger, set_process_fields
from sqlproxy.runtime import Runtime, install_uvloop
from sqlproxy.state import StatisticsState, entry_to_state
from sqlproxy.statestore.view import live_sections
from sqlproxy.workers.control import ControlServer, request, socket_path
from sqlproxy.workers.limits import SharedLimits

__all__ = ["WorkerSpec", "final_path", "worker_main"]

log = get_logger("sqlproxy.workers")

EXIT_CONFIG = 2  # the worker could not start with this configuration: do not restart it


@dataclass(frozen=True)
class WorkerSpec:
    """What the supervisor hands a worker (pickled into the new process)."""

    index: int
    workers: int
    config_path: str | None
    overrides: dict[str, Any]
    listen: str  # HOST:PORT with the port the supervisor reserved
    rundir: str
    limits: SharedLimits
    parent_pid: int


def final_path(rundir: str, worker: int) -> str:
    """Where a worker leaves its statistics when it stops (the supervisor folds them in)."""
    return os.path.join(rundir, f"w{worker}.final.json")


def worker_overrides(spec: WorkerSpec) -> dict[str, Any]:
    over: dict[str, Any] = json.loads(json.dumps(spec.overrides))  # a deep copy
    over.setdefault("proxy", {})["listen"] = spec.listen
    over.setdefault("admin", {})["enabled"] = False  # the supervisor's
    over.setdefault("state", {})["enabled"] = False  # the supervisor's (merged)
    return over


def share_pool(config: Config, index: int, workers: int) -> Config:
    """The worker's share of ``pool.size`` and ``pool.min_idle``, so that the machine opens
    at most ``pool.size`` server connections per pool however many workers there are (each
    worker keeps its own pools: nothing is shared per statement). Each worker needs at least
    one, so with fewer than ``workers`` the machine may open ``workers``."""
    pool = config.pool

    def part(total: int, floor: int) -> int:
        return max(floor, total // workers + (1 if index < total % workers else 0))

    size = part(pool.size, 1)
    shared = pool.model_copy(update={"size": size, "min_idle": min(size, part(pool.min_idle,
                                                                                0))})
    return config.model_copy(update={"pool": shared})


class Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        overrides = worker_overrides(spec)
        def share(c: Config) -> Config:
            return share_pool(c, spec.index, spec.workers)

        config = share(load_config(spec.config_path, overrides))
        self.rt = Runtime(config, config_path=spec.config_path, overrides=overrides,
                          adjust=share)
        proxy = self.rt.proxy
        proxy.worker = spec.index
        proxy.reuse_port = True
        spec.limits.bind(spec.index)
        proxy.shared_limits = spec.limits
        proxy.foreign_cancel = self.pass_cancel
        self.control = ControlServer(socket_path(spec.rundir, spec.index), self.handle)
        # Statistics entry -> (the entry, its calls, its encoded JSON) when last sent: the
        # supervisor's questions re-encode only what changed since (see ``state``).
        self._encoded: dict[tuple[str, str, str], tuple[StatEntry, int, str]] = {}

    # ------------------------------------------------------------------ cancel requests
    def pass_cancel(self, owner: int, pid: int, secret: bytes) -> asyncio.Task[None] | None:
        if owner >= self.spec.workers:
            log.info("cancel_request_unknown_key", pid=pid, worker=owner)
            return None
        task = asyncio.get_running_loop().create_task(self._pass_cancel(owner, pid, secret))
        self.rt.proxy.track(task)
        return task

    async def _pass_cancel(self, owner: int, pid: int, secret: bytes) -> None:
        try:
            await request(socket_path(self.spec.rundir, owner),
                          {"op": "cancel", "pid": pid, "secret": secret.hex()},
                          timeout=2 * self.rt.config.proxy.connect_timeout + 1)
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as exc:
            log.warning("cancel_pass_failed", worker=owner, error=f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ the control channel
    async def handle(self, req: dict[str, Any]) -> dict[str, Any] | bytes:
        op = req.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}
        if op == "cancel":
            task = self.rt.proxy.forward_cancel(int(req["pid"]), bytes.fromhex(req["secret"]))
            if task is not None:
                await task  # answered once the server has processed it
            return {"sent": task is not None}
        if op == "state":
            return self.state()
        if op == "reset":  # POST /api/reset on the supervisor
            if self.rt.profiler is not None:
                self.rt.profiler.reset(str(req.get("what", "all")))
            return {"reset": True}
        return {"error": f"unknown op {op!r}"}

    def state(self) -> bytes:
        """What the supervisor merges: state sections, sessions, backends, counters; encoded.

        This runs on the worker's event loop, between its sessions' callbacks, so it must be
        cheap however many fingerprints there are. Encoding the statistics section whole
        costs about 0.15 ms per fingerprint (0.7 s for 5,000, measured on the 2-core machine
        this was written on); so each entry's JSON is kept, and only the entries whose calls
        changed since the last question are encoded again. The supervisor puts the section
        back together (``statistics_entries``)."""
        rt, proxy, i = self.rt, self.rt.proxy, self.spec.index
        sections = {c.state_section: (c.state_version, c.to_state())
                    for c in rt.state_contributors() if not isinstance(c, StatisticsState)}
        entries: list[str] = []
        prof = rt.profiler
        if prof is not None:
            old, new = self._encoded, {}
            for key, e in prof.stats.entries.items():
                have = old.get(key)
                if have is None or have[0] is not e or have[1] != e.calls:
                    have = (e, e.calls, json.dumps(entry_to_state(e), separators=(",", ":"),
                                                   allow_nan=False))
                new[key] = have
                entries.append(have[2])
            self._encoded = new
            sections["statistics"] = (StatisticsState.state_version, {
                "evictions": prof.stats.evictions, "executions": prof.executions,
                "started_at": prof.started_at, "entries": []})
        head = json.dumps({
            "worker": i, "pid": os.getpid(),
            "sections": sections,
            "sessions": [{**s.describe(), "worker": i} for s in list(proxy.sessions.values())],
            "backends": rt.backends(),
            "accepting": proxy.accepting,
            "admitted": proxy.admitted,
            "rejected": dict(proxy.rejected),
            "timeouts": dict(proxy.timeouts),
            "reloads": rt.reloads,
            "pools": proxy.pools.describe() if proxy.pools is not None else [],
        }, separators=(",", ":"), allow_nan=False)
        return (head[:-1] + ',"statistics_entries":[' + ",".join(entries) + "]}").encode()

    async def _watch_parent(self) -> None:
        """A supervisor killed outright cannot stop its workers: they stop themselves."""
        while True:
            await asyncio.sleep(1.0)
            if os.getppid() != self.spec.parent_pid:
                log.warning("supervisor_gone", worker=self.spec.index)
                self.rt.request_stop()
                return

    async def run(self) -> None:
        await self.control.start()
        watch = asyncio.get_running_loop().create_task(self._watch_parent())
        try:
            await self.rt.serve_forever()
        finally:
            watch.cancel()
            await self.control.stop()
            self._leave_final()

    def _leave_final(self) -> None:
        """The statistics as of the drain's end, for the supervisor (written, then renamed,
        so that it never reads half a file)."""
        path = final_path(self.spec.rundir, self.spec.index)
        tmp = path + ".tmp"
        try:
            data = live_sections(self.rt.state_contributors())
            Path(tmp).write_text(json.dumps({"pid": os.getpid(), "sections": data},
                                            separators=(",", ":")))
            os.replace(tmp, path)
        except (OSError, ValueError) as exc:
            log.warning("worker_final_state_failed", error=f"{type(exc).__name__}: {exc}")


def worker_main(spec: WorkerSpec) -> None:
    """The worker process's entry point (``multiprocessing``, spawn)."""
    set_process_fields(worker=spec.index)
    try:
        worker = Worker(spec)
    except ConfigError as exc:
        configure_logging()
        log.error("worker_config_error", error=exc.message)
        raise SystemExit(EXIT_CONFIG) from None
    cfg = worker.rt.config
    configure_logging(cfg.log.format, cfg.log.level)
    install_uvloop()

    async def main() -> None:
        await worker.run()

    try:
        asyncio.run(main())
    except ConfigError as exc:
        log.error("worker_config_error", error=exc.message)
        raise SystemExit(EXIT_CONFIG) from None
