"""The pattern detector with real applications through the proxy: what is found, and what not.

Schemas and data are made directly on the server, so that only the application's own traffic
passes through the proxy. Each test has its own database and its own proxy; findings are read
once every client connection has closed (its last burst is judged when it closes).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
from sqlalchemy import ForeignKey, select
from sqlalchemy.ext.asyncio import AsyncAttrs, AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
)

from tests.support import pg
from tests.support.proxy import ProxyThread

TEAMS = 10
PLAYERS_PER_TEAM = 3


class Base(AsyncAttrs, DeclarativeBase):
    pass


class Team(Base):
    __tablename__ = "teams"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    players: Mapped[list[Player]] = relationship(back_populates="team", order_by="Player.id")
    coach: Mapped[Coach | None] = relationship(back_populates="team")


class Player(Base):
    __tablename__ = "players"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"), index=True)
    team: Mapped[Team] = relationship(back_populates="players")


class Coach(Base):
    __tablename__ = "coaches"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"), unique=True)
    team: Mapped[Team] = relationship(back_populates="coach")


SCHEMA = f"""
create table teams (id int primary key, name text not null);
create table players (id int primary key, name text not null,
                      team_id int not null references teams (id));
create index on players (team_id);
create table coaches (id int primary key, name text not null,
                      team_id int not null unique references teams (id));
insert into teams select g, 'team ' || g from generate_series(1, {TEAMS}) g;
insert into players select g, 'player ' || g, (g - 1) / {PLAYERS_PER_TEAM} + 1
  from generate_series(1, {TEAMS * PLAYERS_PER_TEAM}) g;
