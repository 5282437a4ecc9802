"""pgbench -S through sqlproxy, PgBouncer and straight to PostgreSQL, in alternating rounds.

Starts a throwaway PostgreSQL primary (tests/support/pg.py), loads pgbench data, and puts in
front of it, each on a free loopback port: PgBouncer in session pooling mode, sqlproxy with
statement profiling on, and sqlproxy with profiling off. Then, for each protocol mode, it runs
``pgbench -S`` against every target in turn, round after round, rotating the order each round so
that noise from other work on the machine spreads evenly, and reports medians: TPS, average
latency, and the per-round throughput ratios (sqlproxy against PgBouncer, against direct, and
profiling on against off).

Run from the repository root::

    .venv/bin/python -m bench.pgbench_compare            # 5 rounds x 10 s, simple + prepared
    .venv/bin/python bench/pgbench_compare.py --rounds 2 --seconds 3
    .venv/bin/python -m bench.pgbench_compare --targets direct,pgbouncer,sqlproxy --json out.json
    .venv/bin/python -m bench.pgbench_compare --profile-pyspy 10   # plus a py-spy profile
    .venv/bin/python -m bench.pgbench_compare --targets sqlproxy --base-tree /tmp/base  # A/B

(``--base-tree``: another checkout, its compiled modules built in place with this venv's
Python, run as a further target through PYTHONPATH: two commits in the same rounds.)

Everything it starts (PostgreSQL, PgBouncer, both sqlproxy processes, py-spy) is stopped again,
also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import pwd
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import types
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    # `python bench/pgbench_compare.py` puts bench/ first on sys.path, not the repository.
    sys.path.insert(0, str(_REPO_ROOT))

from sqlproxy.pghost import switch_user_kwargs  # noqa: E402
from tests.support import pg  # noqa: E402

LOOPBACK = "127.0.0.1"
DB_USER = pg.SUPERUSER
DB_NAME = "postgres"

DIRECT = "direct"
SQLPROXY_ON = "sqlproxy"
SQLPROXY_OFF = "sqlproxy-off"
SQLPROXY_TRANSPORTS = "sqlproxy-transports"  # profiling on, proxy.direct_relay = false
SQLPROXY_BASE = "sqlproxy-base"  # profiling on, the tree of --base-tree (another commit)
PGBOUNCER = "pgbouncer"
ALL_TARGETS: tuple[str, ...] = (DIRECT, SQLPROXY_ON, SQLPROXY_OFF, PGBOUNCER)
SQLPROXY_TARGETS: frozenset[str] = frozenset({SQLPROXY_ON, SQLPROXY_OFF, SQLPROXY_TRANSPORTS,
                                               SQLPROXY_BASE})
TARGET_ALIASES: dict[str, str] = {
    "direct": DIRECT,
    "postgres": DIRECT,
    "sqlproxy": SQLPROXY_ON,
    "sqlproxy-on": SQLPROXY_ON,
    "sqlproxy_on": SQLPROXY_ON,
    "sqlproxy-off": SQLPROXY_OFF,
    "sqlproxy_off": SQLPROXY_OFF,
    "sqlproxy-transports": SQLPROXY_TRANSPORTS,
    "sqlproxy_transports": SQLPROXY_TRANSPORTS,
    "sqlproxy-base": SQLPROXY_BASE,
    "sqlproxy_base": SQLPROXY_BASE,
    "pgbouncer": PGBOUNCER,
    "bouncer": PGBOUNCER,
}
TARGET_LABELS: dict[str, str] = {
    DIRECT: "direct",
    SQLPROXY_ON: "sqlproxy (profiling on)",
    SQLPROXY_OFF: "sqlproxy (profiling off)",
    SQLPROXY_TRANSPORTS: "sqlproxy (on, no relay)",
    SQLPROXY_BASE: "sqlproxy (on, base tree)",
    PGBOUNCER: "pgbouncer",
}
# (label, numerator, denominator): medians of the per-round TPS ratios.
RATIOS: tuple[tuple[str, str, str], ...] = (
    ("sqlproxy(on)/pgbouncer", SQLPROXY_ON, PGBOUNCER),
    ("sqlproxy(off)/pgbouncer", SQLPROXY_OFF, PGBOUNCER),
    ("sqlproxy(on)/direct", SQLPROXY_ON, DIRECT),
    ("sqlproxy(on)/sqlproxy(off)", SQLPROXY_ON, SQLPROXY_OFF),
    ("sqlproxy(off)/direct", SQLPROXY_OFF, DIRECT),
    ("sqlproxy(on)/sqlproxy(no relay)", SQLPROXY_ON, SQLPROXY_TRANSPORTS),
    ("sqlproxy(no relay)/pgbouncer", SQLPROXY_TRANSPORTS, PGBOUNCER),
    ("sqlproxy(on)/sqlproxy(base)", SQLPROXY_ON, SQLPROXY_BASE),
    ("sqlproxy(base)/pgbouncer", SQLPROXY_BASE, PGBOUNCER),
    ("pgbouncer/direct", PGBOUNCER, DIRECT),
)
MODES = ("simple", "extended", "prepared")

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
PYSPY_RATE = 100  # py-spy's default sampling rate, Hz
PGBOUNCER_PATHS = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")
PGBOUNCER_DEBIAN_PACKAGE = "pgbouncer"


class BenchError(RuntimeError):
    """The benchmark could not set up, run or parse something."""


class Terminated(BaseException):
    """SIGTERM arrived; unwinds like KeyboardInterrupt so that cleanup runs."""


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def client_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for clients and proxies: no ambient PG* or SQLPROXY_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "SQLPROXY_"))}
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    if extra:
        env.update(extra)
    return env


def _chown_to(path: Path, os_user: str, mode: int) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam(os_user)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    path.chmod(mode)


def _die_with_parent() -> None:
    """preexec_fn: have the kernel SIGTERM the child if this script dies without cleaning up."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PDEATHSIG


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc})"
    return f"--- last lines of {path} ---\n" + "\n".join(text.splitlines()[-lines:])


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_times(pid: int) -> tuple[float, float] | None:
    """User and system CPU time the process has used so far (Linux /proc), None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # fields[0] is field 3 (state) of stat(5)
    return int(fields[11]) / _CLOCK_TICKS, int(fields[12]) / _CLOCK_TICKS


def process_switches(pid: int) -> tuple[int, int] | None:
    """Voluntary and involuntary context switches of the process so far (its main thread's,
    Linux /proc), None if unknown."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = dict(line.split(":\t", 1) for line in text.splitlines() if "ctxt_switches" in line)
    try:
        return int(found["voluntary_ctxt_switches"]), int(found["nonvoluntary_ctxt_switches"])
    except (KeyError, ValueError):
        return None


