"""Instructions per transaction spent in the sqlproxy process, counted by callgrind.

Throughput on a shared 2-core machine moves by 10-30 % from one run to the next (see
``pgbench_compare.py``), more than the cost of profiling itself. Instruction counts do not:
``valgrind --tool=callgrind`` counts what the proxy process executes in user space, the same
from run to run whatever else the machine does. This prints, per pgbench protocol mode, the
instructions per transaction of sqlproxy with profiling off and on, and their ratio.

What it does: starts a throwaway PostgreSQL primary and loads ``pgbench -i``; then, for each
mode and for profiling off and on, starts ``sqlproxy serve`` under callgrind, warms it up, and
runs ``pgbench -S -M <mode> -c 8 -t N`` twice, with N and 2N transactions per client, zeroing
the counters before and dumping them after each run. The difference between the two dumps
divided by the difference in transactions is the cost of one transaction: connection setup and
teardown, the same in both runs, cancel out.

Kernel time (the socket system calls, a large share of a proxy's CPU) is not counted: the
figures compare sqlproxy with itself, not with PgBouncer (``pgbench_compare.py`` does that).

Run from the repository root (valgrind must be installed; Debian: ``apt-get install
valgrind``)::

    .venv/bin/python -m bench.callgrind                     # both modes, about 4 minutes
    .venv/bin/python -m bench.callgrind --modes prepared --transactions 500
    .venv/bin/python -m bench.callgrind --keep /tmp/cg     # keep the dumps, per function
    .venv/bin/python -m bench.callgrind --tags              # statements with sqlcommenter tags
    .venv/bin/python -m bench.callgrind --routing           # routing off vs on (profiling on)
    .venv/bin/python -m bench.callgrind --pool --clients 50  # session vs transaction pooling

``--tags`` runs pgbench's select-only transaction from a script whose statement carries
sqlcommenter tags (route, controller, action): in ``-M simple`` with a traceparent whose trace
id changes every transaction (each text unique: one request per transaction), in the other
modes without one (pgbench would turn a variable in the comment into a parameter), as
Rails-style static tags on a prepared statement.

``--routing`` compares, with profiling on, sqlproxy with routing off and routing on in front of
a streaming replica of the primary (reads go to the replica): the instructions per *routed*
transaction, instead of profiling off against on.

``--pool`` compares, with profiling on, ``pool.mode = "session"`` (the direct relay) with
``pool.mode = "transaction"`` (``--pool-size`` server connections, default 20): the
instructions per *pooled* transaction (a checkout and a check-in each). Add ``--routing`` to
it for transaction pooling with a replica (reads pooled on the replica).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from bench.pgbench_compare import (  # noqa: E402
    DB_NAME,
    DB_USER,
    LOOPBACK,
    BenchError,
    Service,
    client_env,
    find_pgbench,
    parse_list,
    positive_int,
    wait_accepting,
)
from tests.support import pg  # noqa: E402

MODES = {"simple": "simple", "extended": "extended", "prepared": "prepared"}
_TAGS = "controller='accounts',action='show',route='/accounts/%3Aid'"
# The select-only transaction of pgbench -S, tagged. The trace id's last 10 hex digits are
# pgbench's random number (10 decimal digits are valid hex).
TAGGED_SCRIPTS = {
    "simple": "\\set aid random(1, 100000 * :scale)\n"
              "\\set tid random(1000000000, 9999999999)\n"
              "SELECT abalance FROM pgbench_accounts WHERE aid = :aid /*" + _TAGS +
              ",traceparent='00-0af7651916cd43dd8448eb:tid-b7ad6b7169203331-01'*/;\n",
    "static": "\\set aid random(1, 100000 * :scale)\n"
              "SELECT abalance FROM pgbench_accounts WHERE aid = :aid /*" + _TAGS + "*/;\n",
}
_SUMMARY = re.compile(r"^(?:summary|totals):\s+(\d+)", re.MULTILINE)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def instructions(dump: Path) -> int:
    match = _SUMMARY.search(dump.read_text(errors="replace"))
    if match is None:
        raise BenchError(f"no instruction total in {dump}")
    return int(match.group(1))


class Run:
    """One sqlproxy under callgrind, driven by pgbench."""

    def __init__(self, args: argparse.Namespace, primary: pg.PgCluster, work: Path,
                 pgbench: str, psql: str, mode: str, profiling: bool,
                 replica: pg.PgCluster | None = None, pooled: bool = False) -> None:
        self.args = args
        self.primary = primary
        self.work = work
        self.pgbench = pgbench
        self.psql = psql
        self.mode = mode
        self.profiling = profiling
        self.port = pg.free_port(LOOPBACK)
        name = (f"{mode}-{'on' if profiling else 'off'}" + ("-routed" if replica else "")
                + ("-pooled" if pooled else ""))
        self.out = work / f"callgrind.{name}"
        env = client_env({
            "SQLPROXY_ANALYSIS__ENABLED": "true" if profiling else "false",
            "SQLPROXY_STATE__ENABLED": "false",
            "SQLPROXY_ADMIN__ENABLED": "false",
            "SQLPROXY_ROUTING__ENABLED": "true" if replica else "false",
            "SQLPROXY_POOL__MODE": "transaction" if pooled else "session",
            "SQLPROXY_POOL__SIZE": str(args.pool_size),
        })
        routing = ["--replica", replica.dsn(DB_USER, dbname=DB_NAME)] if replica else []
        argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.out}",
                *(["--cache-sim=yes"] if args.cache_sim else []),
                sys.executable, "-m", "sqlproxy.cli", "serve",
                "--listen", f"{LOOPBACK}:{self.port}",
                "--primary", primary.dsn(DB_USER, dbname=DB_NAME), *routing]  # fmt: skip
        self.service = Service(name, argv, log_path=work / f"{name}.log", env=env,
                               cwd=_REPO_ROOT)

    def pgbench_run(self, transactions: int) -> int:
        workload = ["-S"]
        if self.args.tags:
            script = self.work / f"tagged-{self.mode}.sql"
            script.write_text(TAGGED_SCRIPTS["simple" if self.mode == "simple" else "static"])
            workload = ["-f", str(script)]
        argv = [self.pgbench, *workload, "-M", self.mode, "-c", str(self.args.clients), "-j", "2",
                "-t", str(transactions), "-n", "-h", LOOPBACK, "-p", str(self.port),
                "-U", DB_USER, DB_NAME]  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, text=True, env=client_env(),
                              timeout=3600, check=False)
        done = re.search(r"actually processed: (\d+)", proc.stdout)
        if proc.returncode != 0 or done is None:
            raise BenchError(f"pgbench failed: {proc.stdout[-500:]} {proc.stderr[-500:]}")
        return int(done.group(1))

    def control(self, option: str) -> None:
        subprocess.run(["callgrind_control", option, str(self.service.pid)],
                       capture_output=True, check=True, timeout=120)

    def measure(self) -> float:
        """Instructions per transaction."""
        self.service.start()
        try:
            wait_accepting(self.psql, LOOPBACK, self.port, self.service, timeout=300)
            self.pgbench_run(self.args.warmup)
            totals: list[tuple[int, int]] = []
            for n in (self.args.transactions, 2 * self.args.transactions):
                before = set(self.work.glob(self.out.name + ".*"))
                self.control("-z")
                done = self.pgbench_run(n)
                self.control("-d")
                dump = self._new_dump(before)
                totals.append((done, instructions(dump)))
                if self.args.keep is not None:
                    self.args.keep.mkdir(parents=True, exist_ok=True)
                    shutil.copy(dump, self.args.keep / f"{self.out.name}.{n}")
            (t1, i1), (t2, i2) = totals
            return (i2 - i1) / (t2 - t1)
        finally:
            self.service.stop(timeout=60)

    def _new_dump(self, before: set[Path]) -> Path:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            new = sorted(set(self.work.glob(self.out.name + ".*")) - before)
            if new and _SUMMARY.search(new[-1].read_text(errors="replace")):
                return new[-1]
            time.sleep(0.2)
        raise BenchError("callgrind wrote no dump")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="callgrind", description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="simple,prepared",
                        type=lambda v: parse_list(v, MODES, "mode"),
                        help="pgbench -M modes, comma separated (default: simple,prepared)")
    parser.add_argument("--transactions", type=positive_int, default=1000,
                        help="transactions per client in the first measured run; the second "
                        "runs twice as many (default: 1000)")
    parser.add_argument("--clients", type=positive_int, default=8, help="pgbench -c (default 8)")
    parser.add_argument("--warmup", type=positive_int, default=200,
                        help="transactions per client before measuring (default: 200)")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="copy the callgrind dumps of the measured runs to DIR (per-function "
                        "costs: subtract a setting's two dumps)")
    parser.add_argument("--cache-sim", action="store_true",
                        help="also simulate the caches (callgrind --cache-sim=yes): the kept "
                        "dumps then count cache misses per function; slower")
    parser.add_argument("--tags", action="store_true",
                        help="statements carry sqlcommenter tags (see the module docstring)")
    parser.add_argument("--routing", action="store_true",
                        help="routing off vs on with a streaming replica, profiling on")
    parser.add_argument("--pool", action="store_true",
                        help="pool.mode session vs transaction, profiling on (with --routing: "
                        "both through a replica)")
    parser.add_argument("--second-only", action="store_true",
                        help="measure only the second setting (profiling on, routing on, "
                        "transaction mode): quicker while working on it")
    parser.add_argument("--pool-size", type=positive_int, default=20,
                        help="pool.size in transaction mode (default 20)")
    args = parser.parse_args(argv)
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"{tool} not found (Debian: apt-get install valgrind)", file=sys.stderr)
            return 2
    pgbench = find_pgbench()
    psql = shutil.which("psql") or str(pg.find_pg_bindir() / "psql")
    base = pg.make_base_dir()
    primary = pg.start_primary(base)
    replica: pg.PgCluster | None = None
    labels = (("session mode", "transaction") if args.pool else
              ("routing off", "routing on") if args.routing else ("profiling off",
                                                                  "profiling on"))
    results: dict[str, dict[bool, float]] = {}
    try:
        subprocess.run([pgbench, "-i", "-q", "-s", "10", "-h", primary.host,
                        "-p", str(primary.port), "-U", DB_USER, DB_NAME],
                       capture_output=True, env=client_env(), check=True, timeout=600)
        if args.routing:
            replica = pg.start_replica(primary, base)
            replica.wait_for_replay()
        for mode in args.modes:
            for second in ((True,) if args.second_only else (False, True)):
                # --pool: (session, transaction mode), profiling on (routed with --routing);
                # --routing: (routing off, routing on), profiling on; else profiling off, on.
                if args.pool:
                    run = Run(args, primary, base, pgbench, psql, mode, profiling=True,
                              replica=replica, pooled=second)
                else:
                    run = Run(args, primary, base, pgbench, psql, mode,
                              profiling=second or args.routing,
                              replica=replica if args.routing and second else None)
                per_tx = run.measure()
                results.setdefault(mode, {})[second] = per_tx
                log(f"{mode:9s} {labels[second]:13s} {per_tx:9.0f} instructions per transaction")
    finally:
        if replica is not None:
            replica.stop()
        primary.stop()
        shutil.rmtree(base, ignore_errors=True)
    what = "-f <tagged select-only script>" if args.tags else "-S"
    print(f"sqlproxy user-space instructions per transaction (callgrind), pgbench {what} "
          f"-c {args.clients}, {args.transactions} and {2 * args.transactions} transactions "
          "per client, difference of the two runs")
    print(f"{'mode':10s} {labels[0]:>14s} {labels[1]:>13s} "
          f"{'tx/ses' if args.pool else 'on/off':>7s}")
    for mode, r in results.items():
        if False not in r:
            print(f"{mode:10s} {'-':>14s} {r[True]:13.0f}")
            continue
        print(f"{mode:10s} {r[False]:14.0f} {r[True]:13.0f} {r[True] / r[False]:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
