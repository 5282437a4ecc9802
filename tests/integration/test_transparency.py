"""What a client's driver sees of its server session is what it would see directly: its
backend's PID (BackendKeyData), that PID in NotificationResponse and pg_stat_activity,
termination by that PID, cancel requests that cancel exactly the query they name and are done
before the client's next statement, and an aborted COPY FROM STDIN.

node-postgres and pgjdbc run the same checks in tests/integration/test_clients.py
(``test_node_postgres_backend_pid``, ``test_pgjdbc_backend_pid``); routing on in
tests/routing/test_routing.py; TLS in tests/reliability/test_tls.py.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.reliability import rawclient
from tests.support.clients import active_queries, sleep_until_canceled, unique_name
from tests.support.pg import PgCluster
from tests.support.proxy import ProxyThread

QUERY_CANCELED = "57014"
ADMIN_SHUTDOWN = "57P01"


@pytest.fixture
def targets(proxy: ProxyThread, pg_primary: PgCluster) -> dict[str, str]:
    return {"direct": pg_primary.dsn(), "proxy": proxy.dsn()}


async def _until(condition: Any, what: str, timeout: float = 20.0) -> None:
    """Poll an async condition (a bounded wait, never a timing assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


# ------------------------------------------------------------------------------ the PID
def test_asyncpg_pid_is_the_server_backend(targets: dict[str, str]) -> None:
    async def scenario(dsn: str) -> None:
        channel = unique_name("pidchan")
        conn = await asyncpg.connect(dsn)
        try:
            pid = conn.get_server_pid()
            assert pid == await conn.fetchval("SELECT pg_backend_pid()")
            app = await conn.fetchval(
                "SELECT application_name FROM pg_stat_activity WHERE pid = $1", pid)
            assert app == await conn.fetchval("SHOW application_name")
            got: list[int] = []
            heard = asyncio.Event()

            def on_notify(_c: Any, sender: int, _ch: str, _payload: str) -> None:
                got.append(sender)
                heard.set()

            await conn.add_listener(channel, on_notify)
            await conn.execute(f"NOTIFY {channel}, 'self'")
            await asyncio.wait_for(heard.wait(), 10)
            # A LISTEN client can tell its own notifications by comparing PIDs.
            assert got == [pid]
        finally:
            await conn.close()

    for dsn in targets.values():
        asyncio.run(scenario(dsn))


def test_psycopg_pid_is_the_server_backend(targets: dict[str, str]) -> None:
    for dsn in targets.values():
        channel = unique_name("pidchan")
        with psycopg.connect(dsn, autocommit=True) as conn:
            pid = conn.info.backend_pid
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            assert row is not None and row[0] == pid
            conn.execute(f"LISTEN {channel}")
            conn.execute(f"NOTIFY {channel}, 'self'")
            notes = list(conn.notifies(timeout=10, stop_after=1))
            assert [(n.pid, n.payload) for n in notes] == [(pid, "self")]


def test_terminate_by_driver_pid_ends_exactly_that_session(
    targets: dict[str, str], pg_primary: PgCluster
) -> None:
    """A pool recycling a connection with pg_terminate_backend(<driver's pid>): that client's
    termination listener fires, its neighbour is untouched."""

    async def scenario(dsn: str) -> None:
        victim = await asyncpg.connect(dsn)
        neighbour = await asyncpg.connect(dsn)
        observer = await asyncpg.connect(pg_primary.dsn())
        try:
            closed = asyncio.Event()
            victim.add_termination_listener(lambda _c: closed.set())
            assert await observer.fetchval(
                "SELECT pg_terminate_backend($1)", victim.get_server_pid())
            await asyncio.wait_for(closed.wait(), 10)
            assert victim.is_closed()
            assert await neighbour.fetchval("SELECT 1") == 1
            assert not neighbour.is_closed()
        finally:
            for c in (victim, neighbour, observer):
                if not c.is_closed():
                    await c.close()

    for dsn in targets.values():
        asyncio.run(scenario(dsn))


def test_psycopg_terminated_by_its_pid_sees_admin_shutdown(targets: dict[str, str],
                                                           pg_primary: PgCluster) -> None:
    for dsn in targets.values():
        with psycopg.connect(dsn, autocommit=True) as conn:
            pg_primary.psql(f"SELECT pg_terminate_backend({conn.info.backend_pid})")
            with pytest.raises(psycopg.errors.AdminShutdown) as excinfo:
                for _ in range(200):  # until the FATAL has arrived
                    conn.execute("SELECT 1")
                    conn.execute("SELECT pg_sleep(0.05)")
            assert excinfo.value.sqlstate == ADMIN_SHUTDOWN
            assert conn.closed


# ------------------------------------------------------------------------------ cancel
def test_concurrent_cancels_cancel_exactly_their_query(proxy: ProxyThread,
                                                       pg_primary: PgCluster) -> None:
    async def scenario() -> None:
        markers = [unique_name(f"cc{i}") for i in range(6)]
        conns = [await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True)
                 for _ in markers]
        observer = await asyncpg.connect(pg_primary.dsn())

        tasks = [asyncio.create_task(sleep_until_canceled(c, m))
                 for c, m in zip(conns, markers, strict=True)]
        try:
            for m in markers:
                await _until(lambda m=m: active_queries(observer, m), f"{m} running")
            # Cancel every other one, all at once: each cancel reaches its own query only.
            await asyncio.gather(*(conns[i].cancel_safe() for i in range(0, 6, 2)))
            for i in range(0, 6, 2):
                assert await asyncio.wait_for(tasks[i], 20) == "canceled"
            for i in range(1, 6, 2):
                assert not tasks[i].done()
                assert await active_queries(observer, markers[i]) == 1
            for i in range(1, 6, 2):
                await conns[i].cancel_safe()
                assert await asyncio.wait_for(tasks[i], 20) == "canceled"
            # Usable afterwards, each with its own PID.
            pids = [(await (await c.execute("SELECT pg_backend_pid()")).fetchone())[0]
                    for c in conns]
            assert pids == [c.info.backend_pid for c in conns]
        finally:
            for t in tasks:
                t.cancel()
            for c in conns:
                await c.close()
            await observer.close()

    asyncio.run(scenario())


