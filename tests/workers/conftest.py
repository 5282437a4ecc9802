"""A real ``sqlproxy serve`` with worker processes (threads cannot share a port by
SO_REUSEPORT and be killed one by one)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import pg

ROOT = Path(__file__).resolve().parents[2]


class Served:
    """A running ``sqlproxy serve`` with workers, its log and its addresses."""

    def __init__(self, popen: subprocess.Popen[str], log: Path, port: int,
                 admin_port: int) -> None:
        self.popen = popen
        self.log = log
        self.port = port
        self.admin_port = admin_port

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{pg.SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if name is None or e.get("event") == name:
                out.append(e)
        return out

    def wait_events(self, name: str, count: int = 1, timeout: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(name)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"fewer than {count} {name} events; log:\n"
                             f"{self.log.read_text()[-4000:]}")

    def worker_pids(self) -> dict[int, int]:
        """worker index -> pid of its current process."""
        out: dict[int, int] = {}
        for e in self.events("worker_started"):
            out[int(e["worker"])] = int(e["pid"])
        return out

    def api(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}",
                                    timeout=30) as resp:
            body = resp.read().decode()
        return json.loads(body) if path.startswith("/api") else body

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(60)


def write_config(path: Path, port: int, admin_port: int, primary: str, state: Path,
                 workers: int = 2, extra: str = "") -> None:
    path.write_text(f"""
[proxy]
listen = "127.0.0.1:{port}"
primary = "{primary}"
workers = {workers}
shutdown_grace_seconds = 3
{extra}
[admin]
listen = "127.0.0.1:{admin_port}"
[state]
path = "{state}"
snapshot_seconds = 3600
[log]
format = "json"
""")


@pytest.fixture
def serve_workers(tmp_path: Path, pg_primary: pg.PgCluster) -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(workers: int = 2, extra: str = "") -> Served:
        port, admin_port = pg.free_port(), pg.free_port()
        cfg = tmp_path / f"sqlproxy-{len(started)}.toml"
        write_config(cfg, port, admin_port, pg_primary.dsn(), tmp_path / "state.sqlite",
                     workers, extra)
        log = tmp_path / f"sqlproxy-{len(started)}.log"
        with log.open("w") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "sqlproxy", "serve", "--config", str(cfg)],
                cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, text=True,
                env={**{k: v for k, v in os.environ.items() if not k.startswith("SQLPROXY_")},
                     "PYTHONPATH": str(ROOT)},
            )
        served = Served(popen, log, port, admin_port)
        started.append(served)
        deadline = time.monotonic() + 60
        while not [e for e in served.events("started") if "workers" in e]:
            assert popen.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "sqlproxy did not start:\n" + log.read_text()
            time.sleep(0.1)
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        return served

    yield start
    for s in started:
        if s.popen.poll() is None:
            s.popen.kill()
            s.popen.wait(10)
