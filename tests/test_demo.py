"""``sqlproxy demo`` end to end, and the league app on its own (``python -m sqlproxy.demo.app``).

The demo is run as a user would run it (a subprocess, ``--exit``); the test reads its report
and then checks that everything it started is gone.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from sqlproxy.pghost import BASE_DIR_PREFIX
from tests.support.pg import PgCluster, free_port
from tests.support.proxy import ProxyThread

ROOT = Path(__file__).resolve().parent.parent
DEMO_TIMEOUT = 600  # seconds: two initdb, 400,000 seeded rows, on a busy 2-core machine


def _postmasters() -> dict[int, str]:
    """Running ``postgres -D DATADIR`` processes: pid -> data directory."""
    out = subprocess.run(["pgrep", "-af", "postgres -D"], capture_output=True, text=True)
    found: dict[int, str] = {}
    for line in out.stdout.splitlines():
        pid, _, cmd = line.partition(" ")
        m = re.search(r"postgres -D (\S+)", cmd)
        if m and "pgrep" not in cmd:
            found[int(pid)] = m.group(1)
    return found


def _owned_by(datadir: str, pid: int) -> bool:
    """Whether the cluster at ``datadir`` was started by process ``pid`` (devcluster writes its
    owner's pid next to the clusters), or its directory is gone (removed under it)."""
    base = Path(datadir).parent
    owner = base / "harness.pid"
    if not base.name.startswith(BASE_DIR_PREFIX):
        return False
    try:
        return int(owner.read_text().split()[0]) == pid
    except FileNotFoundError:
        return True
    except (OSError, ValueError, IndexError):
        return False


def _accepting(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _table_section(report: str, title: str) -> str:
    start = report.index(title)
    end = report.find("\n\n", start)
    return report[start:] if end < 0 else report[start:end]


def _run_demo(command: list[str], cwd: Path, env: dict[str, str],
              ) -> tuple[subprocess.Popen[str], str, str]:
    """Run ``command`` (a ``sqlproxy demo --exit``) to its end: (process, stdout, stderr)."""
    proc = subprocess.Popen(command, cwd=cwd, env={**env, "COLUMNS": "160"},  # room for tables
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        report, errors = proc.communicate(timeout=DEMO_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()  # its postmasters die with it (PR_SET_PDEATHSIG in devcluster)
        report, errors = proc.communicate()
        pytest.fail(f"sqlproxy demo did not finish in {DEMO_TIMEOUT} s:\n{report}\n{errors}")
    return proc, report, errors


@pytest.mark.slow
def test_demo_end_to_end() -> None:
    before = _postmasters()
    listen, admin = free_port(), free_port()
    proc, report, errors = _run_demo(
        [sys.executable, "-m", "sqlproxy", "demo", "--exit",
         "--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}"],
        cwd=ROOT, env=dict(os.environ))
    context = f"\n--- stdout ---\n{report}\n--- stderr ---\n{errors}"
    assert proc.returncode == 0, context
    assert "demo finished" in errors, context

    # What it started, where it said it would.
    m = re.search(r"primary 127\.0\.0\.1:(\d+), replica 127\.0\.0\.1:(\d+)", report)
    assert m, context
    pg_ports = [int(m.group(1)), int(m.group(2))]
    assert f"sqlproxy listening on 127.0.0.1:{listen} (routing on)" in report, context
    assert f"admin on http://127.0.0.1:{admin}/" in report, context

    # The findings: the N+1 loops, the row-by-row insert with a commit per row.
    findings = _table_section(report, "Findings")
    assert "N+1 select" in findings, context
    assert "after: select teams.id" in findings, context  # the loop's parent query
    assert "row-by-row write" in findings, context
    assert "commit per row" in findings, context
    assert "insert into users" in findings, context
    assert "unbounded result" in findings and "deep OFFSET" in findings, context
    assert "Slow statements" in report and "page_views" in report, context

    # Replica routing: the read-only scenes' SELECTs ran on the replica, the writes did not.
    routes = _table_section(report, "Where statements ran")
    rows = {line.split("│")[1].strip(): line.split("│")[2]
            for line in routes.splitlines() if line.startswith("│") and line.count("│") >= 3}
    assert "replica1" in rows and "primary" in rows, context
    replica_selects = re.search(r"select (\d+)", rows["replica1"])
    assert replica_selects and int(replica_selects.group(1)) > 0, context
    assert "insert" not in rows["replica1"], context
    assert "insert" in rows["primary"], context
    assert "read-your-writes" in routes, context

    # The second sqlproxy, in transaction pooling mode: its pool, the advice, its findings.
    assert 'Transaction pool (pool.mode = "transaction", pool.size = 4)' in report, context
    advice = _table_section(report, "Pool advice")
    assert "application league-web: at most" in advice, context
    assert "SQLAlchemy pool_size=" in advice, context
    pool_findings = _table_section(report, "Pool findings")
    assert "connection churn" in pool_findings and "league-cron" in pool_findings, context
    # The result cache's scene: a rule at work, and a write through the proxy invalidating.
    cache = re.search(r"ran 8 times, (\d+) sent to PostgreSQL and (\d+) answered by sqlproxy",
                      " ".join(report.split()))
    assert cache and int(cache.group(2)) > 0, context

    # Everything it started is stopped and removed.
    for port in (listen, admin, *pg_ports):
        assert not _accepting(port), f"port {port} still accepting after the demo{context}"
    leaked = {pid: d for pid, d in _postmasters().items()
              if pid not in before and _owned_by(d, proc.pid)}
    assert not leaked, f"postgres left running by the demo: {leaked}"


# ------------------------------------------------------ installed with pip, as a new user would
PIP_TIMEOUT = 900  # seconds: the dependencies and the build requirements come from PyPI
WITHOUT_EXTRA = ("sqlproxy: the demo needs SQLAlchemy and greenlet, which are not installed: "
                 "pip install 'sqlproxy[demo]'\n")


def _user_env() -> dict[str, str]:
    """This environment without what would make the new venv see the repository's sqlproxy or
    configuration."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SQLPROXY_")
            and k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def _copy_source(dest: Path) -> None:
    """What the Dockerfile copies into its build: the package and its packaging files, without
    the tree's build artefacts (an editable install leaves compiled .so files in sqlproxy/)."""
    dest.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "sqlproxy", dest / "sqlproxy",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info"))


def _pip_install(venv: Path, requirement: str) -> None:
    # Interpreted (no mypyc): compiling takes minutes and is not what this checks.
    env = {**_user_env(), "SQLPROXY_NO_MYPYC": "1"}
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                          "--disable-pip-version-check", requirement],
                         env=env, capture_output=True, text=True, timeout=PIP_TIMEOUT)
    assert out.returncode == 0, f"pip install {requirement}:\n{out.stdout}\n{out.stderr}"


@pytest.mark.slow
def test_pip_install_without_then_with_the_demo_extra() -> None:
    """``pip install .`` then ``sqlproxy demo``: one line naming the extra, status 2; after
    ``pip install '.[demo]'`` the demo runs."""
    before = _postmasters()
    with tempfile.TemporaryDirectory(prefix="sqlproxy-pip-test-") as tmp:
        work = Path(tmp)
        src, venv = work / "src", work / "venv"
        _copy_source(src)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        _pip_install(venv, str(src))
        sqlproxy = str(venv / "bin" / "sqlproxy")

        out = subprocess.run([sqlproxy, "demo", "--exit"], cwd=work, env=_user_env(),
                             capture_output=True, text=True, timeout=120)
        assert (out.returncode, out.stdout, out.stderr) == (2, "", WITHOUT_EXTRA)

        _pip_install(venv, f"{src}[demo]")
        listen, admin = free_port(), free_port()
        proc, report, errors = _run_demo(
            [sqlproxy, "demo", "--exit", "--listen", f"127.0.0.1:{listen}",
             "--admin", f"127.0.0.1:{admin}"], cwd=work, env=_user_env())
    context = f"\n--- stdout ---\n{report}\n--- stderr ---\n{errors}"
    assert proc.returncode == 0, context
    assert "demo finished" in errors, context
    assert f"sqlproxy listening on 127.0.0.1:{listen}" in report, context
    assert "Findings" in report and "N+1 select" in report, context
    leaked = {pid: d for pid, d in _postmasters().items()
              if pid not in before and _owned_by(d, proc.pid)}
    assert not leaked, f"postgres left running by the demo: {leaked}"


# ------------------------------------------------------------------ the app on its own
@pytest.fixture
def league_db(pg_primary: PgCluster) -> str:
    name = "league_app_test"
    pg_primary.psql(f"DROP DATABASE IF EXISTS {name}")
    pg_primary.psql(f"CREATE DATABASE {name}")
    return name


@pytest.mark.slow
def test_league_app_through_the_proxy(proxy: ProxyThread, league_db: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sqlproxy.demo.app", "--connect-timeout", "30"],
        cwd=ROOT, env={**os.environ, "DATABASE_URL": proxy.dsn(dbname=league_db)},
        capture_output=True, text=True, timeout=DEMO_TIMEOUT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "league app: round 1 done" in out.stdout
    profiler = proxy.runtime.profiler if proxy.runtime is not None else None
    assert profiler is not None
    found, _ = proxy.call(lambda: profiler.findings(limit=100, database=league_db))
    kinds = {(f["kind"], f["application"]) for f in found}
    for kind in ("n_plus_one", "commit_per_row", "row_by_row_write", "unbounded_result",
                 "deep_offset", "repeated_query"):
        assert (kind, "league-site") in kinds, found


def test_demo_pool_traffic_gets_pool_advice(make_proxy: Any, league_db: str) -> None:
    """The demo's web tier and per-run job through a transaction pool of 4 (the demo's second
    sqlproxy): the report has the pool, sizing advice for pool.size and for the web tier's
    SQLAlchemy pools, and the job's connection churn."""
    from rich.console import Console

    from sqlproxy.demo import POOL_SIZE, workload
    from sqlproxy.demo.report import print_pool_report

    p = make_proxy(pool={"mode": "transaction", "size": POOL_SIZE})
    url = p.dsn(dbname=league_db)

    async def main() -> None:
        engine = workload.make_engine(url, "setup")
        async with engine.begin() as conn:
            await conn.run_sync(workload.Base.metadata.create_all)
            await conn.execute(text("INSERT INTO teams SELECT g, 'Team ' || g, 'City' "
                                    "FROM generate_series(1, :n) g"), {"n": workload.TEAMS})
            await conn.execute(text("INSERT INTO players (name, position, rating, team_id) "
                                    "SELECT 'P' || g, 'MF', 50, 1 + g % :n "
                                    "FROM generate_series(1, 100) g"), {"n": workload.TEAMS})
        await engine.dispose()
        await workload.web_tier(url, "league-web")
        await workload.connect_per_run(url, "league-cron")

    asyncio.run(main())
    time.sleep(0.3)  # the last clients' departures reach the pool
    rt = p.runtime
    assert rt is not None
    console = Console(record=True, width=160)
    data = p.call(lambda: print_pool_report(console, rt, rt.config))
    out = console.export_text()
    (pool,) = data["pools"]
    assert pool["max_clients"] >= workload.WEB_WORKERS * workload.WEB_POOL_SIZE
    assert pool["max_active"] <= POOL_SIZE
    assert any(a.startswith("application league-web: at most") for a in pool["advice"]), out
    for a in pool["advice"]:
        assert " ".join(a.split()[:4]) in " ".join(out.split())
    kinds = {(f["kind"], f["application"]) for f in data["findings"]}
    assert ("connection_churn", "league-cron") in kinds, out
    assert "Pool advice" in out and "connection churn" in out


@pytest.mark.parametrize(("args", "env", "message"), [
    ([], {}, "no database URL"),
    (["--url", "mysql://x/y"], {}, "expected a postgresql:// URL"),
    ([], {"DATABASE_URL": "sqlite:///x"}, "expected a postgresql:// URL"),
])
def test_league_app_refuses_bad_urls(args: list[str], env: dict[str, str], message: str) -> None:
    base = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    out = subprocess.run([sys.executable, "-m", "sqlproxy.demo.app", *args],
                         cwd=ROOT, env={**base, **env}, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    assert message in out.stderr


def test_listen_port_zero_is_a_chosen_free_port() -> None:
    from sqlproxy.demo import listen_address

    host, _, port = listen_address("127.0.0.1:0", 6432).rpartition(":")
    assert host == "127.0.0.1" and int(port) > 0
    assert listen_address("127.0.0.1:7000", 6432) == "127.0.0.1:7000"
