"""Process runtime: the event loop, signals, the proxy and its companions, shutdown.

Signals: SIGTERM and SIGINT stop the process cleanly (stop accepting, drain sessions for up to
``proxy.shutdown_grace_seconds``, write a final state snapshot); SIGHUP reloads the
configuration from the same file, environment and command-line flags it was started with and
applies what can change live. An invalid new configuration is rejected as a whole: the old one
stays in force and the error, which names the key, is logged.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from sqlproxy import __version__
from sqlproxy.admin.server import AdminServer
from sqlproxy.analysis.profiler import Profiler
from sqlproxy.analysis.timefmt import iso
from sqlproxy.config import Config, load_config
from sqlproxy.errors import ConfigError
from sqlproxy.logs import get_logger
from sqlproxy.otel import SpanExporter
from sqlproxy.proxy.server import ProxyServer
from sqlproxy.routing.health import Router
from sqlproxy.state import StateContributor, profiler_contributors
from sqlproxy.statestore.base import StateStore, StoreStatus
from sqlproxy.statestore.fleet import FleetViews
from sqlproxy.statestore.sqlite import SqliteStore

log = get_logger("sqlproxy.runtime")

# Keys whose new value only takes effect after a restart: sockets already bound, components
# built once. A reload that changes them keeps the running value and says so.
RESTART_KEYS: tuple[tuple[str, str], ...] = (
    ("proxy", "listen"),
    ("proxy", "workers"),
    ("admin", "listen"),
    ("admin", "enabled"),
    ("analysis", "enabled"),
    ("state", "enabled"),
    ("state", "path"),
    ("state", "url"),
    ("state", "instance"),
    ("state", "fleet_window"),
    ("state", "timeout"),
    ("log", "format"),
    ("otel", "endpoint"),
    ("otel", "sample_ratio"),
    ("otel", "service_name"),
)

ReloadHook = Callable[[Config, Config], None]


# Allocations of tracked objects between two collections of the youngest generation.
YOUNG_COLLECTION = 20_000


class Runtime:
    """Everything one sqlproxy process runs, started and stopped together."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: str | None = None,
        overrides: dict[str, Any] | None = None,
        environ: dict[str, str] | None = None,
        adjust: Callable[[Config], Config] | None = None,
    ) -> None:
        self.config = config
        self.adjust = adjust  # applied to each configuration reloaded (a worker's share)
        # What the config was built from, so that SIGHUP can build it again.
        self.config_path = config_path
        self.overrides = overrides
        self.environ = environ
        self.profiler: Profiler | None = (
            Profiler(config.analysis, get_logger("sqlproxy.analysis"))
            if config.analysis.enabled else None
        )
        # One span per traced statement ([otel] endpoint); the SDK is imported only then.
        self.span_exporter: SpanExporter | None = None
        if config.otel.endpoint and self.profiler is not None:
            self.span_exporter = SpanExporter(config.otel)
            self.profiler.span_sink = self.span_exporter
        self.proxy = ProxyServer(config, self.profiler)
        # Read-replica routing (None when off): health, lag and counters for the admin API.
        self.router: Router | None = self.proxy.router
        self.store: StateStore | None = self._make_store() if config.state.enabled else None
        self.fleet: FleetViews | None = (
            FleetViews(self.store, config.state.instance_id, lambda: self.config.analysis)
            if self.store is not None else None)
        # Components started elsewhere (routing, admin) register here to see reloads.
        self.reload_hooks: list[ReloadHook] = []
        self.reloads = 0
        self.admin: AdminServer | None = AdminServer(self) if config.admin.enabled else None
        self._stop = asyncio.Event()
        self._started = False
        self.started_at = time.time()
        self._windows_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self.admin is not None:
            self.admin.check()  # refuse an open admin address without a token, before anything
        if self.store is not None:
            await self.store.restore()
        await self.proxy.start()
        if self.admin is not None:
            try:
                await self.admin.start()
            except BaseException:
                await self.proxy.stop()
                raise
        self._started = True
        # Everything built so far (modules, sqlglot's tables, config) lives as long as the
        # process: keep it out of the cyclic collector's full passes, which otherwise walk it
        # again and again while sessions allocate per statement.
        gc.freeze()
        # A young collection once YOUNG_COLLECTION more tracked objects live than at the last
        # one, rather than 700: steady traffic keeps adding some, and collecting every 700 of
        # them cost 7 % of the proxy's instructions per pooled transaction
        # (bench/callgrind.py). The older generations keep their thresholds.
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(YOUNG_COLLECTION, older, oldest)
        if self.store is not None:
            self.store.start()
        if self.profiler is not None:
            self._windows_task = asyncio.get_running_loop().create_task(self._windows_loop())
        log.info("started", listen=f"{self.proxy.host}:{self.proxy.port}")

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        if self._windows_task is not None:
            self._windows_task.cancel()
            await asyncio.gather(self._windows_task, return_exceptions=True)
            self._windows_task = None
        if self.admin is not None:
            await self.admin.stop()
        await self.proxy.stop(self.config.proxy.shutdown_grace_seconds)
        if self.profiler is not None:
            self.profiler.detector.traces.flush_all()  # requests still open are judged too
        if self.store is not None:
            await self.store.close()  # a final snapshot after the drain: the last sessions'
        if self.span_exporter is not None:
            await asyncio.to_thread(self.span_exporter.shutdown)  # sends the last batch
        log.info("stopped")

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def admin_port(self) -> int | None:
        """The admin API's bound port (useful with ``admin.listen = "127.0.0.1:0"``)."""
        return self.admin.port if self.admin is not None else None

    # ------------------------------------------------------------------ admin API view
    def backends(self) -> list[dict[str, Any]]:
        """The backends as /api/backends and /metrics show them: primary first, then replicas.

        Keys: ``name`` (the route label used in statistics: "primary", replica names),
        ``role`` ("primary" | "replica"), ``address``, ``healthy`` (reachable; None = not
        probed here — the admin's own probe fills it in for the primary), ``in_rotation``,
        ``lag_ms`` and ``lag_bytes`` (None when unknown), ``server_connections`` (open server
        connections), ``error`` (last probe error), ``checked_at`` (ISO 8601 or None). The
        admin adds ``routed`` from the statistics when absent.
        """
        primary = self.config.proxy.primary_url
        sessions = list(self.proxy.sessions.values())

        def pool(name: str) -> int:
            if name == "primary":  # a plain session's backend, or a routed one's primary link
                return sum(1 for s in sessions if getattr(s, "backend", None) is not None
                           or getattr(s, "primary_link", None) is not None)
            return sum(1 for s in sessions if name in getattr(s, "links", {}))

        router = self.router
        probed = router is not None and router.cycle_started > 0
        out: list[dict[str, Any]] = [{
            "name": "primary", "role": "primary", "address": primary.address,
            "healthy": router.primary_up if router is not None and probed else None,
            "in_rotation": True, "lag_ms": 0.0, "lag_bytes": 0,
            "server_connections": pool("primary"),
            "error": router.primary_error if router is not None else None, "checked_at": None,
        }]
        if router is None:
            return out
        if self.profiler is None:  # no statistics to count routes from: the router's counts
            out[0]["routed"] = router.primary_routed
        # Routing decisions: read-only units sent to the primary for want of a replica, and
        # sessions pinned to the primary for good (temp tables, LISTEN, ...).
        out[0]["fallbacks"] = router.fallbacks
        out[0]["pinned_sessions"] = router.pinned_sessions
        for rep in router.replicas:
            item: dict[str, Any] = {
                "name": rep.name, "role": "replica", "address": rep.url.address,
                "healthy": rep.up if rep.last_probe else None,
                "in_rotation": rep.healthy,
                "lag_ms": rep.lag_ms,
                "lag_bytes": (max(0, router.primary_lsn - rep.replay_lsn)
                              if router.primary_lsn and rep.replay_lsn else None),
                "server_connections": pool(rep.name),
                "error": rep.last_error,
                "checked_at": iso(rep.last_probe) if rep.last_probe else None,
                "outstanding": rep.outstanding,
                "retried": rep.retried,  # statements re-run on the primary after failing here
                "failures": rep.failures,
            }
            if self.profiler is None:
                item["routed"] = rep.routed
            out.append(item)
        return out

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.start()
        try:
            await self._stop.wait()
        finally:
            log.info("stopping")
            await self.stop()

    # ------------------------------------------------------------------ durable state
    def state_contributors(self) -> list[StateContributor]:
        return profiler_contributors(self.profiler) if self.profiler is not None else []

    def _make_store(self) -> StateStore:
        st = self.config.state
        period = lambda: self.config.state.snapshot_seconds  # noqa: E731 - live after reloads
        if st.url is None:
            return SqliteStore(st.path, st.instance_id, self.state_contributors, period)
        from sqlproxy.statestore.postgres import PostgresStore

        return PostgresStore(st.url, st.instance_id, self.state_contributors, period,
                             window=st.fleet_window, timeout=st.timeout)

    async def snapshot(self) -> bool:
        """Write a state snapshot now; False (and an error logged) if it could not be written."""
        return await self.store.snapshot() if self.store is not None else False

    def state_status(self) -> StoreStatus | None:
        return self.store.status() if self.store is not None else None

    # ------------------------------------------------------------------ the fleet
    async def fleet_profiler(self) -> Profiler | None:
        """The statistics of every instance in the fleet merged (``scope=fleet``), as of their
        last snapshots; this instance's live ones when it has no fleet."""
        view = await self.fleet.view() if self.fleet is not None else None
        return view if view is not None else self.profiler

    def workers(self) -> list[dict[str, Any]]:
        """This process, the only worker with ``workers = 1``."""
        proxy = self.proxy
        return [{"worker": 0, "pid": os.getpid(), "alive": True, "restarts": 0,
                 "started_at": self.started_at, "last_exit": None,
                 "sessions": len(proxy.sessions), "rejected": dict(proxy.rejected),
                 "timeouts": dict(proxy.timeouts)}]

    def fleet_instances(self) -> list[dict[str, Any]]:
        """This instance and the others in the fleet view."""
        status = self.state_status()
        me: dict[str, Any] = {
            "instance": self.config.state.instance_id, "local": True, "sqlproxy": __version__,
            "snapshot_seconds": self.config.state.snapshot_seconds,
            "last_snapshot": status.to_dict()["last_snapshot"] if status else None,
            "age_s": None,
        }
        others = self.store.others() if self.store is not None else []
        return [me, *({
            "instance": o.instance, "local": False, "sqlproxy": o.sqlproxy,
            "snapshot_seconds": o.snapshot_seconds, "last_snapshot": iso(o.written_at),
            "age_s": round(o.age_s, 3),
        } for o in sorted(others, key=lambda o: o.instance))]

    async def _windows_loop(self) -> None:
        """Close a regression window every analysis.window_s (on the loop: the statistics are
        read where they are written)."""
        assert self.profiler is not None
        self.profiler.tick_windows()  # begins the first window
        while True:
            await asyncio.sleep(self.config.analysis.window_s)
            try:
                self.profiler.tick_windows()
            except Exception as exc:  # a bug here must not stop the windows for good
                log.error("windows_tick_failed", error=f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ reload (SIGHUP)
    def reload(self) -> bool:
        """Re-read the configuration and apply what can change live. Never raises."""
        try:
            new = load_config(self.config_path, self.overrides, self.environ)
        except ConfigError as exc:
            log.error("config_reload_failed", error=exc.message, kept="previous configuration")
            return False
        if self.adjust is not None:
            new = self.adjust(new)
        old = self.config
        kept = []
        for section, key in RESTART_KEYS:
            if getattr(getattr(new, section), key) != getattr(getattr(old, section), key):
                kept.append(f"{section}.{key}")
                sect = getattr(new, section).model_copy(
                    update={key: getattr(getattr(old, section), key)})
                new = new.model_copy(update={section: sect})
        changed = _changed_keys(old, new)
        try:
            self.proxy.reconfigure(new)  # first: it may refuse (e.g. unreadable certificate)
        except ConfigError as exc:
            log.error("config_reload_failed", error=exc.message, kept="previous configuration")
            return False
        self.config = new
        if new.log.level != old.log.level:
            from sqlproxy.logs import configure_logging

            configure_logging(new.log.format, new.log.level)
        if self.profiler is not None:
            self.profiler.configure(new.analysis)
        for hook in list(self.reload_hooks):
            try:
                hook(old, new)
            except Exception as exc:  # one component's failure must not undo the others
                log.error("config_reload_hook_failed", hook=getattr(hook, "__qualname__", "?"),
                          error=f"{type(exc).__name__}: {exc}")
        self.reloads += 1
        if kept:
            log.warning("config_reload_needs_restart", keys=kept)
        log.info("config_reloaded", changed=changed)
        return True


def _changed_keys(old: Config, new: Config) -> list[str]:
    a = old.model_dump()
    b = new.model_dump()
    out = []
    for section in b:
        if isinstance(b[section], dict) and isinstance(a.get(section), dict):
            out += [f"{section}.{k}" for k in b[section] if b[section][k] != a[section].get(k)]
        elif b[section] != a.get(section):
            out.append(section)
    return out


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run(
    config: Config,
    *,
    config_path: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> None:
    install_uvloop()
    runtime_holder: list[Runtime] = []

    async def main() -> None:
        rt = Runtime(config, config_path=config_path, overrides=overrides)
        runtime_holder.append(rt)
        await rt.serve_forever()

    asyncio.run(main())
