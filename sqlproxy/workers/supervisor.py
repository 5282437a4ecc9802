"""The main process with ``workers = N``: starts the workers, restarts the ones that die,
passes SIGTERM (drain) and SIGHUP (reload) on, and serves the admin API for all of them.

The listen port is reserved here first, on a socket with ``SO_REUSEPORT`` that never listens
(so a port of 0 becomes one real port that every worker binds, and the address stays ours
while a worker restarts); the workers bind it with ``SO_REUSEPORT`` too and the kernel spreads
new connections over their listening sockets.

Workers are started with ``multiprocessing``'s spawn method: a fresh interpreter, not a fork of
a process that runs an event loop, the admin server and threads.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlproxy.config import Config, load_config, parse_hostport
from sqlproxy.errors import ConfigError
from sqlproxy.logs import configure_logging, get_logger
from sqlproxy.workers.control import request, socket_path
from sqlproxy.workers.limits import SharedLimits
from sqlproxy.workers.worker import EXIT_CONFIG, WorkerSpec, final_path, worker_main

__all__ = ["Supervisor", "run_workers"]

log = get_logger("sqlproxy.workers")

START_TIMEOUT = 60.0  # a worker imports everything and binds: seconds to wait for its socket
RESTART_BACKOFF_MAX = 5.0


class WorkerSlot:
    """One worker index and its current process."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: Any = None  # multiprocessing.Process (spawn context)
        self.started_at = 0.0  # monotonic
        self.started_wall = 0.0  # Unix time
        self.last_exit: str | None = None  # how the previous process ended
        self.restarts = 0
        self.quick_deaths = 0  # consecutive deaths within a second of starting
        self.restart_at = 0.0  # when a restart is due (0: none pending)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.exitcode is None


