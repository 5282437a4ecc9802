"""Proxy memory per idle client session, with many sessions: the RSS of every sqlproxy process
(supervisor and workers), read from /proc before and after opening N client sessions that
each authenticate, run one statement and then stay idle.

Without transaction pooling every client session holds a server connection, and a test
PostgreSQL cannot hold 10,000 backends on a small machine; so the proxy's "server" here is
PgBouncer in transaction pooling mode in front of a throwaway PostgreSQL (a real PostgreSQL
protocol peer holding 10,000 connections cheaply; what the proxy keeps per session does not
depend on what is behind it). The clients are minimal raw-protocol sessions in this process
(startup, one simple Query, idle), so that the client side stays small too.

    .venv/bin/python -m bench.sessions --sessions 10000 --workers 3
"""

from __future__ import annotations

import argparse
import asyncio
import struct
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
    Service,
    _chown_to,
    client_env,
    find_pgbouncer,
    find_sqlproxy,
    tree,
    wait_accepting,
)
from bench.workers import rss_kib  # noqa: E402
from tests.support import pg  # noqa: E402


async def _until_ready(reader: asyncio.StreamReader) -> None:
    while True:
        head = await reader.readexactly(5)
        (n,) = struct.unpack("!I", head[1:])
        body = await reader.readexactly(n - 4)
        if head[:1] == b"E":
            raise RuntimeError(body.decode(errors="replace"))
        if head[:1] == b"Z":
            return


async def session(port: int) -> asyncio.StreamWriter:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    params = f"user\0{DB_USER}\0database\0{DB_NAME}\0\0".encode()
    writer.write(struct.pack("!II", 8 + len(params), 196608) + params)
    await _until_ready(reader)
    q = b"select 1\0"
    writer.write(b"Q" + struct.pack("!I", 4 + len(q)) + q)
    await _until_ready(reader)
    return writer


async def open_sessions(port: int, n: int, batch: int) -> list[asyncio.StreamWriter]:
    out: list[asyncio.StreamWriter] = []
    for i in range(0, n, batch):
        out += await asyncio.gather(*(session(port) for _ in range(min(batch, n - i))))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--batch", type=int, default=200)
    args = ap.parse_args()
    sqlproxy, bouncer = find_sqlproxy(), find_pgbouncer(install=False)
    psql = str(pg.find_pg_bindir() / "psql")
    base = pg.make_base_dir()
    os_user = pg.server_os_user()
    primary = pg.start_primary(base)
    services: list[Service] = []
    try:
        work = base / "pgbouncer"
        work.mkdir()
        _chown_to(work, os_user, 0o700)
        bport = pg.free_port(LOOPBACK)
        userlist, ini = work / "userlist.txt", work / "pgbouncer.ini"
        userlist.write_text(f'"{DB_USER}" ""\n')
        ini.write_text(
            f"[databases]\n* = host={primary.host} port={primary.port}\n\n[pgbouncer]\n"
            f"listen_addr = {LOOPBACK}\nlisten_port = {bport}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {userlist}\npool_mode = transaction\n"
            f"max_client_conn = {args.sessions + 500}\ndefault_pool_size = 20\n"
            f"logfile = {work / 'pgbouncer.log'}\n")
        for path in (userlist, ini):
            _chown_to(path, os_user, 0o600)
        bouncer_svc = Service("pgbouncer", [bouncer, str(ini)], log_path=base / "pgb.log",
                              env=client_env(), cwd=work, os_user=os_user)
        bouncer_svc.start()
        services.append(bouncer_svc)
        wait_accepting(psql, LOOPBACK, bport, bouncer_svc)
        port = pg.free_port(LOOPBACK)
        env = client_env({
            "SQLPROXY_ANALYSIS__ENABLED": "true", "SQLPROXY_STATE__ENABLED": "false",
            "SQLPROXY_ADMIN__ENABLED": "false", "SQLPROXY_PROXY__SHUTDOWN_GRACE_SECONDS": "1",
            "SQLPROXY_PROXY__WORKERS": str(args.workers),
            "SQLPROXY_PROXY__MAX_CLIENT_CONNECTIONS": str(args.sessions + 1000)})
        svc = Service("sqlproxy", [sqlproxy, "serve", "--listen", f"{LOOPBACK}:{port}",
                                   "--primary", f"postgresql://{DB_USER}@{LOOPBACK}:{bport}/"
                                   f"{DB_NAME}"],
                      log_path=base / "sqlproxy.log", env=env, cwd=base)
        svc.start()
        services.append(svc)
        wait_accepting(psql, LOOPBACK, port, svc)
        time.sleep(2.0)
        before = rss_kib(svc.pid)

        async def run() -> tuple[int, int]:
            t0 = time.monotonic()
            writers = await open_sessions(port, args.sessions, args.batch)
            took = time.monotonic() - t0
            await asyncio.sleep(3.0)
            after = rss_kib(svc.pid)
            print(f"{len(writers)} sessions open in {took:.1f} s", flush=True)
            for w in writers:
                w.close()
            return len(writers), after

        opened, after = asyncio.run(run())
        print(f"workers={args.workers} processes={len(tree(svc.pid))} sessions={opened}: "
              f"RSS of all sqlproxy processes {before} KiB -> {after} KiB, "
              f"{(after - before) / opened:.1f} KiB per idle session")
    finally:
        for s in reversed(services):
            s.stop()
        primary.stop()
        pg.remove_base_dir(base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
