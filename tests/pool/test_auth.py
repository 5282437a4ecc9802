"""Logins checked by the proxy in transaction mode (``pool.auth_user``, as PgBouncer's
``auth_query``): the SCRAM/MD5 server side against the real client side, and end to end with
the real SCRAM and MD5 users of the test cluster: connection-per-transaction clients do not
churn server connections, and a wrong password is refused as the server refuses it."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from sqlproxy.errors import ProtocolViolation
from sqlproxy.pool.auth import LoginServer, PasswordFailed
from sqlproxy.routing.replica_login import ReplicaLogin
from sqlproxy.routing.scram import ScramClient, ScramVerifier, keys_from_password
from sqlproxy.wire.messages import build
from tests.pool.test_pooling import bench_db, pools_of, server_connections  # noqa: F401
from tests.support.clients import client_env
from tests.support.pg import MD5_USER, SCRAM_USER, PgCluster, find_pg_bindir
from tests.support.proxy import ProxyThread

SALT = b"0123456789abcdef"


def _verifier(password: str, iterations: int = 4096) -> str:
    import base64

    k = keys_from_password(password, SALT, iterations)
    b = base64.b64encode
    return (f"SCRAM-SHA-256${iterations}:{b(SALT).decode()}$"
            f"{b(k.stored_key).decode()}:{b(k.server_key).decode()}")


def _scram(server: LoginServer, password: str) -> bytes:
    """A whole exchange with a client holding ``password``; the server's last answer."""
    client = ScramClient(password=password)
    assert server.start()[5:9] == (10).to_bytes(4, "big")
    cont = server.receive(client.initial_response())
    final = server.receive(client.final_message(cont[9:].decode()))
    client.verify_final(final[9:].decode())  # the proxy holds the verifier: signature right
    return final


# ------------------------------------------------------------------------------ pure parts
def test_scram_login_recovers_the_client_key() -> None:
    server = LoginServer("alice", _verifier("s3cret"))
    _scram(server, "s3cret")
    assert server.done and server.scram_keys is not None
    assert server.scram_keys.client_key == keys_from_password("s3cret", SALT, 4096).client_key
    # The keys log in to a server that holds the same verifier.
    again = LoginServer("alice", _verifier("s3cret"))
    login = ReplicaLogin("alice", None, server.scram_keys)
    sasl = login.receive(ord("R"), again.start())
    cont = again.receive(sasl[5:])
    final = login.receive(ord("R"), cont)
    again.receive(final[5:])
    assert again.done and login.problem is None


def test_scram_wrong_password_is_28p01() -> None:
    server = LoginServer("alice", _verifier("s3cret"))
    with pytest.raises(PasswordFailed) as err:
        _scram(server, "wrong")
    assert err.value.sqlstate == "28P01"
    assert err.value.message == 'password authentication failed for user "alice"'
    assert not server.done and server.scram_keys is None


def test_scram_malformed_and_channel_binding_are_protocol_violations() -> None:
    server = LoginServer("alice", _verifier("s3cret"))
    server.start()
    with pytest.raises(ProtocolViolation, match="invalid SASL authentication mechanism"):
        server.receive(b"SCRAM-SHA-256-PLUS\x00\x00\x00\x00\x05p=x,,")
    server = LoginServer("alice", _verifier("s3cret"))
    first = b"p=tls-server-end-point,,n=,r=abc"
    with pytest.raises(ProtocolViolation, match="channel binding"):
        server.receive(b"SCRAM-SHA-256\x00" + len(first).to_bytes(4, "big") + first)
    assert not LoginServer.usable(None) and not LoginServer.usable("plain")
    assert LoginServer.usable(_verifier("x")) and LoginServer.usable("md5" + "0" * 32)
    assert ScramVerifier.parse(_verifier("x")).iterations == 4096


