"""pgbench through sqlproxy with read routing on: how the load splits between primary and replica.

Starts a throwaway primary and a streaming replica (tests/support/pg.py), loads pgbench data,
and runs sqlproxy twice as a real process — routing off, and routing on with the replica — then,
for each protocol mode and workload, runs pgbench straight at the primary and through both
proxies. For every run it prints the throughput and where the statements ran, measured on the
servers themselves: the ``pg_stat_statements`` calls of statements on ``pgbench_accounts`` and
the ``pg_stat_database.xact_commit`` delta of each server.

Workloads: ``select-only`` (``pgbench -S``: every transaction is one point select) and ``mixed``
(``select-only@9 simple-update@1``: one transaction in ten is a write block, after which that
session's reads stay on the primary until the replica has replayed it — read-your-writes).

Run from the repository root::

    .venv/bin/python -m bench.routing                     # 3 rounds x 10 s per run, ~8 min
    .venv/bin/python bench/routing.py --seconds 3 --modes simple --workloads select-only
    .venv/bin/python -m bench.routing --pool-mode transaction --clients 50   # pooled, routed

Figures, never pass/fail: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from bench.pgbench_compare import (  # noqa: E402
    Service,
    _chown_to,
    client_env,
    find_pgbench,
    find_pgbouncer,
    find_sqlproxy,
    wait_accepting,
)
from sqlproxy.devcluster import server_os_user  # noqa: E402
from tests.support import pg  # noqa: E402

LOOPBACK = "127.0.0.1"
DB = "postgres"
WORKLOADS = {
    "select-only": ["-b", "select-only"],
    "mixed": ["-b", "select-only@9", "-b", "simple-update@1"],
}
_TPS_RE = re.compile(r"tps = ([0-9.]+) \((?:without initial connection time|excluding)")
_STATS_SQL = (
    "SELECT (SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
    "WHERE query LIKE '%pgbench_accounts%' AND query NOT LIKE '%pg_stat_statements%'),"
    f" (SELECT xact_commit FROM pg_stat_database WHERE datname = '{DB}')"
)


def log(message: str) -> None:
    print(f"[routing-bench] {message}", file=sys.stderr, flush=True)


@dataclass
class Counters:
    calls: int
    commits: int


def counters(cluster: pg.PgCluster) -> Counters:
    calls, commits = cluster.psql(_STATS_SQL).split("|")
    return Counters(int(calls), int(commits))


@dataclass
class Run:
    mode: str
    workload: str
    target: str
    tps: float | None
    primary: Counters
    replica: Counters

    @property
    def replica_share(self) -> float | None:
        total = self.primary.calls + self.replica.calls
        return self.replica.calls / total if total else None


class Proxy:
    """One sqlproxy process."""

    def __init__(self, name: str, primary: pg.PgCluster, replica: pg.PgCluster | None,
                 log_dir: Path, pool_mode: str = "session", pool_size: int = 20) -> None:
        self.name = name
        self.port = pg.free_port()
        env = client_env({
            "SQLPROXY_ADMIN__ENABLED": "false",
            "SQLPROXY_STATE__ENABLED": "false",
            "SQLPROXY_LOG__LEVEL": "warning",
            "SQLPROXY_ROUTING__ENABLED": "true" if replica is not None else "false",
            "SQLPROXY_POOL__MODE": pool_mode,
            "SQLPROXY_POOL__SIZE": str(pool_size),
        })
        cmd = [find_sqlproxy(), "serve", "--listen", f"{LOOPBACK}:{self.port}",
               "--primary", primary.dsn()]
        if replica is not None:
            cmd += ["--replica", replica.dsn()]
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def pgbench(port: int, mode: str, workload: str, seconds: int, clients: int) -> float | None:
    cmd = [find_pgbench(), "-n", "-M", mode, *WORKLOADS[workload], "-c", str(clients),
           "-j", "2", "-T", str(seconds), "-h", LOOPBACK, "-p", str(port), "-U", pg.SUPERUSER,
           DB]
    result = subprocess.run(cmd, capture_output=True, text=True, env=client_env(),
                            timeout=seconds + 120, check=False)
    if result.returncode != 0:
        log(f"pgbench failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    m = _TPS_RE.search(result.stdout)
    return float(m.group(1)) if m else None


def measure(target: str, port: int, mode: str, workload: str, seconds: int, clients: int,
            primary: pg.PgCluster, replica: pg.PgCluster) -> Run:
    replica.wait_for_replay()
    p0, r0 = counters(primary), counters(replica)
    tps = pgbench(port, mode, workload, seconds, clients)
    p1, r1 = counters(primary), counters(replica)
    return Run(mode, workload, target, tps, Counters(p1.calls - p0.calls, p1.commits - p0.commits),
               Counters(r1.calls - r0.calls, r1.commits - r0.commits))


def report(runs: Sequence[Run]) -> str:
    head = (f"{'mode':<9} {'workload':<12} {'target':<20} {'tps':>9} "
            f"{'primary calls':>14} {'replica calls':>14} {'replica share':>14} "
            f"{'primary xacts':>14} {'replica xacts':>14}")
    lines = [head, "-" * len(head)]
    for r in runs:
        share = f"{r.replica_share * 100:.1f}%" if r.replica_share is not None else "-"
        tps = f"{r.tps:.0f}" if r.tps is not None else "failed"
        lines.append(f"{r.mode:<9} {r.workload:<12} {r.target:<20} {tps:>9} "
                     f"{r.primary.calls:>14} {r.replica.calls:>14} {share:>14} "
                     f"{r.primary.commits:>14} {r.replica.commits:>14}")
    return "\n".join(lines)


def start_pgbouncer(primary: pg.PgCluster, base: Path, clients: int, pool_mode: str = "session",
                    pool_size: int = 20) -> tuple[Service, int]:
    """PgBouncer in front of the primary (``pool_mode``, as the proxies), run as the servers'
    OS user."""
    os_user = server_os_user()
    work = base / "pgbouncer"
    work.mkdir(exist_ok=True)
    _chown_to(work, os_user, 0o700)
    port = pg.free_port()
    userlist, ini = work / "userlist.txt", work / "pgbouncer.ini"
    userlist.write_text(f'"{pg.SUPERUSER}" ""\n')
    ini.write_text(
        "[databases]\n"
        f"* = host={primary.host} port={primary.port}\n"
        "\n[pgbouncer]\n"
        f"listen_addr = {LOOPBACK}\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {userlist}\npool_mode = {pool_mode}\n"
        f"max_client_conn = 1000\ndefault_pool_size = "
        f"{pool_size if pool_mode == 'transaction' else max(2 * clients, 20)}\n"
        "ignore_startup_parameters = extra_float_digits\n"
        f"logfile = {work / 'pgbouncer.log'}\n")
    for path in (userlist, ini):
        _chown_to(path, os_user, 0o600)
    service = Service("pgbouncer", [find_pgbouncer(install=True), str(ini)],
                      log_path=base / "pgbouncer.stderr.log", env=client_env(), cwd=work,
                      os_user=os_user)
    service.start()
    return service, port


def ratios(runs: Sequence[Run], modes: Sequence[str], workloads: Sequence[str],
           names: Sequence[str]) -> str:
    """Medians over rounds: each target's TPS, and routing on against routing off and
    PgBouncer (ratios taken within each round, then the median)."""
    lines = ["medians over rounds (ratios per round, then the median):"]
    for mode in modes:
        for workload in workloads:
            by: dict[str, list[float | None]] = {n: [r.tps for r in runs if r.mode == mode
                                                      and r.workload == workload
                                                      and r.target == n] for n in names}
            parts = [f"{n} {_median(by[n]) or 0:.0f}" for n in names]
            for num, den in (("sqlproxy routing on", "sqlproxy routing off"),
                             ("sqlproxy routing on", "pgbouncer"),
                             ("sqlproxy routing on", "direct (replica)"),
                             ("direct (replica)", "direct (primary)")):
                if num in by and den in by:
                    per_round = [a / b for a, b in zip(by[num], by[den], strict=True)
                                 if a and b]
                    parts.append(f"{_short(num)}/{_short(den)} {_median(per_round) or 0:.3f}")
            lines.append(f"  {mode:<9} {workload:<12} " + ", ".join(parts))
    return "\n".join(lines)


def _short(target: str) -> str:
    return {"sqlproxy routing on": "on", "sqlproxy routing off": "off",
            "direct (replica)": "replica", "direct (primary)": "primary"}.get(target, target)


def _median(values: Sequence[float | None]) -> float | None:
    vals = sorted(v for v in values if v)
    return statistics.median(vals) if vals else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="per pgbench run (default 10)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds over the targets (default 3)")
    parser.add_argument("--clients", type=int, default=8, help="pgbench -c (default 8)")
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i -s (default 10)")
    parser.add_argument("--modes", default="simple,prepared", help="pgbench -M modes")
    parser.add_argument("--workloads", default="select-only,mixed",
                        help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--pool-mode", choices=("session", "transaction"), default="session",
                        help="sqlproxy's pool.mode and PgBouncer's pool_mode (default session)")
    parser.add_argument("--pool-size", type=int, default=20,
                        help="server connections per pool in transaction mode (default 20)")
    parser.add_argument("--no-pgbouncer", action="store_true",
                        help="leave PgBouncer out (it is installed from Debian if missing)")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    workloads = [w for w in args.workloads.split(",") if w]
    for w in workloads:
        if w not in WORKLOADS:
            parser.error(f"unknown workload {w!r}")

    base = pg.make_base_dir()
    proxies: list[Proxy] = []
    bouncer: Service | None = None
    try:
        log("starting primary and replica")
        primary = pg.start_primary(base)
        subprocess.run([find_pgbench(), "-i", "-q", "-s", str(args.scale), "-h", primary.host,
                        "-p", str(primary.port), "-U", pg.SUPERUSER, DB],
                       capture_output=True, check=True, env=client_env())
        replica = pg.start_replica(primary, base)
        off = Proxy("routing-off", primary, None, base, args.pool_mode, args.pool_size)
        proxies.append(off)  # registered at once: stopped in `finally` whatever follows
        on = Proxy("routing-on", primary, replica, base, args.pool_mode, args.pool_size)
        proxies.append(on)
        psql = str(primary.bindir / "psql")
        for p in proxies:
            wait_accepting(psql, LOOPBACK, p.port, None)
        targets = [("direct (primary)", primary.port), ("sqlproxy routing off", off.port),
                   ("sqlproxy routing on", on.port)]
        if set(workloads) == {"select-only"}:
            # What the replica itself serves: the ceiling of routed reads on this machine
            # (a hot standby answers reads more slowly than the primary).
            targets.append(("direct (replica)", replica.port))
        if not args.no_pgbouncer:
            bouncer, bport = start_pgbouncer(primary, base, args.clients, args.pool_mode,
                                             args.pool_size)
            wait_accepting(psql, LOOPBACK, bport, None)
            targets.append(("pgbouncer", bport))
        time.sleep(1.0)  # the router's first probes: replica in rotation
        runs: list[Run] = []
        for rnd in range(args.rounds):
            for mode in modes:
                for workload in workloads:
                    k = rnd % len(targets)  # alternate who goes first
                    for name, port in targets[k:] + targets[:k]:
                        log(f"round {rnd + 1} {mode} {workload}: {name}")
                        runs.append(measure(name, port, mode, workload, args.seconds,
                                            args.clients, primary, replica))
        cores = os.cpu_count()
        print(f"pgbench -c {args.clients} -j 2 -T {args.seconds}, scale {args.scale}, "
              f"{cores} cores, {args.rounds} alternating rounds; primary + 1 streaming replica "
              f"on the same machine; pool mode {args.pool_mode}"
              + (f" ({args.pool_size} server connections)"
                 if args.pool_mode == "transaction" else ""))
        print("calls: pg_stat_statements calls of statements on pgbench_accounts, per server")
        print(report(runs))
        print(ratios(runs, modes, workloads, [n for n, _ in targets]))
        return 0
    finally:
        for p in proxies:
            with contextlib.suppress(Exception):
                p.stop()
        if bouncer is not None:
            with contextlib.suppress(Exception):
                bouncer.stop()
        pg.remove_base_dir(base)


if __name__ == "__main__":
    sys.exit(main())
