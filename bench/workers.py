"""pgbench -S through sqlproxy with ``workers = 1`` and ``workers = 2`` (profiling on), in
alternating rounds, with the proxy's CPU per transaction and per worker; then the proxy memory
per idle session, measured from outside (the RSS of every sqlproxy process).

Starts a throwaway PostgreSQL primary (tests/support/pg.py) and both proxies as real
``sqlproxy serve`` processes. CPU is read from /proc for the whole process tree (supervisor and
workers) before and after each pgbench run; "per worker" is each worker process's share.

    .venv/bin/python -m bench.workers                      # 5 rounds x 10 s, 8 clients
    .venv/bin/python -m bench.workers --rounds 3 --seconds 5 --sessions 1000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from bench.pgbench_compare import (  # noqa: E402
    DB_NAME,
    DB_USER,
    LOOPBACK,
    Service,
    client_env,
    cpu_by_pid,
    find_pgbench,
    find_sqlproxy,
    tree,
    wait_accepting,
)
from tests.support import pg  # noqa: E402


def rss_kib(pid: int) -> int:
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def pgbench(pgbench_bin: str, port: int, mode: str, clients: int, jobs: int,
            seconds: int) -> tuple[float, int]:
    out = subprocess.run(
        [pgbench_bin, "-h", LOOPBACK, "-p", str(port), "-U", DB_USER, "-S", "-M", mode,
         "-c", str(clients), "-j", str(jobs), "-T", str(seconds), "-n", DB_NAME],
        capture_output=True, text=True, env=client_env(), timeout=seconds + 120, check=True,
    ).stdout
    tps = float(out.split("tps = ", 1)[1].split()[0])
    tx = int(out.split("number of transactions actually processed: ", 1)[1].split()[0])
    return tps, tx


async def idle_sessions(port: int, n: int, pid: int) -> dict[str, Any]:
    import asyncpg

    await asyncio.sleep(1.0)
    before = rss_kib(pid)
    conns = []
    for i in range(0, n, 50):
        conns += await asyncio.gather(*(asyncpg.connect(
            f"postgresql://{DB_USER}@{LOOPBACK}:{port}/{DB_NAME}", statement_cache_size=0)
            for _ in range(min(50, n - i))))
    for c in conns[:: max(1, n // 100)]:
        await c.fetchval("select 1")
    await asyncio.sleep(2.0)
    after = rss_kib(pid)
    for c in conns:
        await c.close()
    return {"sessions": n, "rss_before_kib": before, "rss_after_kib": after,
            "kib_per_session": round((after - before) / n, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--mode", default="prepared")
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--sessions", type=int, default=1000, help="idle sessions (0: skip)")
    args = ap.parse_args()
    pgbench_bin, sqlproxy = find_pgbench(), find_sqlproxy()
    psql = str(pg.find_pg_bindir() / "psql")
    base = pg.make_base_dir()
    primary = pg.start_primary(base)
    services: dict[int, tuple[Service, int]] = {}
    try:
        subprocess.run([pgbench_bin, "-i", "-q", "-s", str(args.scale), "-h", primary.host,
                        "-p", str(primary.port), "-U", DB_USER, DB_NAME],
                       capture_output=True, env=client_env(), check=True, timeout=1800)
        for workers in (1, 2):
            port = pg.free_port(LOOPBACK)
            env = client_env({
                "SQLPROXY_ANALYSIS__ENABLED": "true", "SQLPROXY_STATE__ENABLED": "false",
                "SQLPROXY_ADMIN__ENABLED": "false",
                "SQLPROXY_PROXY__SHUTDOWN_GRACE_SECONDS": "1",
                "SQLPROXY_PROXY__WORKERS": str(workers),
                "SQLPROXY_PROXY__MAX_CLIENT_CONNECTIONS": "20000"})
            svc = Service(f"sqlproxy-w{workers}",
                          [sqlproxy, "serve", "--listen", f"{LOOPBACK}:{port}", "--primary",
                           primary.dsn(DB_USER, dbname=DB_NAME)],
                          log_path=base / f"w{workers}.log", env=env, cwd=base)
            svc.start()
            wait_accepting(psql, LOOPBACK, port, svc)
            services[workers] = (svc, port)
        print(f"pgbench -S -M {args.mode} -c {args.clients} -j {args.jobs} -T {args.seconds}, "
              f"scale {args.scale}, {args.rounds} rounds alternating; profiling on")
        results: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
        for r in range(args.rounds):
            order = (1, 2) if r % 2 == 0 else (2, 1)
            for workers in order:
                svc, port = services[workers]
                before = cpu_by_pid(svc.pid)
                t0 = time.monotonic()
                tps, tx = pgbench(pgbench_bin, port, args.mode, args.clients, args.jobs,
                                  args.seconds)
                wall = time.monotonic() - t0
                after = cpu_by_pid(svc.pid)
                used = {p: after[p] - before.get(p, 0.0) for p in after}
                total = sum(used.values())
                # Workers are the busy processes; the supervisor (svc.pid) is idle here.
                per_proc = sorted((v for p, v in used.items() if p != svc.pid or workers == 1),
                                  reverse=True)[:workers]
                res = {"round": r, "tps": tps, "tx": tx,
                       "cpu_us_per_tx": total * 1e6 / tx,
                       "worker_cpu_pct": [round(100 * v / wall, 1) for v in per_proc],
                       "supervisor_cpu_s": round(used.get(svc.pid, 0.0), 3) if workers > 1
                       else None}
                results[workers].append(res)
                print(f"  round {r} workers={workers}: {tps:9.1f} tps  proxy CPU "
                      f"{res['cpu_us_per_tx']:6.1f} us/tx  per worker % of a core "
                      f"{res['worker_cpu_pct']}", flush=True)
        for workers in (1, 2):
            rs = results[workers]
            print(f"workers={workers}: median {statistics.median(r['tps'] for r in rs):.1f} tps, "
                  f"median proxy CPU {statistics.median(r['cpu_us_per_tx'] for r in rs):.1f} "
                  "us/tx")
        ratios = [b["tps"] / a["tps"] for a, b in zip(results[1], results[2], strict=True)]
        print(f"tps workers=2 / workers=1 per round: {' '.join(f'{x:.3f}' for x in ratios)} "
              f"(median {statistics.median(ratios):.3f})")
        if args.sessions:
            for workers in (1, 2):
                svc, port = services[workers]
                m = asyncio.run(idle_sessions(port, args.sessions, svc.pid))
                print(f"idle sessions workers={workers}: {m}", flush=True)
    finally:
        for svc, _ in services.values():
            svc.stop()
        primary.stop()
        pg.remove_base_dir(base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