insert into coaches select g, 'coach ' || g, g from generate_series(1, {TEAMS}) g;
create table events (id int primary key, v text);
create table big (id int primary key, v text);
insert into big select g, md5(g::text) from generate_series(1, 50000) g;
analyze;
"""


@pytest.fixture
def db(pg_primary: pg.PgCluster) -> Iterator[str]:
    """A fresh database per test, with the schema and data made directly on the server."""
    name = f"det_{uuid.uuid4().hex[:10]}"
    pg_primary.psql(f"create database {name}")
    pg_primary.psql(SCHEMA, dbname=name)
    yield name
    pg_primary.psql(f"drop database {name} with (force)")


@pytest.fixture
def proxy(make_proxy: Callable[..., ProxyThread]) -> ProxyThread:
    return make_proxy()


def findings(proxy: ProxyThread, db: str, kind: str | None = None) -> list[dict[str, Any]]:
    """The findings about ``db``, once the proxy has seen every client connection close."""
    def read() -> tuple[int, list[dict[str, Any]]]:
        assert proxy.runtime is not None and proxy.runtime.profiler is not None
        prof = proxy.runtime.profiler
        return len(prof.detectors), prof.findings(kind, limit=1000, database=db)[0]

    deadline = time.monotonic() + 20
    while True:
        open_connections, items = proxy.call(read)
        if open_connections == 0:
            return items
        assert time.monotonic() < deadline, "client connections did not close"
        time.sleep(0.02)


def by_kind(items: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for i in items:
        out.setdefault(i["kind"], []).append(i)
    return out


def statement_calls(proxy: ProxyThread, db: str, needle: str) -> int:
    def read() -> int:
        assert proxy.runtime is not None and proxy.runtime.profiler is not None
        rows = proxy.runtime.profiler.top(limit=100_000, database=db)[0]
        return sum(r["calls"] for r in rows if needle in r["query"])

    return proxy.call(read)


# ------------------------------------------------------------------------------ SQLAlchemy


def engine(proxy: ProxyThread, db: str) -> AsyncEngine:
    url = proxy.dsn(dbname=db).replace("postgresql://", "postgresql+asyncpg://", 1)
    return create_async_engine(url)


def run_orm(proxy: ProxyThread, db: str, work: Callable[[Any], Any]) -> Any:
    async def main() -> Any:
        eng = engine(proxy, db)
        try:
            async with async_sessionmaker(eng, expire_on_commit=False)() as session:
                return await work(session)
        finally:
            await eng.dispose()

    return asyncio.run(main())


def test_sqlalchemy_lazy_loading_is_n_plus_one_with_the_team_query_as_parent(
    proxy: ProxyThread, db: str
) -> None:
    async def work(session: Any) -> int:
        teams = (await session.scalars(select(Team).order_by(Team.id))).all()
        n = 0
        for team in teams:
            n += len(await team.awaitable_attrs.players)
        return n

    assert run_orm(proxy, db, work) == TEAMS * PLAYERS_PER_TEAM
    found = by_kind(findings(proxy, db))
    assert set(found) == {"n_plus_one"}, found
    [item] = found["n_plus_one"]
    assert "from players" in item["query"] and "team_id" in item["query"]
    assert item["parent_query"] is not None and "from teams" in item["parent_query"]
    assert "players" not in item["parent_query"]
    assert item["max_burst"] == TEAMS and item["occurrences"] == 1
    assert item["interleaved_with"] == []
    assert "selectinload" in item["suggestion"] and "team_id = ANY($1)" in item["suggestion"]
    assert item["total_ms"] > 0
    assert item["first_seen"].endswith("Z")
    # The same through the N+1-only reader.
    def n_plus_one() -> list[dict[str, Any]]:
        assert proxy.runtime is not None and proxy.runtime.profiler is not None
        return proxy.runtime.profiler.n_plus_one(database=db)[0]

    assert proxy.call(n_plus_one) == [item]


@pytest.mark.parametrize("loader", ["selectinload", "joinedload"])
def test_sqlalchemy_eager_loading_is_not_reported(
    proxy: ProxyThread, db: str, loader: str
) -> None:
    option = selectinload(Team.players) if loader == "selectinload" else joinedload(Team.players)

    async def work(session: Any) -> int:
        result = await session.execute(select(Team).options(option).order_by(Team.id))
        teams = result.unique().scalars().all()
        return sum(len(t.players) for t in teams)

    assert run_orm(proxy, db, work) == TEAMS * PLAYERS_PER_TEAM
    assert findings(proxy, db) == []
    assert statement_calls(proxy, db, "from teams") >= 1  # the traffic did pass the proxy


def test_sqlalchemy_players_and_coach_per_team_is_interleaved(
    proxy: ProxyThread, db: str
) -> None:
    async def work(session: Any) -> int:
        teams = (await session.scalars(select(Team).order_by(Team.id))).all()
        n = 0
        for team in teams:
            n += len(await team.awaitable_attrs.players)
            n += (await team.awaitable_attrs.coach) is not None
        return n

    assert run_orm(proxy, db, work) == TEAMS * (PLAYERS_PER_TEAM + 1)
    found = by_kind(findings(proxy, db))
    assert set(found) == {"n_plus_one"}, found
    items = {("players" if "from players" in i["query"] else "coaches"): i
             for i in found["n_plus_one"]}
    assert set(items) == {"players", "coaches"}
    for name, other in (("players", "coaches"), ("coaches", "players")):
        item = items[name]
        assert item["parent_query"] is not None and "from teams" in item["parent_query"]
        assert item["max_burst"] == TEAMS
        assert item["interleaved_with"] == [items[other]["fingerprint"]]
        assert "players" in item["suggestion"] and "coaches" in item["suggestion"]


# ------------------------------------------------------------------------------ psycopg writes

INSERT = "insert into events (id, v) values (%s, %s)"
ROWS = [(i, f"v{i}") for i in range(20)]


def test_psycopg_insert_and_commit_per_row(proxy: ProxyThread, db: str) -> None:
    with psycopg.connect(proxy.dsn(dbname=db)) as conn:
        for row in ROWS:
            conn.execute(INSERT, row)
            conn.commit()
    found = by_kind(findings(proxy, db))
    assert set(found) == {"row_by_row_write", "commit_per_row"}, found
    [rows], [commits] = found["row_by_row_write"], found["commit_per_row"]
    assert rows["query"] == "insert into events (id, v) values ($1, $2)"
    assert rows["max_burst"] == len(ROWS) and commits["max_burst"] == len(ROWS)
    assert rows["fingerprint"] == commits["fingerprint"]
    assert "executemany" in rows["suggestion"] and "COPY" in rows["suggestion"]
    assert "commit once" in commits["suggestion"]


def test_psycopg_autocommit_insert_per_row(proxy: ProxyThread, db: str) -> None:
    with psycopg.connect(proxy.dsn(dbname=db), autocommit=True) as conn:
        for row in ROWS:
            conn.execute(INSERT, row)
    assert set(by_kind(findings(proxy, db))) == {"row_by_row_write", "commit_per_row"}


def test_psycopg_insert_per_row_in_one_transaction(proxy: ProxyThread, db: str) -> None:
    with psycopg.connect(proxy.dsn(dbname=db)) as conn:
        for row in ROWS:
            conn.execute(INSERT, row)
        conn.commit()
    assert set(by_kind(findings(proxy, db))) == {"row_by_row_write"}


@pytest.mark.parametrize("autocommit", [False, True])
def test_psycopg_executemany_and_copy_are_not_reported(
    proxy: ProxyThread, db: str, autocommit: bool
) -> None:
    with psycopg.connect(proxy.dsn(dbname=db), autocommit=autocommit) as conn:
        with conn.cursor() as cur:
            cur.executemany(INSERT, ROWS)
        conn.commit()
        with conn.cursor() as cur, cur.copy("copy events (id, v) from stdin") as copy:
            for i, v in ROWS:
                copy.write_row((i + 1000, v))
        conn.commit()
        assert conn.execute("select count(*) from events").fetchone() == (2 * len(ROWS),)
    assert findings(proxy, db) == []
    assert statement_calls(proxy, db, "insert into events") == len(ROWS)


def test_asyncpg_executemany_is_not_reported(proxy: ProxyThread, db: str) -> None:
    async def main() -> None:
        conn = await asyncpg.connect(proxy.dsn(dbname=db))
        try:
            await conn.executemany("insert into events (id, v) values ($1, $2)", ROWS)
        finally:
            await conn.close()

    asyncio.run(main())
    assert findings(proxy, db) == []


# ------------------------------------------------------------------------------ result sizes


def test_unbounded_result(proxy: ProxyThread, db: str) -> None:
    with psycopg.connect(proxy.dsn(dbname=db), autocommit=True) as conn:
        assert len(conn.execute("select id, v from big").fetchall()) == 50_000
    [item] = findings(proxy, db)
    assert item["kind"] == "unbounded_result"
    assert item["query"] == "select id, v from big"
    assert item["max_rows"] == 50_000 and item["occurrences"] == 1
    assert "paginate" in item["suggestion"]


def test_limited_result_is_not_reported(proxy: ProxyThread, db: str) -> None:
    with psycopg.connect(proxy.dsn(dbname=db), autocommit=True) as conn:
        assert len(conn.execute("select id, v from big limit 50000").fetchall()) == 50_000
        assert len(conn.execute("select id, v from big order by id limit 100").fetchall()) == 100
    assert findings(proxy, db) == []


def test_deep_offset(proxy: ProxyThread, db: str) -> None:
    with psycopg.connect(proxy.dsn(dbname=db), autocommit=True) as conn:
        rows = conn.execute("select id from big order by id limit 10 offset 20000").fetchall()
        assert rows[0] == (20001,)
        conn.execute("select id from big order by id limit 10 offset 500").fetchall()
    [item] = findings(proxy, db)
    assert item["kind"] == "deep_offset"
    assert item["max_offset"] == 20000
    assert "keyset" in item["suggestion"]


# ------------------------------------------------------------------------------ concurrency


def test_concurrent_connections_below_threshold_do_not_mix(proxy: ProxyThread, db: str) -> None:
    async def lookups(conn: asyncpg.Connection, teams: range) -> None:
        for t in teams:
            await conn.fetch("select id, name from players where team_id = $1", t)
            await asyncio.sleep(0)

    async def main() -> None:
        a = await asyncpg.connect(proxy.dsn(dbname=db))
        b = await asyncpg.connect(proxy.dsn(dbname=db))
        try:
            await asyncio.gather(lookups(a, range(1, 4)), lookups(b, range(4, 7)))
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())
    assert findings(proxy, db) == []
    assert statement_calls(proxy, db, "from players where team_id") == 6


def test_ignore_hint_through_the_proxy(proxy: ProxyThread, db: str) -> None:
    with psycopg.connect(proxy.dsn(dbname=db), autocommit=True) as conn:
        for t in range(1, TEAMS + 1):
            conn.execute("select * from players where team_id = %s /* sqlproxy:ignore */", (t,))
    assert findings(proxy, db) == []