def machine_cpu_times() -> tuple[float, float, int] | None:
    """Busy and idle CPU seconds of the whole machine so far, all CPUs, and its context
    switches (Linux /proc/stat): busy is user, nice, system, irq, softirq and steal; idle is
    idle and iowait."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    ticks = [int(v) for v in lines[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = ticks
    busy = user + nice + system + irq + softirq + steal
    switches = next((int(line.split()[1]) for line in lines if line.startswith("ctxt ")), 0)
    return busy / _CLOCK_TICKS, (idle + iowait) / _CLOCK_TICKS, switches


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc)."""
    parents: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += parents.get(p, [])
    return out


def cpu_by_pid(pid: int) -> dict[int, float]:
    """User and system CPU seconds of ``pid`` and of each of its descendants still there."""
    out = {}
    for p in tree(pid):
        t = process_cpu_times(p)
        if t is not None:
            out[p] = t[0] + t[1]
    return out


def server_cpu_seconds(postmaster: int) -> float | None:
    """User and system CPU the PostgreSQL server has used so far: its postmaster and every
    process it started that is still there (backends, background workers; Linux /proc). A
    backend gone meanwhile takes its time with it: the pooled targets and PgBouncer keep
    theirs, pgbench -C's come and go. None if unknown."""
    if postmaster <= 0:
        return None
    times = cpu_by_pid(postmaster)
    return sum(times.values()) if times else None


def tcp_out_segments() -> int | None:
    """TCP segments the machine has sent so far (Linux /proc/net/snmp, Tcp: OutSegs)."""
    try:
        lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()
                 if line.startswith("Tcp:")]
        return int(lines[1][lines[0].index("OutSegs")])
    except (OSError, IndexError, ValueError):
        return None


def children_cpu_seconds() -> float:
    """User and system CPU of this process's waited-for children so far (here: pgbench)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Service:
    """A long-running child process in its own session, stopped by process group."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str],
        cwd: Path | None = None,
        os_user: str | None = None,
        extra_logs: Sequence[Path] = (),
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env)
        self.cwd = cwd
        self.os_user = os_user
        self.extra_logs = list(extra_logs)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError(f"{self.name} is not running")
        return self.proc.pid

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,  # Ctrl-C at the terminal is for us, not for it
                preexec_fn=_die_with_parent,
                **switch_user_kwargs(self.os_user),
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_times(self) -> tuple[float, float] | None:
        return process_cpu_times(self.proc.pid) if self.alive() and self.proc else None

    def switches(self) -> tuple[int, int] | None:
        return process_switches(self.proc.pid) if self.alive() and self.proc else None

    def logs(self) -> str:
        return "\n".join(_tail(path) for path in [*self.extra_logs, self.log_path])

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
        # Anything it left behind in its group (it was the session leader).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        self.proc = None


# --------------------------------------------------------------------------------------------
# Targets and pgbench
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Target:
    key: str
    host: str
    port: int
    service: Service | None = None  # the proxy process (None for direct)

    @property
    def label(self) -> str:
        return TARGET_LABELS[self.key]


@dataclass(slots=True)
class RunResult:
    mode: str
    round: int  # 1-based; 0 for warm-up and profiling runs
    position: int  # 1-based place in this round's order
    target: str
    seconds: int
    ok: bool
    tps: float | None = None
    latency_ms: float | None = None
    initial_connection_ms: float | None = None
    transactions: int | None = None
    failed_transactions: int | None = None
    proxy_cpu_seconds: float | None = None
    proxy_user_seconds: float | None = None  # the user-space part of proxy_cpu_seconds
    machine_busy_seconds: float | None = None  # every CPU's busy time during the run
    machine_idle_seconds: float | None = None  # every CPU's idle time during the run
    pgbench_cpu_seconds: float | None = None  # pgbench's own user+system CPU
    server_cpu_seconds: float | None = None  # PostgreSQL's (server_cpu_seconds)
    context_switches: int | None = None  # the machine's, during the run
    proxy_switches: tuple[int, int] | None = None  # the proxy's (voluntary, involuntary)
    tcp_segments: int | None = None  # TCP segments sent on the machine during the run
    wall_seconds: float = 0.0
    started_at: float = 0.0
    error: str | None = None

    def _per_tx(self, total: float | None, scale: float = 1e6) -> float | None:
        """``total`` per transaction (seconds in µs, by default), None if unknown."""
        if total is None or not self.transactions:
            return None
        return total * scale / self.transactions

    @property
    def proxy_cpu_us_per_tx(self) -> float | None:
        return self._per_tx(self.proxy_cpu_seconds)

    @property
    def proxy_user_us_per_tx(self) -> float | None:
        return self._per_tx(self.proxy_user_seconds)

    @property
    def machine_busy_us_per_tx(self) -> float | None:
        return self._per_tx(self.machine_busy_seconds)

    @property
    def pgbench_us_per_tx(self) -> float | None:
        return self._per_tx(self.pgbench_cpu_seconds)

    @property
    def server_us_per_tx(self) -> float | None:
        return self._per_tx(self.server_cpu_seconds)

    @property
    def switches_per_tx(self) -> float | None:
        return self._per_tx(self.context_switches, 1)

    @property
    def idle_share(self) -> float | None:
        busy, idle = self.machine_busy_seconds, self.machine_idle_seconds
        if busy is None or idle is None or busy + idle <= 0:
            return None
        return idle / (busy + idle)


_TPS_RE = re.compile(
    r"^tps = ([0-9.]+) \((?:without initial connection time|including reconnection times)\)", re.M)
_LAT_RE = re.compile(r"^latency average = ([0-9.]+) ms", re.M)
_CONN_RE = re.compile(r"^initial connection time = ([0-9.]+) ms", re.M)
_TX_RE = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
_FAILED_RE = re.compile(r"^number of failed transactions: (\d+)", re.M)


def _search_float(pattern: re.Pattern[str], text: str) -> float | None:
    match = pattern.search(text)
    return float(match.group(1)) if match else None


def _search_int(pattern: re.Pattern[str], text: str) -> int | None:
    match = pattern.search(text)
    return int(match.group(1)) if match else None


