"""The PostgreSQL test harness builds what the rest of the suite assumes it does."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import psycopg
import pytest

from tests.support import pg
from tests.support.pg import PasswordUser, PgCluster

INVALID_PASSWORD = "28P01"


def _dbname(user: PasswordUser) -> str:
    return pg.APP_DATABASE if user is pg.APP_USER else "postgres"


def test_primary_is_up(pg_primary: PgCluster) -> None:
    assert pg_primary.is_running()
    assert not pg_primary.is_in_recovery()
    assert int(pg_primary.psql("SHOW server_version_num")) >= 150000
    assert pg_primary.psql("SHOW max_connections") == "1200"


@pytest.mark.parametrize("dbname", ["postgres", pg.APP_DATABASE])
def test_pg_stat_statements_records_queries(pg_primary: PgCluster, dbname: str) -> None:
    # Other tests send huge statements (20,000-parameter IN lists) whose stored texts can
    # make pg_stat_statements garbage-collect its text file; start from a clean slate.
    pg_primary.psql("SELECT pg_stat_statements_reset()", dbname=dbname)
    pg_primary.psql("SELECT 4242 AS harness_probe", dbname=dbname)
    count = pg_primary.psql(
        "SELECT count(*) FROM pg_stat_statements WHERE query LIKE '%harness_probe%'",
        dbname=dbname,
    )
    assert int(count) >= 1


@pytest.mark.parametrize("user", pg.PASSWORD_USERS, ids=lambda u: u.name)
def test_hba_method_and_stored_verifier(pg_primary: PgCluster, user: PasswordUser) -> None:
    method = pg_primary.psql(
        "SELECT auth_method FROM pg_hba_file_rules "
        f"WHERE database = ARRAY['all'] AND user_name = ARRAY['{user.name}']"
    )
    assert method == user.auth_method
    verifier = pg_primary.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{user.name}'")
    prefix = "md5" if user.password_encryption == "md5" else "SCRAM-SHA-256$"
    assert verifier.startswith(prefix)


@pytest.mark.parametrize("user", pg.PASSWORD_USERS, ids=lambda u: u.name)
def test_asyncpg_password_auth(pg_primary: PgCluster, user: PasswordUser) -> None:
    async def check() -> None:
        conn = await asyncpg.connect(
            pg_primary.dsn(user.name, user.password, _dbname(user)), ssl=False
        )
        try:
            assert await conn.fetchval("SELECT current_user") == user.name
        finally:
            await conn.close()
        with pytest.raises(asyncpg.PostgresError) as excinfo:
            await asyncpg.connect(pg_primary.dsn(user.name, "wrong", _dbname(user)), ssl=False)
        assert excinfo.value.sqlstate == INVALID_PASSWORD

    asyncio.run(check())


@pytest.mark.parametrize("user", pg.PASSWORD_USERS, ids=lambda u: u.name)
def test_psycopg_password_auth(pg_primary: PgCluster, user: PasswordUser) -> None:
    dsn = pg_primary.dsn(user.name, user.password, _dbname(user))
    with psycopg.connect(dsn, sslmode="disable") as conn:
        row = conn.execute("SELECT current_user").fetchone()
        assert row == (user.name,)

    # libpq reports no SQLSTATE for a failed connection attempt, so read it from the server log
    # (log_line_prefix carries %e).
    log_offset = pg_primary.log_file.stat().st_size
    with pytest.raises(psycopg.OperationalError) as excinfo:
        psycopg.connect(pg_primary.dsn(user.name, "wrong", _dbname(user)), sslmode="disable")
    assert "password authentication failed" in str(excinfo.value)
    with pg_primary.log_file.open("rb") as log:
        log.seek(log_offset)
        new_lines = log.read().decode(errors="replace").splitlines()
    assert any(
        f" {INVALID_PASSWORD} " in line and f'user "{user.name}"' in line for line in new_lines
    ), new_lines


def test_superuser_is_trusted(pg_primary: PgCluster) -> None:
    with psycopg.connect(pg_primary.dsn(), sslmode="disable") as conn:
        assert conn.execute("SELECT current_setting('is_superuser')").fetchone() == ("on",)


def test_replica_streams_from_primary(pg_primary: PgCluster, pg_replica: PgCluster) -> None:
    assert pg_replica.is_in_recovery()
    table = f"harness_{uuid.uuid4().hex[:12]}"
    pg_primary.psql(f"CREATE TABLE {table} (v text); INSERT INTO {table} VALUES ('hello');")
    pg_replica.wait_for_replay()
    assert pg_replica.psql(f"SELECT v FROM {table}") == "hello"

    with (
        psycopg.connect(pg_replica.dsn(), sslmode="disable", autocommit=True) as conn,
        pytest.raises(psycopg.errors.ReadOnlySqlTransaction),
    ):
        conn.execute(f"INSERT INTO {table} VALUES ('nope')")
    pg_primary.psql(f"DROP TABLE {table}")


def test_replica_apply_delay_can_be_set_and_cleared(pg_replica: PgCluster) -> None:
    pg_replica.set_apply_delay(250)
    assert pg_replica.psql("SHOW recovery_min_apply_delay") == "250ms"
    pg_replica.set_apply_delay(0)
    assert pg_replica.psql("SHOW recovery_min_apply_delay") == "0"
    pg_replica.wait_for_replay()