class Supervisor:
    def __init__(self, config: Config, *, config_path: str | None = None,
                 overrides: dict[str, Any] | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.overrides = overrides or {}
        self.count = config.proxy.worker_count
        self.limits = SharedLimits(self.count)
        self.rundir = tempfile.mkdtemp(prefix="sqlproxy-workers-")
        self.slots = [WorkerSlot(i) for i in range(self.count)]
        self.host, self.port = parse_hostport(config.proxy.listen, "proxy.listen")
        self._reserved: socket.socket | None = None
        self._ctx = multiprocessing.get_context("spawn")
        self._stopping = False
        self._stop = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None
        self.on_exit: list[Any] = []  # callbacks (slot, pid) when a worker process ended
        # The merged statistics, the durable state and the admin API: here, for all workers.
        from sqlproxy.workers.merged import MergedWorkers

        self.merged = MergedWorkers(self, self._make_store if config.state.enabled else None)
        self.admin: Any = None
        if config.admin.enabled:
            from sqlproxy.admin.server import AdminServer

            self.admin = AdminServer(self.merged)
            self.admin.app = _refreshing(self.admin.app, self.merged)

    def _make_store(self, contributors: Any) -> Any:
        st = self.config.state
        period = lambda: self.config.state.snapshot_seconds  # noqa: E731 - live after reloads
        if st.url is None:
            from sqlproxy.statestore.sqlite import SqliteStore

            return SqliteStore(st.path, st.instance_id, contributors, period)
        from sqlproxy.statestore.postgres import PostgresStore

        return PostgresStore(st.url, st.instance_id, contributors, period,
                             window=st.fleet_window, timeout=st.timeout)

    # ------------------------------------------------------------------ the shared address
    def _reserve_port(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self._reserved = sock
        self.port = sock.getsockname()[1]

    @property
    def listen(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    # ------------------------------------------------------------------ processes
    def _spawn(self, slot: WorkerSlot) -> None:
        spec = WorkerSpec(index=slot.index, workers=self.count, config_path=self.config_path,
                          overrides=self.overrides, listen=self.listen, rundir=self.rundir,
                          limits=self.limits, parent_pid=os.getpid())
        proc = self._ctx.Process(target=worker_main, args=(spec,),
                                 name=f"sqlproxy-worker-{slot.index}", daemon=False)
        proc.start()
        slot.process = proc
        slot.started_at = time.monotonic()
        slot.started_wall = time.time()
        slot.restart_at = 0.0
        log.info("worker_started", worker=slot.index, pid=proc.pid, restarts=slot.restarts)

    async def _wait_ready(self, slot: WorkerSlot, timeout: float) -> None:
        """Until the worker answers on its control socket; raises if it exits first."""
        deadline = time.monotonic() + timeout
        path = socket_path(self.rundir, slot.index)
        while True:
            if not slot.alive:
                code = slot.process.exitcode if slot.process is not None else None
                if code == EXIT_CONFIG:
                    raise ConfigError(f"worker {slot.index} refused the configuration "
                                      "(its log names the key)")
                raise RuntimeError(f"worker {slot.index} exited with code {code} at start "
                                   "(see its log)")
            try:
                answer = await request(path, {"op": "ping"}, timeout=1.0)
                if answer.get("pid") == slot.pid:
                    return
            except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {slot.index} did not start within {timeout:g} s")
            await asyncio.sleep(0.05)

    async def start(self) -> None:
        if self.admin is not None:
            self.admin.check()  # an open admin address without a token: refused first
        from sqlproxy.proxy.tls import client_context

        client_context(self.config.tls)  # an unreadable certificate: named here, not N times
        self._reserve_port()
        await self.merged.start()  # restores the durable state before anything is counted
        for slot in self.slots:
            self._spawn(slot)
        try:
            await asyncio.gather(*(self._wait_ready(s, START_TIMEOUT) for s in self.slots))
            if self.admin is not None:
                await self.admin.start()
        except BaseException:
            await self._terminate_all(grace=2.0)
            await self.merged.stop()
            raise
        self._watch_task = asyncio.get_running_loop().create_task(self._watch())
        log.info("started", listen=self.listen, workers=self.count,
                 admin=f"{self.admin.host}:{self.admin.port}" if self.admin else None)

    async def _watch(self) -> None:
        """Restart workers that died (after a pause that grows while they die at once)."""
        while not self._stopping:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            for slot in self.slots:
                if self._stopping:
                    return
                proc = slot.process
                if proc is not None and proc.exitcode is not None and slot.restart_at == 0.0:
                    self._died(slot, proc, now)
                if slot.restart_at and now >= slot.restart_at:
                    slot.restarts += 1
                    self._spawn(slot)

    def _died(self, slot: WorkerSlot, proc: Any, now: float) -> None:
        code = proc.exitcode
        how = (f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}")
        slot.last_exit = how
        self.limits.clear(slot.index)  # its sessions died with it
        lived = now - slot.started_at
        slot.quick_deaths = slot.quick_deaths + 1 if lived < 1.0 else 0
        delay = min(RESTART_BACKOFF_MAX, 0.1 * (2 ** slot.quick_deaths)) \
            if slot.quick_deaths else 0.0
        log.error("worker_exited", worker=slot.index, pid=proc.pid, status=how,
                  lived_s=round(lived, 3), restart_in_s=round(delay, 3))
        for cb in list(self.on_exit):
            cb(slot, proc.pid)
        slot.restart_at = now + delay if delay else now

    def read_final(self, slot: WorkerSlot, pid: int) -> dict[str, Any] | None:
        """The sections a stopped worker left (None if it left none: killed)."""
        path = Path(final_path(self.rundir, slot.index))
        try:
            data = json.loads(path.read_text())
            path.unlink()
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("pid") != pid:
            return None
        sections = data.get("sections")
        return sections if isinstance(sections, dict) else None

    # ------------------------------------------------------------------ signals
    def reload(self) -> None:
        """SIGHUP: every worker reloads (they read the same file, environment and flags)."""
        try:
            new = load_config(self.config_path, self.overrides)
        except ConfigError as exc:
            log.error("config_reload_failed", error=exc.message, kept="previous configuration")
        else:
            if new.proxy.worker_count != self.count:
                log.warning("config_reload_needs_restart", keys=["proxy.workers"])
            self.config = new
        for slot in self.slots:
            if slot.alive:
                os.kill(slot.process.pid, signal.SIGHUP)
        log.info("workers_reloaded", workers=self.count)

    def request_stop(self) -> None:
        self._stop.set()

    async def _terminate_all(self, grace: float) -> None:
        self._stopping = True
        for slot in self.slots:
            if slot.alive:
                os.kill(slot.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(s.alive for s in self.slots) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for slot in self.slots:
            if slot.alive:
                log.warning("worker_killed", worker=slot.index, pid=slot.pid)
                slot.process.kill()
        for slot in self.slots:
            if slot.process is not None:
                await asyncio.to_thread(slot.process.join, 5.0)

    async def stop(self) -> None:
        """SIGTERM: every worker drains (``shutdown_grace_seconds``), then exits."""
        if self._watch_task is not None:
            self._stopping = True
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
        if self.admin is not None:
            await self.admin.stop()
        # Each worker drains within its grace period, then writes its last statistics.
        await self._terminate_all(self.config.proxy.shutdown_grace_seconds + 10.0)
        for slot in self.slots:
            if slot.process is not None:
                for cb in list(self.on_exit):
                    cb(slot, slot.process.pid)
        await self.merged.stop()  # the final snapshot holds every worker's final state
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None

    def cleanup(self) -> None:
        shutil.rmtree(self.rundir, ignore_errors=True)

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            await self.start()
            try:
                await self._stop.wait()
            finally:
                log.info("stopping")
                await self.stop()
        finally:
            self.cleanup()
        log.info("stopped")


def _refreshing(app: Any, merged: Any) -> Any:
    """The admin ASGI app, answering from the workers' state as of now (give or take
    ``MIN_REFRESH``): each HTTP request first refreshes the merged view. A reset the app
    accepted (``POST /api/reset``, 200) is passed on to every worker and to what the
    supervisor carries, or the next refresh would bring the statistics back."""
    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await app(scope, receive, send)
            return
        try:
            await merged.refresh()
        except Exception as exc:  # answer from the previous view rather than fail
            log.error("workers_refresh_failed", error=f"{type(exc).__name__}: {exc}")
        if scope.get("method") != "POST" or scope.get("path") != "/api/reset":
            await app(scope, receive, send)
            return
        answer: dict[str, Any] = {"status": 0, "body": b""}

        async def capture(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
            elif message["type"] == "http.response.body":
                answer["body"] += message.get("body", b"")
            await send(message)

        await app(scope, receive, capture)
        if answer["status"] == 200:
            try:
                what = json.loads(answer["body"])["reset"]
            except (ValueError, KeyError, TypeError):
                return
            await merged.reset(str(what))

    return wrapped


def run_workers(config: Config, *, config_path: str | None = None,
                overrides: dict[str, Any] | None = None) -> None:
    """``sqlproxy serve`` with ``proxy.workers`` above 1."""
    from sqlproxy.runtime import install_uvloop

    configure_logging(config.log.format, config.log.level)
    install_uvloop()

    async def main() -> None:
        sup = Supervisor(config, config_path=config_path, overrides=overrides)
        await sup.serve_forever()

    asyncio.run(main())