@dataclass(frozen=True, slots=True)
class Workload:
    pgbench: str
    clients: int
    jobs: int
    connect: bool = False  # pgbench -C: a new connection per transaction
    postmaster: int = 0  # the server's postmaster (its CPU: server_cpu_seconds)

    def argv(self, target: Target, mode: str, seconds: int) -> list[str]:
        return [*self._argv(target, mode, seconds), *(["-C"] if self.connect else [])]

    def _argv(self, target: Target, mode: str, seconds: int) -> list[str]:
        return [
            self.pgbench,
            "-h", target.host,
            "-p", str(target.port),
            "-U", DB_USER,
            "-S",
            "-M", mode,
            "-c", str(self.clients),
            "-j", str(self.jobs),
            "-T", str(seconds),
            "-n",
            DB_NAME,
        ]  # fmt: skip

    def describe(self, mode: str, seconds: int) -> str:
        return (f"pgbench -S -M {mode} -c {self.clients} -j {self.jobs} -T {seconds} -n"
                + (" -C" if self.connect else ""))

    def run(
        self, target: Target, mode: str, seconds: int, *, round_no: int, position: int
    ) -> RunResult:
        result = RunResult(
            mode=mode,
            round=round_no,
            position=position,
            target=target.key,
            seconds=seconds,
            ok=False,
            started_at=time.time(),
        )
        if target.service is not None and not target.service.alive():
            result.error = f"{target.service.name} is not running\n{target.service.logs()}"
            return result
        cpu_before = target.service.cpu_times() if target.service else None
        switches_before = target.service.switches() if target.service else None
        machine_before = machine_cpu_times()
        server_before = server_cpu_seconds(self.postmaster)
        segments_before = tcp_out_segments()
        children_before = children_cpu_seconds()
        start = time.monotonic()
        try:
            proc = subprocess.run(
                self.argv(target, mode, seconds),
                capture_output=True,
                text=True,
                env=client_env(),
                timeout=seconds + 120,
                check=False,
            )
        except subprocess.TimeoutExpired:
            result.error = f"pgbench did not finish within {seconds + 120} s"
            return result
        result.wall_seconds = time.monotonic() - start
        machine_after = machine_cpu_times()
        server_after = server_cpu_seconds(self.postmaster)
        if server_before is not None and server_after is not None:
            result.server_cpu_seconds = server_after - server_before
        segments_after = tcp_out_segments()
        if segments_before is not None and segments_after is not None:
            result.tcp_segments = segments_after - segments_before
        result.pgbench_cpu_seconds = children_cpu_seconds() - children_before
        if machine_before is not None and machine_after is not None:
            result.machine_busy_seconds = machine_after[0] - machine_before[0]
            result.machine_idle_seconds = machine_after[1] - machine_before[1]
            result.context_switches = machine_after[2] - machine_before[2]
        cpu_after = target.service.cpu_times() if target.service else None
        switches_after = target.service.switches() if target.service else None
        if switches_before is not None and switches_after is not None:
            result.proxy_switches = (switches_after[0] - switches_before[0],
                                     switches_after[1] - switches_before[1])
        if cpu_before is not None and cpu_after is not None:
            result.proxy_user_seconds = cpu_after[0] - cpu_before[0]
            result.proxy_cpu_seconds = result.proxy_user_seconds + cpu_after[1] - cpu_before[1]
        out = proc.stdout
        result.tps = _search_float(_TPS_RE, out)
        result.latency_ms = _search_float(_LAT_RE, out)
        result.initial_connection_ms = _search_float(_CONN_RE, out)
        result.transactions = _search_int(_TX_RE, out)
        result.failed_transactions = _search_int(_FAILED_RE, out)
        result.ok = (
            proc.returncode == 0 and result.tps is not None and not result.failed_transactions
        )
        if not result.ok:
            detail = (proc.stderr.strip() or out.strip())[-2000:]
            result.error = f"pgbench exited with {proc.returncode}: {detail}"
        return result


# --------------------------------------------------------------------------------------------
# Statistics and reporting
# --------------------------------------------------------------------------------------------


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _percent(share: float | None) -> float | None:
    return None if share is None else share * 100


