"""The demo application: a small league site on SQLAlchemy 2 (async, asyncpg).

Each scene does one thing the way ORMs make easy and costly — lazy loading in a loop, a commit
per inserted row, reading a whole table, deep OFFSET pages, filtering on an unindexed column,
asking the same question again and again — and then the same work done well. sqlproxy sees
only the wire; the report shows what it made of each.

SQLAlchemy opens a transaction block for everything, and a transaction stays on the backend it
began on — the primary, for a plain ``BEGIN``. So, as an application that wants its reads on
replicas would, the read-only pages run in read-only sessions
(``execution_options(postgresql_readonly=True)``: asyncpg sends ``BEGIN READ ONLY``), which
sqlproxy may route to a replica; the sign-up pages run in ordinary sessions on the primary.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ForeignKey, String, func, select, text
from sqlalchemy.ext.asyncio import (
    AsyncAttrs,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload

TEAMS = 12
PLAYERS_PER_TEAM = 15
USERS = 30_000
PAGE_VIEWS = 400_000
SIGNUPS = 40


class Base(AsyncAttrs, DeclarativeBase):
    pass


class Team(Base):
    __tablename__ = "teams"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80))
    city: Mapped[str] = mapped_column(String(80))
    players: Mapped[list[Player]] = relationship(back_populates="team", lazy="raise_on_sql")
    coach: Mapped[Coach | None] = relationship(back_populates="team", lazy="raise_on_sql")


class Player(Base):
    __tablename__ = "players"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80))
    position: Mapped[str] = mapped_column(String(20))
    rating: Mapped[int]
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"), index=True)
    team: Mapped[Team] = relationship(back_populates="players", lazy="raise_on_sql")


class Coach(Base):
    __tablename__ = "coaches"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80))
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"), unique=True)
    team: Mapped[Team] = relationship(back_populates="coach", lazy="raise_on_sql")


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(120))
    country: Mapped[str] = mapped_column(String(2))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class PageView(Base):
    __tablename__ = "page_views"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int]
    url: Mapped[str] = mapped_column(String(200))  # deliberately not indexed


@dataclass(frozen=True)
class Scene:
    title: str
    well_behaved: bool
    run: Callable[[async_sessionmaker[AsyncSession]], Awaitable[None]]
    read_only: bool = True  # runs in a read-only session (BEGIN READ ONLY): may use a replica


def make_engine(url: str, application_name: str, pool_size: int = 2) -> AsyncEngine:
    """An async engine (asyncpg) for a ``postgresql://`` URL."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres", "postgresql+asyncpg"):
        raise ValueError(f"expected a postgresql:// URL, got {url!r}")
    return create_async_engine(
        f"postgresql+asyncpg://{rest}",
        connect_args={"server_settings": {"application_name": application_name}},
        pool_size=pool_size,
    )


async def setup_schema(engine: AsyncEngine) -> None:
    """Tables and seed data, loaded the efficient way (one multi-row INSERT per table)."""
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    maker = async_sessionmaker(engine, expire_on_commit=False)
    async with maker() as session:
        session.add_all(Team(id=t, name=f"Team {t}", city=f"City {t}")
                        for t in range(1, TEAMS + 1))
        await session.flush()
        session.add_all(
            Player(name=f"Player {t}-{p}", position=("GK", "DF", "MF", "FW")[p % 4],
                   rating=50 + (t * p) % 50, team_id=t)
            for t in range(1, TEAMS + 1) for p in range(PLAYERS_PER_TEAM)
        )
        session.add_all(Coach(name=f"Coach {t}", team_id=t) for t in range(1, TEAMS + 1))
        await session.commit()
    async with engine.begin() as conn:
        # Server-side generation: one statement each, no rows through the client.
        await conn.execute(text(
            "INSERT INTO users (email, country) SELECT 'user' || g || '@example.com', "
            "(ARRAY['DE','FR','US','BR','JP'])[1 + g % 5] FROM generate_series(1, :n) g"
        ), {"n": USERS})
        await conn.execute(text(
            "INSERT INTO page_views (user_id, url) SELECT 1 + g % :users, "
            "'/articles/' || (g % 5000) FROM generate_series(1, :n) g"
        ), {"n": PAGE_VIEWS, "users": USERS})
        await conn.execute(text("ANALYZE"))


