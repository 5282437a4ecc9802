"""Helpers for running real PostgreSQL clients (psql, pgbench, node-postgres, pgjdbc) in tests."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CLIENTS_DIR = Path(__file__).resolve().parent.parent / "integration" / "clients"
NODE_DIR = CLIENTS_DIR / "node"
JAVA_DIR = CLIENTS_DIR / "java"
M2_PGJDBC = Path.home() / ".m2" / "repository" / "org" / "postgresql" / "postgresql"


def unique_name(prefix: str) -> str:
    """A lower-case identifier no other test (or concurrent test run) will pick."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def client_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a client program: no ambient PG* variables, C locale."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update({"LC_ALL": "C", "LANG": "C", "PGCONNECT_TIMEOUT": "10"})
    if extra:
        env.update(extra)
    return env


def run(
    cmd: Sequence[str | Path],
    *,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    cwd: Path | None = None,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Run a program to completion and return its result; never raises on a non-zero exit."""
    return subprocess.run(
        [str(part) for part in cmd],
        input=input,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=dict(env) if env is not None else client_env(),
        timeout=timeout,
        check=False,
    )


def describe(result: subprocess.CompletedProcess[str]) -> str:
    """A failure message for an assert on ``result``."""
    return (
        f"{' '.join(map(str, result.args))} exited with {result.returncode}\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )


# --------------------------------------------------------------------------------------------
# node-postgres
# --------------------------------------------------------------------------------------------


def node_missing() -> str | None:
    """Why node-postgres tests cannot run here, or None."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    return f"{' and '.join(missing)} not on PATH" if missing else None


def ensure_node_modules(timeout: float = 300.0) -> None:
    """``npm install`` the node client's dependencies once (under a lock: runs may overlap)."""
    if (NODE_DIR / "node_modules" / "pg" / "package.json").is_file():
        return
    with (Path(tempfile.gettempdir()) / "sqlproxy-npm-install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (NODE_DIR / "node_modules" / "pg" / "package.json").is_file():
                return
            result = run(
                ["npm", "install", "--no-audit", "--no-fund", "--no-package-lock"],
                cwd=NODE_DIR,
                env={**os.environ},
                timeout=timeout,
            )
            if result.returncode != 0:
                raise RuntimeError(f"npm install failed\n{describe(result)}")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# pgjdbc
# --------------------------------------------------------------------------------------------


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))


def find_pgjdbc_jar() -> Path | None:
    """The highest-versioned pgjdbc jar in the local Maven repository, if any."""
    jars = [
        jar
        for jar in M2_PGJDBC.glob("*/postgresql-*.jar")
        if jar.name == f"postgresql-{jar.parent.name}.jar"
    ]
    return max(jars, key=_version_key) if jars else None


def java_missing() -> str | None:
    """Why pgjdbc tests cannot run here, or None."""
    missing = [tool for tool in ("java", "javac") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not on PATH"
    if find_pgjdbc_jar() is None:
        return f"no pgjdbc jar under {M2_PGJDBC}"
    return None


# --------------------------------------------------------------------------------------------
# Cancel tests: a query that sleeps until canceled, and how many such run on a server
# --------------------------------------------------------------------------------------------


async def sleep_until_canceled(conn: Any, marker: str) -> str:
    """Run ``SELECT pg_sleep(60), '<marker>'`` on a psycopg AsyncConnection: "canceled" when a
    cancel ends it (57014), "finished" otherwise."""
    import psycopg

    try:
        await conn.execute(f"SELECT pg_sleep(60), '{marker}'")
    except psycopg.errors.QueryCanceled:
        return "canceled"
    return "finished"


async def active_queries(observer: Any, marker: str) -> int:
    """How many statements tagged ``marker`` are running on the observer's (asyncpg) server."""
    return int(await observer.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
        "AND query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()", marker))
