"""TLS on both sides: psql and asyncpg with sslmode=require/verify-full against the proxy (a
test CA made here), tls.client_mode=require, proxy-to-server TLS with verify-full, and SCRAM
through two TLS sessions (channel binding is not offered across the proxy)."""

from __future__ import annotations

import asyncio
import shutil
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.reliability import rawclient
from tests.support import pg
from tests.support.certs import TestCA, make_ca
from tests.support.clients import client_env, describe, run
from tests.support.proxy import ProxyThread


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return make_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def proxy_cert(ca: TestCA, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return ca.issue(tmp_path_factory.mktemp("proxycert"), "proxy")


@pytest.fixture(scope="module")
def tls_primary(pg_bindir: Path, pg_base_dir: Path, ca: TestCA,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[pg.PgCluster]:
    """A separate primary with ssl = on (the shared one stays clear-text)."""
    cluster = pg.start_primary(pg_base_dir, "tlsprimary", bindir=pg_bindir)
    try:
        cert, key = ca.issue(tmp_path_factory.mktemp("pgcert"), "server")
        for src, name in ((cert, "server.crt"), (key, "server.key")):
            dst = cluster.datadir / name
            shutil.copy(src, dst)
            pg._chown_to(dst, cluster.os_user, 0o600)
        cluster.settings.update(ssl=True, ssl_cert_file="server.crt", ssl_key_file="server.key")
        cluster.restart()
        yield cluster
    finally:
        cluster.stop()


def _tls_proxy(make_proxy: Callable[..., ProxyThread], cert: tuple[Path, Path],
               primary: str | None = None, **tls: str) -> ProxyThread:
    return make_proxy(primary, tls={"cert_file": str(cert[0]), "key_file": str(cert[1]), **tls})


def _psql(proxy: ProxyThread, conninfo: str, sql: str,
          password: str | None = None) -> tuple[int, str, str]:
    env = client_env({"PGPASSWORD": password} if password else None)
    r = run([pg.find_pg_bindir() / "psql", "-X", "-At", "-d",
             f"port={proxy.port} {conninfo}", "-c", sql], env=env, timeout=60)
    return r.returncode, r.stdout.strip(), r.stderr + describe(r)


def _verify_full(ca: TestCA) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca.ca_cert))


def test_psql_and_asyncpg_verify_full(make_proxy: Callable[..., ProxyThread], ca: TestCA,
                                      proxy_cert: tuple[Path, Path]) -> None:
    proxy = _tls_proxy(make_proxy, proxy_cert)
    for host in ("localhost", "127.0.0.1"):
        rc, out, err = _psql(proxy, f"host={host} user=postgres dbname=postgres "
                             f"sslmode=verify-full sslrootcert={ca.ca_cert}", "select 6 * 7")
        assert rc == 0 and out == "42", err
    rc, out, err = _psql(proxy, "host=127.0.0.1 user=postgres dbname=postgres sslmode=require",
                         "select 1")
    assert rc == 0 and out == "1", err

    async def main() -> None:
        conn = await asyncpg.connect(host="localhost", port=proxy.port, user="postgres",
                                     database="postgres", ssl=_verify_full(ca))
        assert await conn.fetchval("select $1::int + 1", 41) == 42
        # The server backend's PID, and a cancel (sent over TLS too) that ends the query.
        assert conn.get_server_pid() == await conn.fetchval("select pg_backend_pid()")
        with pytest.raises((asyncio.TimeoutError, asyncpg.QueryCanceledError)):
            await conn.fetch("select pg_sleep(30)", timeout=0.3)
        assert await conn.fetchval("select 1 from pg_sleep(0.1)") == 1
        tls = proxy.call(lambda: [(s.tls, s.relay) for s in proxy.runtime.proxy.sessions.values()])  # type: ignore[union-attr]
        assert tls and all(t is not None and t.startswith("TLS") for t, _ in tls)
        assert all(relay is None for _, relay in tls)  # TLS stays on the transports
        await conn.close()
        # Clear text is still allowed with the default client_mode "allow".
        conn = await asyncpg.connect(proxy.dsn(), ssl=False)
        assert await conn.fetchval("select 1") == 1
        relays = proxy.call(lambda: [s.relay for s in proxy.runtime.proxy.sessions.values()])  # type: ignore[union-attr]
        assert len(relays) == 1 and relays[0] is not None  # ... and clear text is relayed
        await conn.close()

    asyncio.run(main())


