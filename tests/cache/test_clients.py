"""Real clients through the cache: the second run of the same reads is answered (at least in
part) from the cache, and every byte its client receives after startup is what the first run,
answered by PostgreSQL, received."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
import sqlalchemy as sa

from tests.cache.conftest import totals
from tests.cache.tap import Tap, after_startup
from tests.support.clients import describe, find_pgjdbc_jar, java_missing, run
from tests.support.proxy import ProxyThread

JAVA = Path(__file__).parent / "java"


@pytest.fixture
def cached(cache_proxy: Callable[..., ProxyThread]) -> Iterator[tuple[ProxyThread, Tap]]:
    p = cache_proxy()
    tap = Tap(p.port)
    yield p, tap
    tap.close()


def _twice(p: ProxyThread, tap: Tap, once: Callable[[int], object]) -> None:
    before = totals(p)["hits"]
    results = [once(port) for port in (tap.port, tap.port)]
    assert results[0] == results[1]
    assert totals(p)["hits"] > before, totals(p)
    assert len(tap.streams) >= 2
    first, second = (after_startup(s) for s in tap.streams[-2:])
    assert first == second


def test_psql(cached: tuple[ProxyThread, Tap], table: str) -> None:
    p, tap = cached

    def once(port: int) -> str:
        env = {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(port), "PGUSER": "postgres",
               "PGDATABASE": "postgres", "PGSSLMODE": "disable"}
        out = subprocess.run(["psql", "-X", "-A", "-c", f"SELECT * FROM {table} ORDER BY id",
                              "-c", f"SELECT v FROM {table} WHERE id = 3"],
                             env=env, capture_output=True, text=True, timeout=60, check=True)
        return out.stdout

    _twice(p, tap, once)


def test_asyncpg_binary_prepared(cached: tuple[ProxyThread, Tap], table: str) -> None:
    p, tap = cached

    async def main(port: int) -> list[object]:
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres",
                                     database="postgres", ssl=False)
        try:
            out: list[object] = []
            for i in (1, 2, 3, 1, 2, 3):
                out.append(await conn.fetch(f"SELECT id, v FROM {table} WHERE id = $1", i))
            stmt = await conn.prepare(f"SELECT id, v FROM {table} WHERE id > $1 ORDER BY id")
            out.append(await stmt.fetch(7))
            out.append(await stmt.fetch(7))
            return [list(map(tuple, r)) if isinstance(r, list) else r for r in out]
        finally:
            await conn.close()

    _twice(p, tap, lambda port: asyncio.run(main(port)))


@pytest.mark.parametrize("mode", ["text", "binary", "pipeline"])
def test_psycopg(cached: tuple[ProxyThread, Tap], table: str, mode: str) -> None:
    p, tap = cached
    q = f"SELECT id, v FROM {table} WHERE id = %s"

    def once(port: int) -> list[object]:
        out: list[object] = []
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                             sslmode="disable", autocommit=True) as conn:
            if mode == "pipeline":
                with conn.pipeline():
                    curs = [conn.execute(q, (i,)) for i in (1, 2, 3, 1)]
                    conn.execute(f"SELECT count(*) FROM {table}")
                out = [c.fetchall() for c in curs]
            else:
                for i in (1, 2, 3, 1, 2, 3, 4, 5, 6):  # prepared after prepare_threshold
                    out.append(conn.execute(q, (i,), binary=mode == "binary").fetchall())
        return out

    _twice(p, tap, once)


def test_sqlalchemy(cached: tuple[ProxyThread, Tap], table: str) -> None:
    p, tap = cached
    meta = sa.MetaData()
    t = sa.Table(table, meta, sa.Column("id", sa.Integer, primary_key=True),
                 sa.Column("v", sa.Text))

    def once(port: int) -> list[object]:
        # Autocommit: a transaction SQLAlchemy opens (its default) is read-write, and reads
        # in a read-write transaction are never served (docs/cache.md).
        engine = sa.create_engine(
            f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres?sslmode=disable",
            poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                return [conn.execute(sa.select(t).where(t.c.id == i)).all()
                        for i in (1, 2, 1, 2)]
        finally:
            engine.dispose()

    _twice(p, tap, once)


def test_sqlalchemy_transaction_is_not_served(cached: tuple[ProxyThread, Tap],
                                              table: str) -> None:
    p, _ = cached
    engine = sa.create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{p.port}/postgres",
                              poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:  # BEGIN ... : never looked up
            for _ in range(3):
                conn.execute(sa.text(f"SELECT v FROM {table} WHERE id = 1")).all()
    finally:
        engine.dispose()
    assert totals(p)["hits"] == 0 and totals(p)["misses"] == 0


def test_pgjdbc(cached: tuple[ProxyThread, Tap], table: str,
                tmp_path_factory: pytest.TempPathFactory) -> None:
    reason = java_missing()
    if reason is not None:
        pytest.skip(f"pgjdbc: {reason}")
    jar = find_pgjdbc_jar()
    assert jar is not None
    classes = tmp_path_factory.mktemp("cache-java")
    result = run(["javac", "-d", classes, "-cp", jar, JAVA / "CacheReads.java"], timeout=120)
    assert result.returncode == 0, describe(result)
    p, tap = cached

    def once(port: int) -> str:
        url = f"jdbc:postgresql://127.0.0.1:{port}/postgres?sslmode=disable"
        out = run(["java", "-cp", f"{classes}:{jar}", "CacheReads", url, "postgres", table],
                  timeout=120)
        assert out.returncode == 0, describe(out)
        return out.stdout

    _twice(p, tap, once)