def test_md5_login_and_the_hash_logs_in() -> None:
    import hashlib

    stored = "md5" + hashlib.md5(b"pw" + b"bob").hexdigest()
    server = LoginServer("bob", stored)
    salt = server.start()[9:13]
    inner = hashlib.md5(b"pw" + b"bob").hexdigest().encode()
    answer = b"md5" + hashlib.md5(inner + salt).hexdigest().encode() + b"\x00"
    assert server.receive(answer) == b"" and server.done and server.md5_hash == stored
    # What the proxy sends the server with the hash is what the client would have sent.
    login = ReplicaLogin("bob", None, None, stored)
    assert login.receive(ord("R"), build(b"R", b"\x00\x00\x00\x05" + salt)) == build(
        b"p", answer)
    bad = LoginServer("bob", stored)
    bad.start()
    with pytest.raises(PasswordFailed):
        bad.receive(b"md5" + b"0" * 32 + b"\x00")


# ------------------------------------------------------------------------------ end to end
def _auth_proxy(make_proxy: Callable[..., ProxyThread], **pool: Any) -> ProxyThread:
    return make_proxy(pool={"mode": "transaction", "size": 2, "auth_user": "postgres", **pool})


@pytest.fixture
def user_db(pg_primary: PgCluster, bench_db: str) -> str:  # noqa: F811
    pg_primary.psql(f"GRANT ALL ON DATABASE {bench_db} TO {SCRAM_USER.name}, {MD5_USER.name}")
    pg_primary.psql(f"GRANT ALL ON SCHEMA public TO {SCRAM_USER.name}, {MD5_USER.name}",
                    dbname=bench_db)
    return bench_db


@pytest.mark.parametrize("user", [SCRAM_USER, MD5_USER], ids=["scram", "md5"])
def test_connection_per_transaction_does_not_churn_server_connections(
    make_proxy: Callable[..., ProxyThread], pg_primary: PgCluster, user_db: str, user: Any,
) -> None:
    p = _auth_proxy(make_proxy)
    dsn = p.dsn(user.name, user.password, user_db)
    for i in range(30):
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SELECT current_user, %s::int", (i,)).fetchone() == (
                user.name, i)
    (pool,) = pools_of(p)
    assert pool["servers_opened"] <= 2, pool
    assert pool["servers_closed"].get("login", 0) == 0, pool
    assert server_connections(pg_primary, user_db) <= 2
    rt = p.runtime
    assert rt is not None and rt.proxy.pools is not None
    assert p.call(lambda: rt.proxy.pools.auth.lookups) == 30  # type: ignore[union-attr]


def _refusal(dsn: str) -> tuple[str, str, str]:
    """(severity, SQLSTATE, message) of a refused login, as asyncpg reads the ErrorResponse."""
    import asyncio

    import asyncpg

    async def main() -> tuple[str, str, str]:
        with pytest.raises(asyncpg.PostgresError) as err:
            await asyncpg.connect(dsn, timeout=10)
        e = err.value
        return str(e.severity), str(e.sqlstate), str(e.args[0])

    return asyncio.run(main())


@pytest.mark.parametrize("user", [SCRAM_USER, MD5_USER], ids=["scram", "md5"])
def test_wrong_password_is_refused_as_the_server_refuses_it(
    make_proxy: Callable[..., ProxyThread], pg_primary: PgCluster, user_db: str, user: Any,
) -> None:
    p = _auth_proxy(make_proxy)
    with psycopg.connect(p.dsn(user.name, user.password, user_db), autocommit=True) as ok:
        direct = _refusal(pg_primary.dsn(user=user.name, password="wrong", dbname=user_db))
        proxied = _refusal(p.dsn(user.name, "wrong", user_db))
        assert proxied == direct == (
            "FATAL", "28P01", f'password authentication failed for user "{user.name}"')
        assert ok.execute("SELECT 1").fetchone() == (1,)  # nobody else hurt
    (pool,) = pools_of(p)
    assert pool["servers_opened"] <= 1