def test_cancel_is_done_before_the_client_goes_on(proxy: ProxyThread) -> None:
    """PostgreSQL closes a cancel connection once it has processed the request; a driver that
    waits for that (asyncpg does) must not see a later statement canceled by it."""

    async def scenario() -> None:
        conn = await asyncpg.connect(proxy.dsn())
        try:
            for _ in range(5):
                with pytest.raises((asyncio.TimeoutError, asyncpg.QueryCanceledError)):
                    await conn.fetch("SELECT pg_sleep(30)", timeout=0.2)
                assert await conn.fetchval("SELECT 7 FROM pg_sleep(0.2)") == 7
        finally:
            await conn.close()

    asyncio.run(scenario())


# ------------------------------------------------------------------------------ aborted COPY
async def _asyncpg_copy_abort(dsn: str, table: str) -> list[str]:
    out: list[str] = []
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"CREATE TABLE {table} (id int)")

        async def records() -> AsyncIterator[tuple[int]]:
            for i in range(20_000):
                yield (i,)
            raise ValueError("the record generator failed")

        for _ in range(5):
            # asyncpg sends CopyFail and a CancelRequest, re-raises the generator's error,
            # and waits for the cancel to be processed before its next statement.
            try:
                await conn.copy_records_to_table(table, records=records())
            except Exception as exc:
                out.append(f"{type(exc).__name__}: {exc}")
            try:
                # Long enough that a late cancel would hit it.
                out.append(str(await conn.fetchval(
                    f"SELECT count(*) FROM {table}, pg_sleep(0.2)")))
            except asyncpg.PostgresError as exc:
                out.append(f"next statement: {exc.sqlstate} {exc}")
        await conn.execute(f"DROP TABLE {table}")
    finally:
        await conn.close()
    return out


def test_asyncpg_aborted_copy_is_the_clients_error(targets: dict[str, str]) -> None:
    results = {name: asyncio.run(_asyncpg_copy_abort(dsn, unique_name("copyabort")))
               for name, dsn in targets.items()}
    assert results["proxy"] == results["direct"]
    assert results["proxy"] == ["ValueError: the record generator failed", "0"] * 5


def test_psycopg_aborted_copy_is_the_clients_error(targets: dict[str, str]) -> None:
    results: dict[str, list[str]] = {}
    for name, dsn in targets.items():
        table = unique_name("copyabort")
        out: list[str] = []
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE {table} (id int)")
            for _ in range(3):
                try:
                    with conn.cursor() as cur, cur.copy(f"COPY {table} FROM STDIN") as copy:
                        for i in range(20_000):
                            copy.write_row((i,))
                        raise ValueError("the record generator failed")
                except ValueError as exc:
                    out.append(f"ValueError: {exc}")
                row = conn.execute(f"SELECT count(*) FROM {table}, pg_sleep(0.1)").fetchone()
                out.append(str(row[0] if row else None))
            conn.execute(f"DROP TABLE {table}")
        results[name] = out
    assert results["proxy"] == results["direct"]
    assert results["proxy"] == ["ValueError: the record generator failed", "0"] * 3



def test_copy_fail_reaches_the_server_with_the_clients_message(
    proxy: ProxyThread, pg_primary: PgCluster, names_table: str
) -> None:
    """Some CopyData, then CopyFail: the server's error carries the client's message (57014
    "COPY from stdin failed: ..."), and the session is usable afterwards."""
    results: dict[str, list[str]] = {}
    for name, (host, port) in {"direct": (pg_primary.host, pg_primary.port),
                               "proxy": (proxy.host, proxy.port)}.items():
        sock = rawclient.connect(host, port)
        try:
            rawclient.startup(sock)
            rawclient.query(sock, f"COPY {names_table} FROM STDIN")
            while rawclient.read_message(sock)[0] != b"G":  # CopyInResponse
                pass
            row = b"1\n" * 1000
            sock.sendall((b"d" + struct.pack("!I", 4 + len(row)) + row) * 50)
            reason = b"the record generator failed\x00"
            sock.sendall(b"f" + struct.pack("!I", 4 + len(reason)) + reason)
            err = rawclient.error_of(sock)
            rawclient.until_ready(sock)
            rawclient.query(sock, f"SELECT count(*) FROM {names_table}")
            count = [body for t, body in rawclient.until_ready(sock) if t == b"D"]
            results[name] = [err["C"], err["M"], repr(count)]
        finally:
            sock.close()
    assert results["proxy"] == results["direct"]
    assert results["proxy"][:2] == [QUERY_CANCELED,
                                    "COPY from stdin failed: the record generator failed"]


@pytest.fixture
def names_table(pg_primary: PgCluster) -> Iterator[str]:
    name = unique_name("copyfail")
    pg_primary.psql(f"CREATE TABLE {name} (id int)")
    yield name
    pg_primary.psql(f"DROP TABLE IF EXISTS {name}")