# ---------------------------------------------------------------------------------- scenes
async def n_plus_one(maker: async_sessionmaker[AsyncSession]) -> None:
    """Lazy loading in a loop: one query for the teams, then one per team."""
    async with maker() as session:
        teams = (await session.scalars(select(Team).order_by(Team.id))).all()
        for team in teams:
            players = await session.scalars(select(Player).where(Player.team_id == team.id))
            _ = [p.name for p in players]


async def n_plus_one_interleaved(maker: async_sessionmaker[AsyncSession]) -> None:
    """For each team: its players, then its coach — two lazy loads per row."""
    async with maker() as session:
        teams = (await session.scalars(select(Team).order_by(Team.id))).all()
        for team in teams:
            _ = (await session.scalars(select(Player).where(Player.team_id == team.id))).all()
            _ = (await session.scalars(select(Coach).where(Coach.team_id == team.id))).first()


async def eager_loading(maker: async_sessionmaker[AsyncSession]) -> None:
    """The same pages with selectinload: three queries whatever the number of teams."""
    async with maker() as session:
        stmt = select(Team).options(selectinload(Team.players), selectinload(Team.coach))
        teams = (await session.scalars(stmt.order_by(Team.id))).all()
        _ = [(t.coach, [p.name for p in t.players]) for t in teams]


async def commit_per_row(maker: async_sessionmaker[AsyncSession]) -> None:
    """Signing users up one INSERT and one COMMIT at a time."""
    async with maker() as session:
        for i in range(SIGNUPS):
            session.add(User(email=f"signup{i}@example.com", country="DE"))
            await session.commit()


async def batched_insert(maker: async_sessionmaker[AsyncSession]) -> None:
    """The same sign-ups in one transaction: SQLAlchemy sends one multi-row INSERT."""
    async with maker() as session:
        session.add_all(User(email=f"batch{i}@example.com", country="FR")
                        for i in range(SIGNUPS))
        await session.commit()


async def unbounded_read(maker: async_sessionmaker[AsyncSession]) -> None:
    """Exporting every user at once."""
    async with maker() as session:
        rows = (await session.execute(select(User.id, User.email))).all()
        assert len(rows) >= USERS


async def paginated_read(maker: async_sessionmaker[AsyncSession]) -> None:
    """A page at a time, by key."""
    async with maker() as session:
        last = 0
        for _ in range(3):
            page = (await session.execute(
                select(User.id, User.email).where(User.id > last).order_by(User.id).limit(100)
            )).all()
            last = page[-1].id


async def deep_offset(maker: async_sessionmaker[AsyncSession]) -> None:
    """Page 250 of the user list, by OFFSET: the server reads and drops 25,000 rows."""
    async with maker() as session:
        stmt = select(User).order_by(User.id).offset(25_000).limit(100)
        _ = (await session.scalars(stmt)).all()


async def slow_filter(maker: async_sessionmaker[AsyncSession]) -> None:
    """Counting views of one article: a sequential scan of page_views each time."""
    async with maker() as session:
        for n in (7, 42, 99):
            await session.scalar(select(func.count()).select_from(PageView)
                                 .where(PageView.url == f"/articles/{n}"))


async def repeated_query(maker: async_sessionmaker[AsyncSession]) -> None:
    """Asking for the same team again and again within one request."""
    async with maker() as session:
        for _ in range(8):
            await session.scalar(select(Team.name).where(Team.id == 1))
            session.expunge_all()