def _fmt(value: float | None, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def rotated(items: Sequence[str], by: int) -> list[str]:
    if not items:
        return []
    k = by % len(items)
    return [*items[k:], *items[:k]]


def summarize_mode(results: Sequence[RunResult], targets: Sequence[str]) -> dict[str, Any]:
    """Medians per target and medians of the per-round TPS ratios, for one mode."""
    per_target: dict[str, Any] = {}
    for key in targets:
        runs = [r for r in results if r.target == key and r.ok]
        tps = [r.tps for r in runs if r.tps is not None]
        per_target[key] = {
            "runs": len(runs),
            "failed_runs": sum(1 for r in results if r.target == key and not r.ok),
            "median_tps": _median(tps),
            "min_tps": min(tps) if tps else None,
            "max_tps": max(tps) if tps else None,
            "median_latency_ms": _median(r.latency_ms for r in runs),
            "median_proxy_cpu_us_per_tx": _median(r.proxy_cpu_us_per_tx for r in runs),
            "median_proxy_user_us_per_tx": _median(r.proxy_user_us_per_tx for r in runs),
            "median_machine_busy_us_per_tx": _median(r.machine_busy_us_per_tx for r in runs),
            "median_pgbench_us_per_tx": _median(r.pgbench_us_per_tx for r in runs),
            "median_server_us_per_tx": _median(r.server_us_per_tx for r in runs),
            "median_idle_share": _median(r.idle_share for r in runs),
            "median_switches_per_tx": _median(r.switches_per_tx for r in runs),
            "tps_by_round": {r.round: r.tps for r in runs},
        }
    by_round: dict[int, dict[str, float]] = {}
    for r in results:
        if r.ok and r.tps is not None:
            by_round.setdefault(r.round, {})[r.target] = r.tps
    ratios: dict[str, Any] = {}
    for label, num, den in RATIOS:
        if num not in targets or den not in targets:
            continue
        values = [
            tps[num] / tps[den]
            for _, tps in sorted(by_round.items())
            if num in tps and den in tps and tps[den] > 0
        ]
        ratios[label] = {
            "median": _median(values),
            "min": min(values) if values else None,
            "max": max(values) if values else None,
            "per_round": values,
        }
    return {"targets": per_target, "ratios": ratios}


def format_mode_table(
    mode: str, summary: Mapping[str, Any], workload_text: str, rounds: int
) -> list[str]:
    lines = [f"== {mode}: {workload_text}, {rounds} rounds ==", ""]
    lines.append(
        f"{'target':<26}{'median tps':>12}{'min tps':>11}{'max tps':>11}"
        f"{'med lat ms':>12}{'proxy CPU us/tx':>17}{'(user)':>8}{'all CPU us/tx':>15}"
        f"{'pgbench':>9}{'postgres':>10}{'idle':>7}{'cs/tx':>7}{'ok runs':>9}"
    )
    for key, row in summary["targets"].items():
        runs = f"{row['runs']}/{row['runs'] + row['failed_runs']}"
        lines.append(
            f"{TARGET_LABELS[key]:<26}"
            f"{_fmt(row['median_tps'], '.1f', 12)}"
            f"{_fmt(row['min_tps'], '.1f', 11)}"
            f"{_fmt(row['max_tps'], '.1f', 11)}"
            f"{_fmt(row['median_latency_ms'], '.3f', 12)}"
            f"{_fmt(row['median_proxy_cpu_us_per_tx'], '.1f', 17)}"
            f"{_fmt(row['median_proxy_user_us_per_tx'], '.1f', 8)}"
            f"{_fmt(row['median_machine_busy_us_per_tx'], '.1f', 15)}"
            f"{_fmt(row['median_pgbench_us_per_tx'], '.1f', 9)}"
            f"{_fmt(row['median_server_us_per_tx'], '.1f', 10)}"
            f"{_fmt(_percent(row['median_idle_share']), '.1f', 6)}%"
            f"{_fmt(row['median_switches_per_tx'], '.2f', 7)}"
            f"{runs:>9}"
        )
    if summary["ratios"]:
        lines.append("")
        lines.append(f"{'tps ratio (per round)':<32}{'median':>8}{'min':>8}{'max':>8}  per round")
        for label, row in summary["ratios"].items():
            per_round = " ".join(f"{v:.3f}" for v in row["per_round"])
            lines.append(
                f"{label:<32}{_fmt(row['median'], '.3f', 8)}{_fmt(row['min'], '.3f', 8)}"
                f"{_fmt(row['max'], '.3f', 8)}  {per_round}"
            )
    return lines


# --------------------------------------------------------------------------------------------
# py-spy
# --------------------------------------------------------------------------------------------

_LINE_NO_RE = re.compile(r":\d+\)$")
_PATH_PREFIX_RE = re.compile(r"\((?:.*/site-packages/|.*/lib/python3\.\d+/)")


def _frame_name(frame: str, *, keep_line: bool) -> str:
    """``func (path/file.py:123)`` with the noisy path prefix (and the line) dropped."""
    frame = frame.strip()
    frame = _PATH_PREFIX_RE.sub("(", frame, count=1)
    frame = frame.replace(f"({_REPO_ROOT}/", "(")
    if not keep_line:
        frame = _LINE_NO_RE.sub(")", frame)
    return frame


@dataclass(slots=True)
class Profile:
    samples: int = 0
    self_by_function: Counter[str] = field(default_factory=Counter)
    self_by_line: Counter[str] = field(default_factory=Counter)
    inclusive_by_function: Counter[str] = field(default_factory=Counter)
    depth: dict[str, int] = field(default_factory=dict)  # shallowest stack depth seen


def aggregate_collapsed(text: str) -> Profile:
    """Aggregate py-spy's raw (collapsed stack) output: ``f1;f2;...;fn COUNT`` per line."""
    profile = Profile()
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line:
            continue
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        profile.samples += count
        profile.self_by_function[_frame_name(frames[-1], keep_line=False)] += count
        profile.self_by_line[_frame_name(frames[-1], keep_line=True)] += count
        names = [_frame_name(f, keep_line=False) for f in frames]
        for depth, name in enumerate(names):
            profile.depth[name] = min(depth, profile.depth.get(name, depth))
        for name in set(names):
            profile.inclusive_by_function[name] += count
    return profile


def format_profile(profile: Profile, heading: str, top: int = 15) -> list[str]:
    lines = [heading, ""]
    total = profile.samples or 1

    def block(title: str, counter: Counter[str]) -> None:
        lines.append(title)
        lines.append(f"{'%':>7}{'samples':>9}  frame")
        for name, count in counter.most_common(top):
            lines.append(f"{100.0 * count / total:>6.1f}%{count:>9}  {name}")
        lines.append("")

    block(f"top {top} self time (by function):", profile.self_by_function)
    block(f"top {top} self time (by line):", profile.self_by_line)
    # Frames on every stack (<module>, main, asyncio.run, ...) say nothing; list them once.
    trunk = sorted(
        (n for n, c in profile.inclusive_by_function.items() if c >= 0.995 * total),
        key=lambda n: profile.depth.get(n, 0),
    )
    branches = Counter(
        {n: c for n, c in profile.inclusive_by_function.items() if n not in set(trunk)}
    )
    block(f"top {top} inclusive (by function), below the common trunk:", branches)
    if trunk:
        lines.append("common trunk (on ~every stack): " + " > ".join(trunk))
    lines.append(
        "native frames included (py-spy --native): uvloop's C event loop, the system calls "
        "(epoll_pwait, read, write) and the mypyc-compiled hot path (CPyDef_<module>___<name>)."
    )
    return lines


# --------------------------------------------------------------------------------------------
# Setup helpers
# --------------------------------------------------------------------------------------------


def _run_text(
    argv: Sequence[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> str:
    """A program's stripped stdout, or "?" if it could not run or failed."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        proc = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            timeout=timeout,
            check=False,
        )
        if proc.returncode == 0:
            return proc.stdout.strip()
    return "?"


_SQLPROXY_PROBE = """\
import os, sqlproxy
print(os.path.dirname(os.path.abspath(sqlproxy.__file__)))
try:
    import sqlproxy.wire.conversation as c
    src = os.path.join(os.path.dirname(c.__file__), "conversation.py")
    stale = c.__file__.endswith(".so") and os.path.getmtime(src) > os.path.getmtime(c.__file__)
    print(c.__file__ + (" STALE" if stale else ""))
except Exception as exc:
    print(f"(cannot import: {exc!r})")
"""


def find_pgbouncer(install: bool) -> str:
    found = shutil.which("pgbouncer") or next(
        (p for p in PGBOUNCER_PATHS if os.access(p, os.X_OK)), None
    )
    if found:
        return found
    if not install or os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BenchError(
            "pgbouncer not found; install it (Debian: apt-get install pgbouncer) or leave it out "
            "of --targets"
        )
    print("pgbouncer not found; installing the Debian package ...", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install_cmd = ["apt-get", "install", "-y", "--no-install-recommends", PGBOUNCER_DEBIAN_PACKAGE]
    if subprocess.run(install_cmd, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=False)
        subprocess.run(install_cmd, env=env, check=True)
    found = shutil.which("pgbouncer") or next(
        (p for p in PGBOUNCER_PATHS if os.access(p, os.X_OK)), None
    )
    if not found:
        raise BenchError("installed pgbouncer but cannot find its executable")
    return found


def pgbouncer_version(path: str) -> tuple[int, ...]:
    """(major, minor) of a pgbouncer executable, () if it does not say."""
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    m = re.search(r"PgBouncer (\d+)\.(\d+)", out.stdout + out.stderr)
    return (int(m.group(1)), int(m.group(2))) if m else ()


def find_pgbench() -> str:
    with contextlib.suppress(pg.PgHarnessError):
        candidate = pg.find_pg_bindir() / "pgbench"
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("pgbench")
    if not found:
        raise BenchError("pgbench not found (Debian: apt-get install postgresql-client)")
    return found


def find_sqlproxy() -> str:
    candidate = Path(sys.executable).parent / "sqlproxy"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("sqlproxy")
    if not found:
        raise BenchError(
            f"no sqlproxy executable next to {sys.executable} or on PATH; run with the venv "
            "python (.venv/bin/python) after `pip install -e .`"
        )
    return found


def wait_accepting(
    psql: str, host: str, port: int, service: Service | None, timeout: float = READY_TIMEOUT
) -> None:
    """Poll with ``psql -c 'select 1'`` until a query goes through ``host:port``."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while True:
        if service is not None and not service.alive():
            code = service.proc.returncode if service.proc else None
            raise BenchError(f"{service.name} exited with {code} during startup\n{service.logs()}")
        try:
            proc = subprocess.run(
                [psql, "-X", "-A", "-t", "-w", "-h", host, "-p", str(port),
                 "-U", DB_USER, "-d", DB_NAME, "-c", "select 1"],
                capture_output=True,
                text=True,
                env=client_env({"PGCONNECT_TIMEOUT": "3"}),
                timeout=15,
                check=False,
            )  # fmt: skip
            if proc.returncode == 0 and proc.stdout.strip() == "1":
                return
            last_error = proc.stderr.strip()
        except subprocess.TimeoutExpired:
            last_error = "psql timed out"
        if time.monotonic() > deadline:
            logs = service.logs() if service is not None else ""
            raise BenchError(
                f"{host}:{port} ({service.name if service else 'server'}) did not accept "
                f"connections within {timeout:.0f} s: {last_error}\n{logs}"
            )
        time.sleep(0.1)


def parse_list(value: str, allowed: Mapping[str, str], what: str) -> list[str]:
    out: list[str] = []
    for item in (part.strip().lower() for part in value.split(",")):
        if not item:
            continue
        if item not in allowed:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {item!r}; choose from {', '.join(sorted(set(allowed)))}"
            )
        if allowed[item] not in out:
            out.append(allowed[item])
    if not out:
        raise argparse.ArgumentTypeError(f"no {what} given")
    return out


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return number


def non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgbench_compare",
        description="Compare pgbench -S throughput: direct PostgreSQL, sqlproxy (profiling on "
        "and off) and PgBouncer (session pooling), in alternating rounds.",
    )
    parser.add_argument(
        "--modes",
        default="simple,prepared",
        type=lambda v: parse_list(v, {m: m for m in MODES}, "mode"),
        help="pgbench -M protocol modes, comma separated (default: %(default)s)",
    )
    parser.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        type=lambda v: parse_list(v, TARGET_ALIASES, "target"),
        help="comma separated subset of direct, sqlproxy (profiling on), "
        "sqlproxy-off, pgbouncer (default: these four), and sqlproxy-transports (profiling on, "
        "proxy.direct_relay = false: what the direct relay saves)",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=5,
        help="rounds per mode; each round runs every target once (default: %(default)s)",
    )
    parser.add_argument(
        "--seconds", type=positive_int, default=10, help="pgbench -T per run (default: %(default)s)"
    )
    parser.add_argument(
        "--clients", type=positive_int, default=8, help="pgbench -c (default: %(default)s)"
    )
    parser.add_argument(
        "--jobs", type=positive_int, default=2, help="pgbench -j (default: %(default)s)"
    )
    parser.add_argument(
        "--scale", type=positive_int, default=10, help="pgbench -i -s (default: %(default)s)"
    )
    parser.add_argument(
        "--warmup",
        type=non_negative_int,
        default=2,
        metavar="SECONDS",
        help="untimed run per target and mode before round 1 (default: %(default)s; 0 disables)",
    )
    parser.add_argument(
        "--pool-mode", choices=("session", "transaction"), default="session",
        help="PgBouncer pool_mode and sqlproxy pool.mode (default: %(default)s)",
    )
    parser.add_argument(
        "--pool-size", type=positive_int, default=20,
        help="server connections in transaction mode: PgBouncer default_pool_size and "
        "sqlproxy pool.size (default: %(default)s)",
    )
    parser.add_argument(
        "--connect", action="store_true", help="pgbench -C: a new connection per transaction",
    )
    parser.add_argument(
        "--profile-pyspy",
        type=positive_int,
        default=None,
        metavar="SECONDS",
        help="afterwards, record a py-spy profile of the profiling-on sqlproxy "
        "during one extra pgbench run (first mode) of this length",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="FILE",
        help="write all raw figures as JSON to FILE",
    )
    parser.add_argument(
        "--pgbouncer",
        default=None,
        metavar="PATH",
        help="the pgbouncer executable (default: on PATH or Debian's); from 1.21 on, its "
        "max_prepared_statements is set to 200 so that -M prepared can be compared",
    )
    parser.add_argument(
        "--base-tree",
        type=Path,
        default=None,
        metavar="DIR",
        help="another checkout of sqlproxy, its compiled modules built in place (`python "
        "setup.py build_ext --inplace`), run as the sqlproxy-base target (profiling on) "
        "through PYTHONPATH: an A/B of two commits in the same rounds (adds the target)",
    )
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="do not apt-get install pgbouncer when it is missing",
    )
    return parser


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.modes: list[str] = args.modes
        self.target_keys: list[str] = args.targets
        self.base_dir: Path | None = None
        self.primary: pg.PgCluster | None = None
        self.services: list[Service] = []
        self.targets: dict[str, Target] = {}
        self.results: list[RunResult] = []
        self.warmups: list[RunResult] = []
        self.machine: dict[str, Any] = {}
        self.profile_info: dict[str, Any] | None = None
        self.pyspy_proc: subprocess.Popen[bytes] | None = None
        self.pgbench = "pgbench"
        self.psql = "psql"
        self.sqlproxy = ""
        self.pgbouncer = ""
        self.os_user = ""
        self.workload = Workload(self.pgbench, args.clients, args.jobs, args.connect)

    # -- setup ---------------------------------------------------------------------------

    def setup(self) -> None:
        if self.args.profile_pyspy and SQLPROXY_ON not in self.target_keys:
            raise BenchError("--profile-pyspy needs the sqlproxy (profiling on) target")
        base_tree: Path | None = self.args.base_tree
        if base_tree is not None:
            if not (base_tree / "sqlproxy" / "__init__.py").is_file():
                raise BenchError(f"--base-tree {base_tree}: no sqlproxy package there")
            self.args.base_tree = base_tree.resolve()
            if SQLPROXY_BASE not in self.target_keys:
                self.target_keys.append(SQLPROXY_BASE)
        elif SQLPROXY_BASE in self.target_keys:
            raise BenchError("the sqlproxy-base target needs --base-tree DIR")
        self.pgbench = find_pgbench()
        self.psql = shutil.which("psql") or str(pg.find_pg_bindir() / "psql")
        self.sqlproxy = (
            find_sqlproxy() if SQLPROXY_TARGETS & set(self.target_keys) else ""
        )
        self.pgbouncer = (
            (self.args.pgbouncer or find_pgbouncer(install=not self.args.no_install))
            if PGBOUNCER in self.target_keys
            else ""
        )
        self.pgbouncer_version = pgbouncer_version(self.pgbouncer) if self.pgbouncer else ()
        self.workload = Workload(self.pgbench, self.args.clients, self.args.jobs,
                                 self.args.connect)

        self.base_dir = pg.make_base_dir()
        self.os_user = pg.server_os_user()
        step = time.monotonic()
        self.primary = pg.start_primary(self.base_dir)
        log(
            f"primary started on {self.primary.host}:{self.primary.port} "
            f"({time.monotonic() - step:.1f} s)"
        )
        step = time.monotonic()
        subprocess.run(
            [self.pgbench, "-i", "-q", "-s", str(self.args.scale),
             "-h", self.primary.host, "-p", str(self.primary.port), "-U", DB_USER, DB_NAME],
            capture_output=True, text=True, env=client_env(), check=True, timeout=1800,
        )  # fmt: skip
        log(f"pgbench -i -s {self.args.scale} done ({time.monotonic() - step:.1f} s)")
        self.workload = replace(self.workload, postmaster=self.primary.pid or 0)
        self._collect_machine_info()

        if DIRECT in self.target_keys:
            self.targets[DIRECT] = Target(DIRECT, self.primary.host, self.primary.port)
        for key in (SQLPROXY_ON, SQLPROXY_OFF, SQLPROXY_TRANSPORTS, SQLPROXY_BASE):
            if key in self.target_keys:
                self.targets[key] = self._start_service(key, self._sqlproxy(key))
        if PGBOUNCER in self.target_keys:
            self.targets[PGBOUNCER] = self._start_service(PGBOUNCER, self._pgbouncer)

    def _start_service(self, key: str, make: Callable[[int], Service]) -> Target:
        """Start a proxy on a free port (another one if that was taken meanwhile)."""
        for attempt in range(3):
            port = pg.free_port(LOOPBACK)
            service = make(port)
            self.services.append(service)
            service.start()
            try:
                wait_accepting(self.psql, LOOPBACK, port, service)
            except BenchError as exc:
                service.stop()
                if attempt < 2 and re.search(r"already in use|could not bind", str(exc), re.I):
                    continue
                raise
            log(f"{TARGET_LABELS[key]} listening on {LOOPBACK}:{port} (pid {service.pid})")
            return Target(key, LOOPBACK, port, service)
        raise BenchError(f"could not start {key}")  # pragma: no cover - loop returns or raises

    def _sqlproxy(self, name: str) -> Callable[[int], Service]:
        """One of the SQLPROXY_TARGETS: profiling off only for SQLPROXY_OFF, the direct relay
        off only for SQLPROXY_TRANSPORTS."""
        assert self.primary is not None and self.base_dir is not None
        primary_url = self.primary.dsn(DB_USER, dbname=DB_NAME)
        profiling, relay = name != SQLPROXY_OFF, name != SQLPROXY_TRANSPORTS
        base_dir = self.base_dir

        def make(port: int) -> Service:
            env = client_env(
                {
                    "SQLPROXY_ANALYSIS__ENABLED": "true" if profiling else "false",
                    "SQLPROXY_STATE__ENABLED": "false",
                    "SQLPROXY_ADMIN__ENABLED": "false",
                    "SQLPROXY_PROXY__SHUTDOWN_GRACE_SECONDS": "1",
                    "SQLPROXY_POOL__MODE": self.args.pool_mode,
                    "SQLPROXY_POOL__SIZE": str(self.args.pool_size),
                    "SQLPROXY_PROXY__DIRECT_RELAY": "true" if relay else "false",
                }
            )
            if name == SQLPROXY_BASE:  # imported from the base tree first
                env["PYTHONPATH"] = str(self.args.base_tree)
            argv = [
                self.sqlproxy,
                "serve",
                "--listen",
                f"{LOOPBACK}:{port}",
                "--primary",
                primary_url,
            ]
            return Service(name, argv, log_path=base_dir / f"{name}.log", env=env, cwd=base_dir)

        return make

    def _pgbouncer(self, port: int) -> Service:
        assert self.primary is not None and self.base_dir is not None
        work = self.base_dir / "pgbouncer"
        work.mkdir(exist_ok=True)
        _chown_to(work, self.os_user, 0o700)
        userlist = work / "userlist.txt"
        logfile = work / "pgbouncer.log"
        ini = work / "pgbouncer.ini"
        userlist.write_text(f'"{DB_USER}" ""\n')
        pool = (self.args.pool_size if self.args.pool_mode == "transaction"
                else max(self.args.clients * 2, 20))
        ini.write_text(
            "[databases]\n"
            f"* = host={self.primary.host} port={self.primary.port}\n"
            "\n[pgbouncer]\n"
            f"listen_addr = {LOOPBACK}\n"
            f"listen_port = {port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {userlist}\n"
            f"pool_mode = {self.args.pool_mode}\n"
            "max_client_conn = 1000\n"
            f"default_pool_size = {pool}\n"
            "max_db_connections = 0\n"
            "ignore_startup_parameters = extra_float_digits\n"
            f"admin_users = {DB_USER}\n"
            f"logfile = {logfile}\n"
            # Named prepared statements in transaction mode (PgBouncer >= 1.21); as many per
            # server connection as sqlproxy keeps (pool.max_prepared_per_server).
            + ("max_prepared_statements = 200\n" if self.pgbouncer_version >= (1, 21) else "")
        )
        for path in (userlist, ini):
            _chown_to(path, self.os_user, 0o600)
        return Service(
            PGBOUNCER,
            [self.pgbouncer, str(ini)],
            log_path=self.base_dir / "pgbouncer.stderr.log",
            env=client_env(),
            cwd=work,
            os_user=self.os_user,
            extra_logs=[logfile],
        )

    def _collect_machine_info(self) -> None:
        assert self.primary is not None
        model = "?"
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        sqlproxy_source: str | None = None
        if self.sqlproxy:
            sqlproxy_source = self._sqlproxy_source()
        self.machine = {
            "nproc": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)),
            "cpu_model": model,
            "kernel": f"{platform.system()} {platform.release()}",
            "python": f"{platform.python_version()} ({platform.python_implementation()})",
            "python_executable": sys.executable,
            "postgres": self.primary.psql("SELECT version()"),
            "pgbench": _run_text([self.pgbench, "--version"]),
            "pgbouncer": (
                _run_text([self.pgbouncer, "--version"]).splitlines()[0] if self.pgbouncer else None
            ),
            "sqlproxy": sqlproxy_source,
            "sqlproxy_base": (self._sqlproxy_source(self.args.base_tree)
                              if SQLPROXY_BASE in self.target_keys else None),
            "loadavg_start": os.getloadavg(),
        }

    def _sqlproxy_source(self, tree: Path | None = None) -> str:
        """Where the proxy processes import sqlproxy from (``tree``: the base tree's through
        PYTHONPATH), its git state, mypyc or not."""
        assert self.base_dir is not None
        python = Path(self.sqlproxy).parent / "python"
        out = _run_text(
            [str(python if python.exists() else sys.executable), "-c", _SQLPROXY_PROBE],
            cwd=self.base_dir,  # the proxies' cwd, so the same sys.path
            env=client_env({"PYTHONPATH": str(tree)} if tree is not None else None),
        ).splitlines()
        if len(out) < 2:
            return "? (cannot import sqlproxy)"
        package, conversation = out[0], out[1]
        rev = _run_text(["git", "-C", package, "rev-parse", "--short", "HEAD"])
        dirty = _run_text(["git", "-C", package, "status", "--porcelain", "--untracked-files=no"])
        git = (
            "not a git checkout"
            if rev == "?"
            else f"git {rev}" + ("+dirty" if dirty not in ("", "?") else "")
        )
        if conversation.endswith(" STALE"):
            compiled = "mypyc-compiled hot path, older than conversation.py (stale build?)"
        elif conversation.endswith(".so"):
            compiled = "mypyc-compiled hot path"
        else:
            compiled = f"hot path NOT compiled ({Path(conversation).name})"
        return f"{package} ({git}; {compiled})"

    # -- runs ----------------------------------------------------------------------------

    def run_rounds(self) -> None:
        order_base = list(self.targets)
        for mode in self.modes:
            if self.args.warmup:
                for key in order_base:
                    warm = self.workload.run(
                        self.targets[key], mode, self.args.warmup, round_no=0, position=0
                    )
                    self.warmups.append(warm)
                    if not warm.ok:
                        log(f"[{mode} warm-up] {TARGET_LABELS[key]}: FAILED: {warm.error}")
            for round_index in range(self.args.rounds):
                order = rotated(order_base, round_index)
                for position, key in enumerate(order, start=1):
                    result = self.workload.run(
                        self.targets[key], mode, self.args.seconds,
                        round_no=round_index + 1, position=position,
                    )  # fmt: skip
                    self.results.append(result)
                    log(self._progress_line(result, len(order)))

    def _progress_line(self, r: RunResult, per_round: int) -> str:
        where = f"[{r.mode} round {r.round}/{self.args.rounds} {r.position}/{per_round}]"
        if not r.ok:
            return f"{where} {TARGET_LABELS[r.target]:<26} FAILED: {r.error}"
        cpu = r.proxy_cpu_us_per_tx
        user = r.proxy_user_us_per_tx
        cpu_text = (f"  proxy CPU {cpu:6.1f} us/tx (user {user:5.1f})"
                    if cpu is not None and user is not None else "")
        busy, pgbench, idle = r.machine_busy_us_per_tx, r.pgbench_us_per_tx, r.idle_share
        if busy is not None and pgbench is not None and idle is not None:
            server = r.server_us_per_tx
            server_text = f", postgres {server:5.1f}" if server is not None else ""
            cpu_text += (f"  all CPU {busy:6.1f} us/tx (pgbench {pgbench:5.1f}{server_text}), "
                         f"idle {idle:5.1%}")
        if r.switches_per_tx is not None:
            cpu_text += f", {r.switches_per_tx:.2f} cs/tx"
        if r.proxy_switches is not None and r.transactions:
            vol, invol = (n / r.transactions for n in r.proxy_switches)
            cpu_text += f" (proxy {vol:.3f} + {invol:.3f})"
        if r.tcp_segments is not None and r.transactions:
            cpu_text += f", {r.tcp_segments / r.transactions:.2f} TCP segments/tx"
        return (
            f"{where} {TARGET_LABELS[r.target]:<26} tps {r.tps or 0:>9.1f}  "
            f"lat {r.latency_ms or 0:6.3f} ms{cpu_text}"
        )

    def run_profile(self) -> list[str]:
        seconds: int = self.args.profile_pyspy
        target = self.targets[SQLPROXY_ON]
        assert target.service is not None and self.base_dir is not None
        mode = self.modes[0]
        pyspy = Path(sys.executable).parent / "py-spy"
        pyspy_cmd = str(pyspy) if pyspy.is_file() else shutil.which("py-spy")
        if pyspy_cmd is None:
            raise BenchError("py-spy not found (pip install py-spy into the venv)")
        out = self.base_dir / "pyspy.raw"
        pyspy_log = self.base_dir / "pyspy.log"
        argv = [
            pyspy_cmd,
            "record",
            "-p",
            str(target.service.pid),
            "-d",
            str(seconds + 1),
            "-f",
            "raw",
            "--native",  # the hot path is compiled (mypyc): its frames are C functions
            "-o",
            str(out),
        ]
        log(
            f"py-spy: recording {TARGET_LABELS[SQLPROXY_ON]} for {seconds} s under "
            f"{self.workload.describe(mode, seconds)}"
        )
        with pyspy_log.open("wb") as pyspy_out:
            self.pyspy_proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=pyspy_out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        time.sleep(0.5)  # let py-spy attach before the load starts
        result = self.workload.run(target, mode, seconds, round_no=0, position=0)
        try:
            code = self.pyspy_proc.wait(seconds + 60)
        except subprocess.TimeoutExpired:
            raise BenchError(f"py-spy did not finish\n{_tail(pyspy_log)}") from None
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pyspy_proc.pid, signal.SIGKILL)
            self.pyspy_proc.wait()
            self.pyspy_proc = None
        if code != 0 or not out.exists():
            raise BenchError(f"py-spy exited with {code}\n{_tail(pyspy_log)}")
        profile = aggregate_collapsed(out.read_text(errors="replace"))
        expected = PYSPY_RATE * seconds
        tps_text = f"{result.tps:.1f}" if result.tps is not None else "failed"
        heading = (
            f"== py-spy: {TARGET_LABELS[SQLPROXY_ON]} (pid {target.service.pid}), "
            f"{self.workload.describe(mode, seconds)} ==\n"
            f"tps during profiling {tps_text} (py-spy pauses the process per sample); "
            f"{profile.samples} non-idle samples of ~{expected} at {PYSPY_RATE} Hz "
            f"(~{100.0 * profile.samples / expected:.0f}% of the time on CPU)"
        )
        self.profile_info = {
            "mode": mode,
            "seconds": seconds,
            "pgbench": asdict(result),
            "samples": profile.samples,
            "self_by_function": profile.self_by_function.most_common(50),
            "self_by_line": profile.self_by_line.most_common(50),
            "inclusive_by_function": profile.inclusive_by_function.most_common(50),
        }
        return format_profile(profile, heading)

    # -- reporting -----------------------------------------------------------------------

    def header_lines(self) -> list[str]:
        m = self.machine
        load = " ".join(f"{x:.2f}" for x in m["loadavg_start"])
        lines = [
            "pgbench_compare: sqlproxy vs PgBouncer vs direct PostgreSQL",
            f"command:   {shlex.join(sys.orig_argv)}",
            f"cwd:       {Path.cwd()}",
            f"machine:   nproc {m['nproc']} (usable {m['cpus_usable']}), {m['cpu_model']}, "
            f"{m['kernel']}, load avg at start {load}",
            f"python:    {m['python']} {m['python_executable']}",
            f"postgres:  {m['postgres']}",
            f"pgbench:   {m['pgbench']}",
        ]
        if m["pgbouncer"]:
            lines.append(f"pgbouncer: {m['pgbouncer']} (pool_mode={self.args.pool_mode})")
        if m["sqlproxy"]:
            lines.append(f"sqlproxy:  {m['sqlproxy']}")
        if m.get("sqlproxy_base"):
            lines.append(f"base:      {m['sqlproxy_base']}")
        lines.append(
            f"workload:  {self.workload.describe('<mode>', self.args.seconds)} "
            f"(scale {self.args.scale}); modes {','.join(self.modes)}; {self.args.rounds} "
            f"rounds, target order rotated each round; warm-up {self.args.warmup} s per target "
            "and mode"
        )
        for target in self.targets.values():
            pid = f" pid {target.service.pid}" if target.service else ""
            lines.append(f"target:    {target.label:<26} {target.host}:{target.port}{pid}")
        return lines

    def summaries(self) -> dict[str, dict[str, Any]]:
        return {
            mode: summarize_mode([r for r in self.results if r.mode == mode], list(self.targets))
            for mode in self.modes
        }

    def report_lines(self, summaries: Mapping[str, Mapping[str, Any]]) -> list[str]:
        lines: list[str] = []
        for mode in self.modes:
            lines.append("")
            lines.extend(
                format_mode_table(
                    mode,
                    summaries[mode],
                    self.workload.describe(mode, self.args.seconds),
                    self.args.rounds,
                )
            )
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        failed = sum(1 for r in self.results if not r.ok)
        lines.append("")
        lines.append(
            f"load avg at end {load}; {len(self.results)} timed runs, {failed} failed. "
            "Ratios are medians of per-round ratios (both targets measured in the same round)."
        )
        lines.append(
            "proxy CPU us/tx: user+system CPU of the proxy process per transaction "
            "(from /proc), less sensitive to contention than tps; (user): its user-space part."
        )
        lines.append(
            "all CPU us/tx: every CPU's busy time per transaction (/proc/stat: the proxy, "
            "PostgreSQL, pgbench and the rest); pgbench: pgbench's own; postgres: the server's "
            "(its postmaster and the processes it started, from /proc); idle: the CPUs' idle "
            "share during the runs; cs/tx: the machine's context switches per transaction."
        )
        return lines

    def write_json(self, path: Path, summaries: Mapping[str, Any]) -> None:
        data = {
            "command": sys.orig_argv,
            "cwd": str(Path.cwd()),
            "machine": {**self.machine, "loadavg_end": os.getloadavg()},
            "settings": {
                "modes": self.modes,
                "targets": list(self.targets),
                "rounds": self.args.rounds,
                "seconds": self.args.seconds,
                "clients": self.args.clients,
                "jobs": self.args.jobs,
                "scale": self.args.scale,
                "warmup": self.args.warmup,
            },
            "endpoints": {
                key: {"host": t.host, "port": t.port, "label": t.label}
                for key, t in self.targets.items()
            },
            "runs": [asdict(r) for r in self.results],
            "warmups": [asdict(r) for r in self.warmups],
            "summary": summaries,
            "pyspy": self.profile_info,
        }
        path.write_text(json.dumps(data, indent=2) + "\n")

    # -- lifecycle -----------------------------------------------------------------------

    def run(self) -> int:
        self.setup()
        print("\n".join(self.header_lines()), flush=True)
        self.run_rounds()
        summaries = self.summaries()
        print("\n".join(self.report_lines(summaries)), flush=True)
        if self.args.profile_pyspy:
            print()
            print("\n".join(self.run_profile()), flush=True)
        if self.args.json is not None:
            self.write_json(self.args.json, summaries)
            print(f"raw figures written to {self.args.json}", flush=True)
        return 1 if any(not r.ok for r in self.results) else 0

    def cleanup(self) -> None:
        if self.pyspy_proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pyspy_proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.pyspy_proc.wait(5)
            self.pyspy_proc = None
        for service in reversed(self.services):
            try:
                service.stop()
            except Exception as exc:
                log(f"stopping {service.name}: {exc}")
        self.services.clear()
        if self.primary is not None:
            try:
                self.primary.stop("fast")
            except Exception as exc:
                log(f"stopping the primary: {exc}")
            self.primary = None
        if self.base_dir is not None:
            pg.remove_base_dir(self.base_dir)
            self.base_dir = None


def log(message: str) -> None:
    """Progress goes to stderr; the report goes to stdout."""
    print(message, file=sys.stderr, flush=True)


def _on_sigterm(signum: int, frame: types.FrameType | None) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    # Started in the background by a shell, SIGINT may arrive ignored; Ctrl-C must still work.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    bench = Bench(args)
    try:
        return bench.run()
    except (KeyboardInterrupt, Terminated):
        log("interrupted; cleaning up")
        return 130
    except (BenchError, pg.PgHarnessError) as exc:
        log(f"pgbench_compare: {exc}")
        return 1
    except subprocess.CalledProcessError as exc:
        log(
            f"pgbench_compare: {shlex.join(map(str, exc.cmd))} exited with {exc.returncode}\n"
            f"{exc.stderr or ''}"
        )
        return 1
    finally:
        # A second Ctrl-C must not cut the cleanup short and leave servers behind.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            bench.cleanup()
        finally:
            signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