def test_wrong_ca_is_rejected_by_the_client(make_proxy: Callable[..., ProxyThread],
                                            proxy_cert: tuple[Path, Path],
                                            tmp_path: Path) -> None:
    other = make_ca(tmp_path, "other")
    proxy = _tls_proxy(make_proxy, proxy_cert)
    rc, _, err = _psql(proxy, f"host=localhost user=postgres sslmode=verify-full "
                       f"sslrootcert={other.ca_cert}", "select 1")
    assert rc != 0 and "certificate verify failed" in err
    rc, _, err = _psql(proxy, "host=localhost user=postgres sslmode=disable", "select 1")
    assert rc == 0, err  # the failed handshake did not hurt the proxy


def test_client_mode_require_refuses_clear_text(make_proxy: Callable[..., ProxyThread],
                                                ca: TestCA,
                                                proxy_cert: tuple[Path, Path]) -> None:
    proxy = _tls_proxy(make_proxy, proxy_cert, client_mode="require")
    rc, _, err = _psql(proxy, "host=localhost user=postgres sslmode=disable", "select 1")
    assert rc != 0 and 'tls.client_mode is "require"' in err

    async def main() -> None:
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
            await asyncpg.connect(proxy.dsn(), ssl=False)
        conn = await asyncpg.connect(host="localhost", port=proxy.port, user="postgres",
                                     database="postgres", ssl=_verify_full(ca))
        assert await conn.fetchval("select 1") == 1
        await conn.close()

    asyncio.run(main())


def test_proxy_to_server_tls_and_scram_through_both(
    make_proxy: Callable[..., ProxyThread], tls_primary: pg.PgCluster, ca: TestCA,
    proxy_cert: tuple[Path, Path],
) -> None:
    proxy = _tls_proxy(make_proxy, proxy_cert, tls_primary.dsn(),
                       server_sslmode="verify-full", ca_file=str(ca.ca_cert))
    user = pg.SCRAM_USER
    check = "select ssl from pg_stat_ssl where pid = pg_backend_pid()"
    # SCRAM-SHA-256-PLUS is not relayed: channel binding cannot span two TLS sessions.
    rc, out, err = _psql(proxy, f"host=localhost user={user.name} dbname=postgres "
                         f"sslmode=verify-full sslrootcert={ca.ca_cert} channel_binding=disable",
                         check, password=user.password)
    assert rc == 0 and out == "t", err
    rc, _, err = _psql(proxy, f"host=localhost user={user.name} dbname=postgres "
                       f"sslmode=require channel_binding=require", check, password=user.password)
    assert rc != 0 and "channel binding" in err
    # libpq's default (channel_binding=prefer) over TLS, not offered PLUS, sends the SCRAM
    # "y" flag ("I could bind, the server cannot"); a TLS server treats that as a downgrade
    # attack and refuses. The flag is covered by the client's proof, so a proxy cannot
    # rewrite it: such clients need channel_binding=disable (see docs/reliability.md).
    rc, _, err = _psql(proxy, f"host=localhost user={user.name} dbname=postgres "
                       "sslmode=require", check, password=user.password)
    assert rc != 0 and "channel binding negotiation" in err
    rc, out, err = _psql(proxy, f"host=localhost user={user.name} dbname=postgres "
                         "sslmode=disable", check, password=user.password)
    assert rc == 0 and out == "t", err  # the server side is TLS whatever the client does

    async def main() -> None:
        conn = await asyncpg.connect(host="localhost", port=proxy.port, user=user.name,
                                     password=user.password, database="postgres",
                                     ssl=_verify_full(ca))
        assert await conn.fetchval(check) is True
        await conn.close()
        # A clear-text client of a TLS server: the server side keeps its transport.
        conn = await asyncpg.connect(host="localhost", port=proxy.port, user=user.name,
                                     password=user.password, database="postgres", ssl=False)
        assert await conn.fetchval(check) is True
        relays = proxy.call(lambda: [s.relay for s in proxy.runtime.proxy.sessions.values()])  # type: ignore[union-attr]
        assert relays == [None]
        await conn.close()

    asyncio.run(main())