SCENES = [
    Scene("N+1: players loaded team by team", False, n_plus_one),
    Scene("N+1, interleaved: players and coach per team", False, n_plus_one_interleaved),
    Scene("eager loading with selectinload", True, eager_loading),
    Scene("one INSERT and one COMMIT per sign-up", False, commit_per_row, read_only=False),
    Scene("sign-ups in one batch", True, batched_insert, read_only=False),
    Scene("all users in one result", False, unbounded_read),
    Scene("keyset pagination", True, paginated_read),
    Scene("deep OFFSET page", False, deep_offset),
    Scene("filter on an unindexed column", False, slow_filter),
    Scene("the same lookup, repeated", False, repeated_query),
]


async def run_scenes(
    engine: AsyncEngine,
    scenes: list[Scene] | None = None,
    *,
    pause: float = 0.25,
    on_scene: Callable[[Scene], None] | None = None,
    on_done: Callable[[Scene], None] | None = None,
) -> None:
    """Run ``scenes`` (all by default) in order against ``engine``: read-only scenes in
    read-only sessions, the others in ordinary ones."""
    writer = async_sessionmaker(engine, expire_on_commit=False)
    reader = async_sessionmaker(engine.execution_options(postgresql_readonly=True),
                                expire_on_commit=False)
    for scene in SCENES if scenes is None else scenes:
        if on_scene is not None:
            on_scene(scene)
        await scene.run(reader if scene.read_only else writer)
        # A pause ends the connection's burst, as a user's next click would.
        await asyncio.sleep(pause)
        if on_done is not None:
            on_done(scene)


# ------------------------------------------------------------------ behind the transaction pool
#: The league site's web tier, as many deployments run it: several worker processes, each
#: with its own SQLAlchemy pool sized "generously", in front of a sqlproxy transaction pool.
WEB_WORKERS = 6
WEB_POOL_SIZE = 5  # per worker: 30 client connections in all
WEB_REQUESTS = 40  # per client connection
CRON_RUNS = 25  # a job that connects once per run (NullPool)


async def _request(maker: async_sessionmaker[AsyncSession], n: int) -> None:
    """One page: a team and its players, in one short transaction."""
    async with maker() as session:
        team_id = n % TEAMS + 1
        await session.scalar(select(Team.name).where(Team.id == team_id))
        await session.execute(text("SELECT pg_sleep(0.004)"))  # the page's own work
        _ = (await session.scalars(select(Player).where(Player.team_id == team_id))).all()


async def web_tier(url: str, application_name: str) -> None:
    """``WEB_WORKERS`` engines of ``WEB_POOL_SIZE`` connections, all of them busy at once."""
    engines = [make_engine(url, application_name, pool_size=WEB_POOL_SIZE)
               for _ in range(WEB_WORKERS)]
    try:
        async def client(engine: AsyncEngine, c: int) -> None:
            maker = async_sessionmaker(engine, expire_on_commit=False)
            for n in range(WEB_REQUESTS):
                await _request(maker, c * WEB_REQUESTS + n)

        await asyncio.gather(*(client(e, w * WEB_POOL_SIZE + c)
                               for w, e in enumerate(engines) for c in range(WEB_POOL_SIZE)))
    finally:
        for e in engines:
            await e.dispose()


async def connect_per_run(url: str, application_name: str) -> None:
    """A job that opens a connection per run (SQLAlchemy's NullPool): connection churn."""
    from sqlalchemy.pool import NullPool

    rest = url.partition("://")[2]
    engine = create_async_engine(
        f"postgresql+asyncpg://{rest}", poolclass=NullPool,
        connect_args={"server_settings": {"application_name": application_name}})
    try:
        maker = async_sessionmaker(engine, expire_on_commit=False)
        for n in range(CRON_RUNS):
            async with maker() as session:
                await session.scalar(select(func.count()).select_from(Player)
                                     .where(Player.team_id == n % TEAMS + 1))
    finally:
        await engine.dispose()
