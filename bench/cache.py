"""pgbench hot point reads through the result cache: hit ratio and throughput ratios.

Starts a throwaway primary (tests/support/pg.py), loads pgbench data, and runs sqlproxy twice
as a real process — without a cache rule (the plain session and its direct relay) and with
``[[cache.rules]] table = "pgbench_accounts"`` — then runs a custom pgbench script of hot
point reads (``SELECT abalance FROM pgbench_accounts WHERE aid = :aid`` over ``--hot``
distinct ids) straight at PostgreSQL and through both proxies, in alternating rounds. For each
run it prints the throughput and, for the cached proxy, the hit ratio measured on the server:
1 - (pg_stat_statements calls of the read) / (transactions pgbench completed).

Run from the repository root (exclusively: ``flock /tmp/sqlproxy-cpu.lock ...``)::

    .venv/bin/python -m bench.cache                       # 3 rounds x 10 s per run
    .venv/bin/python -m bench.cache --seconds 3 --modes prepared

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from bench.pgbench_compare import client_env, find_pgbench, find_sqlproxy, wait_accepting  # noqa: E402
from tests.support import pg  # noqa: E402

LOOPBACK = "127.0.0.1"
DB = "postgres"
_TPS_RE = re.compile(r"tps = ([0-9.]+) \((?:without initial connection time|excluding)")
_XACTS_RE = re.compile(r"number of transactions actually processed: (\d+)")
_CALLS_SQL = ("SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
              "WHERE query LIKE 'SELECT abalance FROM pgbench_accounts%'")


_SHORT = {"direct": "direct", "sqlproxy no rule": "no rule", "sqlproxy cache rule": "rule"}


def log(message: str) -> None:
    print(f"[cache-bench] {message}", file=sys.stderr, flush=True)


class Proxy:
    """One sqlproxy process, with or without the cache rule."""

    def __init__(self, name: str, primary: pg.PgCluster, base: Path, rule: bool) -> None:
        self.name = name
        self.port = pg.free_port()
        config = base / f"{name}.toml"
        text = f'[proxy]\nlisten = "{LOOPBACK}:{self.port}"\nprimary = "{primary.dsn()}"\n'
        text += "[admin]\nenabled = false\n[state]\nenabled = false\n[log]\nlevel = \"warning\"\n"
        if rule:
            text += '[[cache.rules]]\ntable = "pgbench_accounts"\nttl_s = 600\n'
        config.write_text(text)
        self.log_path = base / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen([find_sqlproxy(), "serve", "--config", str(config)],
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     env=client_env(), start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@dataclass
class Run:
    mode: str
    target: str
    tps: float | None
    xacts: int
    calls: int

    @property
    def hit_ratio(self) -> float | None:
        return 1 - self.calls / self.xacts if self.xacts else None


def pgbench(port: int, mode: str, script: Path, seconds: int, clients: int) -> tuple[float | None,
                                                                                      int]:
    cmd = [find_pgbench(), "-n", "-M", mode, "-f", str(script), "-c", str(clients), "-j", "2",
           "-T", str(seconds), "-h", LOOPBACK, "-p", str(port), "-U", pg.SUPERUSER, DB]
    result = subprocess.run(cmd, capture_output=True, text=True, env=client_env(),
                            timeout=seconds + 120, check=False)
    if result.returncode != 0:
        log(f"pgbench failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    m = _TPS_RE.search(result.stdout)
    x = _XACTS_RE.search(result.stdout)
    return (float(m.group(1)) if m else None), (int(x.group(1)) if x else 0)


def _median(values: Sequence[float | None]) -> float | None:
    vals = sorted(v for v in values if v is not None)
    return statistics.median(vals) if vals else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="per pgbench run (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--clients", type=int, default=8, help="pgbench -c (default 8)")
    parser.add_argument("--hot", type=int, default=1000,
                        help="distinct ids read (default 1000)")
    parser.add_argument("--modes", default="prepared,simple", help="pgbench -M modes")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    base = pg.make_base_dir()
    proxies: list[Proxy] = []
    try:
        log("starting the primary")
        primary = pg.start_primary(base)
        subprocess.run([find_pgbench(), "-i", "-q", "-s", "1", "-h", primary.host,
                        "-p", str(primary.port), "-U", pg.SUPERUSER, DB],
                       capture_output=True, check=True, env=client_env())
        script = base / "hot-reads.sql"
        script.write_text(f"\\set aid random(1, {args.hot})\n"
                          "SELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n")
        plain = Proxy("sqlproxy-no-rule", primary, base, rule=False)
        proxies.append(plain)
        cached = Proxy("sqlproxy-cache-rule", primary, base, rule=True)
        proxies.append(cached)
        psql = str(primary.bindir / "psql")
        for p in proxies:
            wait_accepting(psql, LOOPBACK, p.port, None)
        targets = [("direct", primary.port), ("sqlproxy no rule", plain.port),
                   ("sqlproxy cache rule", cached.port)]
        runs: list[Run] = []
        for rnd in range(args.rounds):
            for mode in modes:
                k = rnd % len(targets)  # alternate who goes first
                for name, port in targets[k:] + targets[:k]:
                    log(f"round {rnd + 1} {mode}: {name}")
                    before = int(primary.psql(_CALLS_SQL))
                    tps, xacts = pgbench(port, mode, script, args.seconds, args.clients)
                    calls = int(primary.psql(_CALLS_SQL)) - before
                    runs.append(Run(mode, name, tps, xacts, calls))
        print(f"pgbench -c {args.clients} -j 2 -T {args.seconds}, hot point reads over "
              f"{args.hot} ids of pgbench_accounts (scale 1), {os.cpu_count()} cores, "
              f"{args.rounds} alternating rounds")
        print(f"{'mode':<9} {'target':<20} {'round':>5} {'tps':>9} {'server calls':>12} "
              f"{'hit ratio':>9}")
        for i, r in enumerate(runs):
            hr = "" if r.hit_ratio is None or r.target != "sqlproxy cache rule" \
                else f"{r.hit_ratio:.3f}"
            print(f"{r.mode:<9} {r.target:<20} {i // (len(targets) * len(modes)) + 1:>5} "
                  f"{r.tps or 0:>9.0f} {r.calls:>12} {hr:>9}")
        print("medians over rounds (ratios per round, then the median):")
        for mode in modes:
            by = {n: [r for r in runs if r.mode == mode and r.target == n] for n, _ in targets}
            parts = [f"{n} {_median([r.tps for r in by[n]]) or 0:.0f}" for n, _ in targets]
            for num, den in (("sqlproxy cache rule", "sqlproxy no rule"),
                             ("sqlproxy cache rule", "direct"),
                             ("sqlproxy no rule", "direct")):
                per = [a.tps / b.tps for a, b in zip(by[num], by[den], strict=True)
                       if a.tps and b.tps]
                parts.append(f"{_SHORT[num]}/{_SHORT[den]} {_median(per) or 0:.3f}")
            hits = _median([r.hit_ratio for r in by["sqlproxy cache rule"]])
            parts.append(f"hit ratio {hits or 0:.3f}")
            print(f"  {mode:<9} " + ", ".join(parts))
        return 0
    finally:
        for p in proxies:
            with contextlib.suppress(Exception):
                p.stop()
        pg.remove_base_dir(base)


if __name__ == "__main__":
    sys.exit(main())
