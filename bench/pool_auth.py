"""A connection per transaction (``pgbench -C -S``) as a SCRAM user, through sqlproxy in
transaction mode with and without ``pool.auth_user``, and straight to PostgreSQL.

Without ``auth_user`` each client login goes through to the server on a fresh server
connection (the pool closes an idle one to make room): a server backend started per
transaction. With it the proxy checks the SCRAM proof itself and lends a pooled server. The
figures: TPS (pgbench's, including the reconnections) and the server sessions started
(``pg_stat_database.sessions``), medians of alternating rounds.

    .venv/bin/python -m bench.pool_auth --rounds 3 --seconds 10 --clients 8
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from bench.pgbench_compare import client_env, find_pgbench, find_sqlproxy  # noqa: E402
from tests.support import pg  # noqa: E402

DB = "authbench"
_TPS_RE = re.compile(r"tps = ([0-9.]+)")


def log(message: str) -> None:
    print(f"[pool-auth-bench] {message}", file=sys.stderr, flush=True)


def sessions(cluster: pg.PgCluster) -> int:
    return int(cluster.psql(f"SELECT sessions FROM pg_stat_database WHERE datname = '{DB}'"))


def start_proxy(primary: pg.PgCluster, size: int, auth_user: str, log_dir: Path,
                name: str) -> tuple[subprocess.Popen[bytes], int]:
    port = pg.free_port()
    env = client_env({"SQLPROXY_ADMIN__ENABLED": "false", "SQLPROXY_STATE__ENABLED": "false",
                      "SQLPROXY_LOG__LEVEL": "warning", "SQLPROXY_POOL__MODE": "transaction",
                      "SQLPROXY_POOL__SIZE": str(size), "SQLPROXY_POOL__AUTH_USER": auth_user})
    out = (log_dir / f"{name}.log").open("wb")
    proc = subprocess.Popen([find_sqlproxy(), "serve", "--listen", f"127.0.0.1:{port}",
                             "--primary", primary.dsn()], stdout=out, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    deadline = time.monotonic() + 30
    while subprocess.run([str(pg.find_pg_bindir() / "psql"), "-h", "127.0.0.1", "-p",
                          str(port), "-U", "postgres", "-d", DB, "-Atc", "select 1"],
                         env=client_env(), capture_output=True).returncode != 0:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"sqlproxy {name} did not start: see {log_dir}/{name}.log")
        time.sleep(0.2)
    return proc, port


def run(port: int, clients: int, seconds: int) -> float:
    user = pg.SCRAM_USER
    out = subprocess.run([find_pgbench(), "-C", "-S", "-n", "-c", str(clients), "-j", "2",
                          "-T", str(seconds), "-h", "127.0.0.1", "-p", str(port),
                          "-U", user.name, DB],
                         env=client_env({"PGPASSWORD": user.password}), capture_output=True,
                         text=True, timeout=seconds + 120)
    m = _TPS_RE.search(out.stdout)
    if out.returncode != 0 or m is None:
        raise RuntimeError(f"pgbench failed:\n{out.stdout}\n{out.stderr}")
    return float(m.group(1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--pool-size", type=int, default=8)
    args = ap.parse_args(argv)
    base = pg.make_base_dir()
    with tempfile.TemporaryDirectory(prefix="sqlproxy-pool-auth-") as tmp:
        logs = Path(tmp)
        primary = pg.start_primary(base)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            primary.psql(f"CREATE DATABASE {DB}")
            subprocess.run([find_pgbench(), "-i", "-s", "1", "-q", "-h", primary.host, "-p",
                            str(primary.port), "-U", "postgres", DB], env=client_env(),
                           check=True, capture_output=True)
            primary.psql(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {pg.SCRAM_USER.name}",
                         dbname=DB)
            targets = {"direct": primary.port}
            for name, auth_user in (("sqlproxy", ""), ("sqlproxy auth_user", "postgres")):
                proc, port = start_proxy(primary, args.pool_size, auth_user, logs, name)
                procs.append(proc)
                targets[name] = port
            tps: dict[str, list[float]] = {t: [] for t in targets}
            started: dict[str, list[float]] = {t: [] for t in targets}
            order = list(targets)
            for r in range(args.rounds):
                for name in order[r % len(order):] + order[: r % len(order)]:
                    before = sessions(primary)
                    t = run(targets[name], args.clients, args.seconds)
                    n = sessions(primary) - before
                    tps[name].append(t)
                    started[name].append(n)
                    log(f"round {r + 1} {name}: {t:.0f} tps, {n} server sessions started")
            print(f"pgbench -C -S -c {args.clients} -T {args.seconds}, SCRAM user, "
                  f"pool.size {args.pool_size}, medians of {args.rounds} rounds")
            print(f"{'target':<22}{'tps':>10}{'server sessions':>18}")
            for name in targets:
                print(f"{name:<22}{statistics.median(tps[name]):>10.0f}"
                      f"{statistics.median(started[name]):>18.0f}")
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(10)
            primary.stop()
            pg.remove_base_dir(base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
