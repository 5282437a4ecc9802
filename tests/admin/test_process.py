"""`sqlproxy serve` as a real process: the admin API comes up on --admin, and SIGTERM (owned
by the proxy, not uvicorn) stops both servers cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from tests.support import pg


def test_serve_with_admin_stops_on_sigterm(pg_primary: pg.PgCluster) -> None:
    listen, admin = pg.free_port(), pg.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SQLPROXY_")}
    env.update(SQLPROXY_STATE__ENABLED="false", SQLPROXY_LOG__FORMAT="json")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sqlproxy", "serve", "--listen", f"127.0.0.1:{listen}",
         "--admin", f"127.0.0.1:{admin}", "--primary", pg_primary.dsn()],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{admin}/healthz", timeout=2)
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "admin API did not come up"
            time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{admin}/api/queries").json()["total"] >= 0
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert '"event": "stopped"' in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