def test_server_sslmode_failures_are_08006(
    make_proxy: Callable[..., ProxyThread], pg_primary: pg.PgCluster,
    tls_primary: pg.PgCluster, tmp_path: Path,
) -> None:
    async def error_of(proxy: ProxyThread) -> asyncpg.PostgresError:
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncpg.connect(proxy.dsn())
        return info.value

    plain = make_proxy(tls={"server_sslmode": "require"})  # the shared primary has ssl off
    err = asyncio.run(error_of(plain))
    assert err.sqlstate == "08006" and "does not support SSL" in str(err)
    other = make_ca(tmp_path, "other")
    wrong_ca = make_proxy(tls_primary.dsn(), tls={"server_sslmode": "verify-ca",
                                                  "ca_file": str(other.ca_cert)})
    err = asyncio.run(error_of(wrong_ca))
    assert err.sqlstate == "08006" and "certificate verify failed" in str(err).lower()
    # A per-backend ?sslmode= in the URL wins over tls.server_sslmode.
    url = make_proxy(tls_primary.dsn() + "?sslmode=disable",
                     tls={"server_sslmode": "verify-full", "ca_file": str(other.ca_cert)})

    async def main() -> None:
        conn = await asyncpg.connect(url.dsn())
        assert await conn.fetchval(
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()") is False
        await conn.close()

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# Direct TLS (PostgreSQL 17 sslnegotiation=direct): the first byte is a ClientHello, no SSLRequest
# ---------------------------------------------------------------------------------------------

def _direct(proxy: ProxyThread, ca: TestCA | None = None,
            alpn: list[str] | None = None) -> ssl.SSLSocket:
    """A TLS connection started at once (no SSLRequest), with Python's ssl module."""
    if ca is not None:
        ctx = _verify_full(ca)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    return ctx.wrap_socket(rawclient.connect(proxy.host, proxy.port), server_hostname="localhost")


def _libpq_direct_tls() -> str | None:
    """Why psycopg's libpq cannot test sslnegotiation=direct here, or None if it can."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed"
    if psycopg.pq.version() < 170000:
        return f"psycopg's libpq {psycopg.pq.version()} predates sslnegotiation=direct (17)"
    return None


def test_direct_tls_end_to_end_with_alpn(make_proxy: Callable[..., ProxyThread], ca: TestCA,
                                         proxy_cert: tuple[Path, Path]) -> None:
    proxy = _tls_proxy(make_proxy, proxy_cert, client_mode="require")
    with _direct(proxy, ca, alpn=["postgresql"]) as sock:
        assert sock.selected_alpn_protocol() == "postgresql"
        rawclient.startup(sock)
        rawclient.query(sock, "select 6 * 7")
        msgs = rawclient.until_ready(sock)
        rows = [body for t, body in msgs if t == b"D"]
        assert len(rows) == 1 and rows[0].endswith(b"42")
        assert [t for t, _ in msgs][-2:] == [b"C", b"Z"]
        # client_mode "require" accepted it: the session knows it is on TLS.
        tls = proxy.call(lambda: [s.tls for s in proxy.runtime.proxy.sessions.values()])  # type: ignore[union-attr]
        assert tls and all(t is not None and t.startswith("TLS") for t in tls)
        sock.sendall(b"X\x00\x00\x00\x04")
    # The negotiated path (SSLRequest) and its refusal of clear text are unchanged.
    rc, out, err = _psql(proxy, f"host=localhost user=postgres dbname=postgres "
                         f"sslmode=verify-full sslrootcert={ca.ca_cert}", "select 1")
    assert rc == 0 and out == "1", err
    rc, _, err = _psql(proxy, "host=localhost user=postgres sslmode=disable", "select 1")
    assert rc != 0 and 'tls.client_mode is "require"' in err
    assert proxy.call(lambda: proxy.runtime.proxy._listener.direct_tls) == 1  # type: ignore[union-attr]


def test_direct_tls_without_alpn_is_refused(make_proxy: Callable[..., ProxyThread],
                                            proxy_cert: tuple[Path, Path]) -> None:
    proxy = _tls_proxy(make_proxy, proxy_cert)
    for alpn in (None, ["http/1.1"]):
        with _direct(proxy, alpn=alpn) as sock:
            assert sock.selected_alpn_protocol() is None
            err = rawclient.error_of(sock)
            assert err["C"] == "08P01" and "ALPN" in err["M"], err
            assert rawclient.closed(sock)
    assert proxy.call(lambda: proxy.runtime.proxy._listener.refused) == 2  # type: ignore[union-attr]
    assert proxy.call(lambda: len(proxy.runtime.proxy.sessions)) == 0  # type: ignore[union-attr]


def test_libpq_sslnegotiation_direct(make_proxy: Callable[..., ProxyThread], ca: TestCA,
                                     proxy_cert: tuple[Path, Path]) -> None:
    reason = _libpq_direct_tls()
    if reason is not None:
        pytest.skip(reason)
    import psycopg

    proxy = _tls_proxy(make_proxy, proxy_cert)
    for conninfo in (f"sslmode=verify-full sslrootcert={ca.ca_cert}", "sslmode=require"):
        with psycopg.connect(f"host=localhost port={proxy.port} user=postgres dbname=postgres "
                             f"sslnegotiation=direct {conninfo}", autocommit=True) as conn:
            assert conn.pgconn.ssl_in_use
            assert conn.execute("select %s::int + 1", [41]).fetchone() == (42,)
            with conn.cursor() as cur:  # a larger result over the same TLS session
                cur.execute("select g, repeat('x', 100) from generate_series(1, 20000) g")
                assert len(cur.fetchall()) == 20000
    assert proxy.call(lambda: proxy.runtime.proxy._listener.direct_tls) == 2  # type: ignore[union-attr]


def test_direct_tls_without_certificate_is_closed(make_proxy: Callable[..., ProxyThread],
                                                  proxy_cert: tuple[Path, Path]) -> None:
    plain = make_proxy()  # no certificate: the plain server, as before
    disabled = _tls_proxy(make_proxy, proxy_cert, client_mode="disable")
    for proxy in (plain, disabled):
        with pytest.raises((ssl.SSLError, OSError)):
            _direct(proxy, alpn=["postgresql"]).close()
        rc, out, err = _psql(proxy, "host=localhost user=postgres sslmode=prefer", "select 1")
        assert rc == 0 and out == "1", err
        # What the proxy says (and logs), seen by a client that can read clear text.
        with rawclient.connect(proxy.host, proxy.port) as sock:
            sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            err_fields = rawclient.error_of(sock)
            assert err_fields["C"] == "08P01" and "tls.cert_file" in err_fields["M"], err_fields
            assert rawclient.closed(sock)
    reason = _libpq_direct_tls()
    if reason is None:
        import psycopg

        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(f"host=localhost port={plain.port} user=postgres "
                            "sslmode=require sslnegotiation=direct", connect_timeout=10)


def test_listener_keeps_startup_timeout(make_proxy: Callable[..., ProxyThread],
                                        proxy_cert: tuple[Path, Path]) -> None:
    proxy = make_proxy(proxy={"startup_timeout": 0.5},
                       tls={"cert_file": str(proxy_cert[0]), "key_file": str(proxy_cert[1])})
    for first in (b"", b"\x00\x00"):  # silent, then half a length word
        with rawclient.connect(proxy.host, proxy.port) as sock:
            if first:
                sock.sendall(first)
            err = rawclient.error_of(sock)
            assert err["C"] == "08P01" and "startup_timeout" in err["M"], err
            assert rawclient.closed(sock)
    with _direct(proxy, alpn=["postgresql"]) as sock:  # a TLS client that then says nothing
        err = rawclient.error_of(sock)
        assert err["C"] == "08P01" and "startup_timeout" in err["M"], err


def test_replica_connections_use_tls(
    make_proxy: Callable[..., ProxyThread], tls_primary: pg.PgCluster, ca: TestCA,
    pg_base_dir: Path,
) -> None:
    """Routed reads reach a TLS replica over verify-full TLS, as the primary's do."""
    replica = pg.start_replica(tls_primary, pg_base_dir, "tlsreplica")
    try:
        replica.settings.update(ssl=True, ssl_cert_file="server.crt", ssl_key_file="server.key")
        replica.restart()
        replica.wait_for_replay()
        proxy = make_proxy(tls_primary.dsn(),
                           tls={"server_sslmode": "verify-full", "ca_file": str(ca.ca_cert)},
                           routing={"enabled": True, "health_interval_ms": 100},
                           replicas=[{"url": replica.dsn(),
                                      "name": "tlsr"}])

        async def main() -> tuple[bool, bool]:
            conn = await asyncpg.connect(proxy.dsn(), ssl=False)
            try:
                for _ in range(100):  # until the router has the replica in rotation
                    # pg_backend_pid() runs on the primary unless hinted (the client's
                    # PID is the primary backend's).
                    row = await conn.fetchrow(
                        "/* sqlproxy:replica */ select pg_is_in_recovery() as standby, ssl "
                        "from pg_stat_ssl where pid = pg_backend_pid()")
                    assert row is not None
                    if row["standby"]:
                        return row["standby"], row["ssl"]
                    await asyncio.sleep(0.1)
                return False, False
            finally:
                await conn.close()

        standby, encrypted = asyncio.run(main())
        assert standby, "no read reached the replica"
        assert encrypted, "the replica connection is not TLS"
    finally:
        replica.stop()
