"""``sqlproxy demo``: throwaway PostgreSQL primary and replica, sqlproxy in front with routing
and the admin API, a small application workload through it, and a report in the terminal.

Everything started here is stopped and removed on exit (Ctrl-C, or ``--exit`` after the
report).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
from pathlib import Path
from typing import Any

from sqlproxy import devcluster, extras
from sqlproxy.config import Config

__all__ = ["run_demo"]

DEMO_DATABASE = "league"
DEMO_APPLICATION = "league-site"
#: The second sqlproxy, in transaction pooling mode, and what runs through it.
POOL_SIZE = 4
WEB_APPLICATION = "league-web"
CRON_APPLICATION = "league-cron"


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def listen_address(address: str | None, default_port: int) -> str:
    if address:
        host, _, given = address.rpartition(":")
        if given == "0":  # any free port: chosen here, so that the report can name it
            return f"{host}:{devcluster.free_port()}"
        return address
    port = default_port if _port_free("127.0.0.1", default_port) else devcluster.free_port()
    return f"127.0.0.1:{port}"


def demo_config(primary: devcluster.PgCluster, replica: devcluster.PgCluster | None,
                listen: str, admin: str, state_dir: Path) -> Config:
    return Config.model_validate({
        "proxy": {"listen": listen, "primary": primary.dsn()},
        "routing": {"enabled": replica is not None},
        "replicas": [{"url": replica.dsn(), "name": "replica1"}] if replica else [],
        "admin": {"listen": admin},
        # Seconds, not minutes, for a demo: a sequential scan of 400,000 rows counts as slow.
        "analysis": {"slow_query_ms": 20.0},
        "state": {"enabled": False, "path": str(state_dir / "state.sqlite")},
        "log": {"level": "error"},
    })


def pool_config(primary: devcluster.PgCluster, listen: str, admin: str,
                state_dir: Path) -> Config:
    """A second sqlproxy in front of the primary that pools server connections per transaction
    (primary only: the demo's routing is shown by the first one)."""
    return Config.model_validate({
        "proxy": {"listen": listen, "primary": primary.dsn()},
        "pool": {"mode": "transaction", "size": POOL_SIZE},
        "admin": {"listen": admin},
        "state": {"enabled": False, "path": str(state_dir / "pool-state.sqlite")},
        "log": {"level": "error"},
    })


async def _run(args: Any) -> int:
    from rich.console import Console

    from sqlproxy.demo.report import print_pool_report, print_report
    from sqlproxy.runtime import Runtime

    # Tables need room: at least 120 columns, also when the output is not a terminal.
    probe = Console()
    console = Console(width=max(probe.width, 120) if probe.is_terminal else 120)
    try:
        bindir = devcluster.find_pg_bindir()
    except devcluster.PgNotInstalledError as exc:
        console.print(f"[red]sqlproxy demo:[/red] {exc}")
        return 1
    base = devcluster.make_base_dir()
    primary: devcluster.PgCluster | None = None
    replica: devcluster.PgCluster | None = None
    runtime: Runtime | None = None
    pooler: Runtime | None = None
    try:
        with console.status("starting a throwaway PostgreSQL primary and streaming replica"):
            primary = await asyncio.to_thread(devcluster.start_primary, base, bindir=bindir)
            await asyncio.to_thread(primary.psql, f"CREATE DATABASE {DEMO_DATABASE}")
            if not args.no_replica:
                replica = await asyncio.to_thread(devcluster.start_replica, primary, base)
        console.print(f"PostgreSQL {primary.psql('SHOW server_version')}: primary "
                      f"{primary.host}:{primary.port}"
                      + (f", replica {replica.host}:{replica.port}" if replica else ""))
        cfg = demo_config(primary, replica, listen_address(args.listen, 6432),
                          listen_address(args.admin, 8080), base)
        from sqlproxy.logs import configure_logging

        configure_logging(cfg.log.format, cfg.log.level)
        runtime = Runtime(cfg)
        await runtime.start()
        host, port = cfg.proxy.listen.rsplit(":", 1)
        url = f"postgresql://postgres@{host}:{port}/{DEMO_DATABASE}"
        console.print(f"sqlproxy listening on {cfg.proxy.listen} (routing "
                      f"{'on' if replica else 'off'}), admin on http://{cfg.admin.listen}/")
        fallbacks_before = await _workload(console, url, replica, runtime)
        print_report(console, runtime, cfg, DEMO_DATABASE, fallbacks_before)
        pool_cfg = pool_config(primary, f"127.0.0.1:{devcluster.free_port()}",
                               f"127.0.0.1:{devcluster.free_port()}", base)
        pooler = Runtime(pool_cfg)
        await pooler.start()
        pool_url = f"postgresql://postgres@{pool_cfg.proxy.listen}/{DEMO_DATABASE}"
        await _pool_workload(console, pool_url, pool_cfg)
        print_pool_report(console, pooler, pool_cfg)
        from sqlproxy.demo.cache import cache_scene

        await cache_scene(console, primary.dsn(), DEMO_DATABASE)
        console.print(f"\nDashboard: [bold]http://{cfg.admin.listen}/[/bold]    "
                      f"psql: [bold]psql {url}[/bold]\n"
                      f"Pooled: [bold]http://{pool_cfg.admin.listen}/[/bold] "
                      f"(/api/pools)    psql: [bold]psql {pool_url}[/bold]")
        if not args.exit:
            console.print("Serving until Ctrl-C.")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            import signal

            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        return 0
    finally:
        with console.status("stopping and removing everything the demo started"):
            for rt in (pooler, runtime):
                if rt is not None:
                    with contextlib.suppress(Exception):
                        await rt.stop()
            for cluster in (replica, primary):
                if cluster is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.to_thread(cluster.stop)
            devcluster.remove_base_dir(base)


async def _workload(console: Any, url: str, replica: devcluster.PgCluster | None,
                    runtime: Any) -> int:
    """Seed the database, then run the scenes; returns the router's fallback count at the
    start of the scenes (the report counts only the scenes' own)."""
    from rich.progress import Progress

    from sqlproxy.demo import workload

    engine = workload.make_engine(url, DEMO_APPLICATION)
    try:
        with Progress(console=console, transient=False) as progress:
            task = progress.add_task("loading the league", total=len(workload.SCENES) + 1)
            await workload.setup_schema(engine)
            if replica is not None:
                await asyncio.to_thread(replica.wait_for_replay)
                await _router_caught_up(runtime)
            # The report is about the application's requests, not the seeding above.
            if runtime.profiler is not None:
                runtime.profiler.reset()
            fallbacks_before = runtime.router.fallbacks if runtime.router is not None else 0
            progress.advance(task)
            await workload.run_scenes(
                engine,
                on_scene=lambda scene: progress.update(task, description=scene.title),
                on_done=lambda scene: progress.advance(task),
            )
            progress.update(task, description="workload done")
    finally:
        await engine.dispose()
    await asyncio.sleep(0.2)
    return fallbacks_before


async def _pool_workload(console: Any, url: str, cfg: Config) -> None:
    from sqlproxy.demo import workload

    console.print(f"\nA second sqlproxy pools server connections per transaction "
                  f'(pool.mode = "transaction", pool.size = {cfg.pool.size}) on '
                  f"{cfg.proxy.listen}: the league site's web tier ({workload.WEB_WORKERS} "
                  f"workers, each with a SQLAlchemy pool of {workload.WEB_POOL_SIZE}) and a job "
                  f"that connects once per run ({workload.CRON_RUNS} runs) go through it.")
    with console.status("the web tier and the job, through the transaction pool"):
        await workload.web_tier(url, WEB_APPLICATION)
        await workload.connect_per_run(url, CRON_APPLICATION)
    await asyncio.sleep(0.2)  # the last clients' departures reach the pool


async def _router_caught_up(runtime: Any, timeout: float = 10.0) -> None:
    """Wait until the router has seen a replica replay everything written so far.

    The seeding connection is in the application's pool: read-your-writes would keep its first
    reads on the primary until the router's next probes show a replica past the seed (which
    a real application, whose last write is older, would not notice)."""
    from sqlproxy.routing.health import caught_up

    router = runtime.router
    if router is None:
        return
    target = router.horizon()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lsn = router.lsn_after(target)
        if lsn is not None and any(r.healthy and caught_up(r.replay_lsn, lsn)
                                   for r in router.replicas):
            return
        await asyncio.sleep(0.05)


def run_demo(args: Any) -> int:
    from sqlproxy.runtime import install_uvloop

    # Before any cluster starts: installed without the demo extra, the application's imports
    # would fail only after the servers are up (MissingExtra: one line from the CLI, status 2).
    extras.require("demo", "the demo")
    install_uvloop()
    started = time.monotonic()
    try:
        code = asyncio.run(_run(args))
    except KeyboardInterrupt:
        code = 130
    except devcluster.PgHarnessError as exc:
        print(f"sqlproxy demo: {exc}", file=sys.stderr)
        code = 1
    if args.exit:
        print(f"demo finished in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return code