def test_without_a_verifier_the_login_goes_through(
    make_proxy: Callable[..., ProxyThread], user_db: str,
) -> None:
    """auth_user that cannot log in: the lookup fails (logged once), logins pass through."""
    p = _auth_proxy(make_proxy, auth_user="no_such_role")
    for _ in range(2):
        with psycopg.connect(p.dsn(SCRAM_USER.name, SCRAM_USER.password, user_db)) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (SCRAM_USER.name,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(p.dsn(SCRAM_USER.name, "wrong", user_db)).close()


def test_pgbench_connect_per_transaction_with_a_scram_user(
    make_proxy: Callable[..., ProxyThread], pg_primary: PgCluster, user_db: str,
) -> None:
    """pgbench -C (a new connection per transaction), 4 clients, as the SCRAM user: every
    transaction done, and the pool opened at most its size."""
    env = {**client_env(), "PGPASSWORD": SCRAM_USER.password}
    bindir = find_pg_bindir()
    init = subprocess.run([f"{bindir}/pgbench", "-i", "-s", "1", "-q",
                           pg_primary.dsn(user=SCRAM_USER.name, password=SCRAM_USER.password,
                                          dbname=user_db)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    p = _auth_proxy(make_proxy)
    out = subprocess.run([f"{bindir}/pgbench", "-C", "-S", "-c", "4", "-t", "50", "-n",
                          p.dsn(SCRAM_USER.name, SCRAM_USER.password, user_db)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "number of transactions actually processed: 200/200" in out.stdout, out.stdout
    time.sleep(0.2)
    (pool,) = pools_of(p)
    assert pool["servers_opened"] <= 2, pool


def test_a_changed_password_takes_effect_at_the_next_login(
    make_proxy: Callable[..., ProxyThread], pg_primary: PgCluster, user_db: str,
) -> None:
    """The verifier is read per login: after ALTER ROLE ... PASSWORD the old password is
    refused (28P01) and the new one works, also for a session that logged in before. (The
    test cluster's pg_hba.conf trusts a new role: this checks the proxy's side only.)"""
    role = "auth_changes"
    pg_primary.psql(f"DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN PASSWORD 'one'; "
                    f"GRANT ALL ON DATABASE {user_db} TO {role}")
    p = _auth_proxy(make_proxy, size=4)
    try:
        with psycopg.connect(p.dsn(role, "one", user_db), autocommit=True) as before:
            assert before.execute("SELECT current_user").fetchone() == (role,)
            pg_primary.psql(f"ALTER ROLE {role} PASSWORD 'two'")
            assert _refusal(p.dsn(role, "one", user_db))[1:] == (
                "28P01", f'password authentication failed for user "{role}"')
            with psycopg.connect(p.dsn(role, "two", user_db), autocommit=True) as after:
                assert after.execute("SELECT current_user").fetchone() == (role,)
            # Both sessions busy at once: the pool opens servers with what it last proved.
            with before.transaction(), \
                    psycopg.connect(p.dsn(role, "two", user_db)) as other:
                before.execute("SELECT 1")
                assert other.execute("SELECT current_user").fetchone() == (role,)
    finally:
        p.stop()
        pg_primary.psql(f"REVOKE ALL ON DATABASE {user_db} FROM {role}; DROP ROLE {role}")


def test_after_a_password_change_new_servers_log_in_with_the_new_keys(
    make_proxy: Callable[..., ProxyThread], pg_primary: PgCluster, user_db: str,
) -> None:
    """The SCRAM user (pg_hba.conf asks it for SCRAM): once a login proved the new password,
    the pool opens its next server connections with the new ClientKey."""
    user = SCRAM_USER
    p = _auth_proxy(make_proxy, size=4)
    try:
        with psycopg.connect(p.dsn(user.name, user.password, user_db)) as first:
            first.execute("SELECT 1")  # a transaction: holds the pool's only server
            pg_primary.psql(f"ALTER ROLE {user.name} PASSWORD 'changed_pw'")
            with psycopg.connect(p.dsn(user.name, "changed_pw", user_db),
                                 autocommit=True) as second:
                # A server of its own, opened now: logged in with the new keys.
                assert second.execute("SELECT current_user").fetchone() == (user.name,)
            first.commit()
        (pool,) = pools_of(p)
        assert pool["servers_opened"] == 2 and pool["open_failures"] == 0, pool
    finally:
        pg_primary.psql(f"ALTER ROLE {user.name} PASSWORD '{user.password}'")
