"""The demo's result-cache scene: a second sqlproxy in front of the same primary, with a rule
on ``teams`` (the cache is not combined with routing in this version), the repeated lookup
run through it, a write to ``teams`` through it, and the lookup again."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import create_async_engine

from sqlproxy.config import Config

__all__ = ["cache_scene"]


async def cache_scene(console: Any, primary_dsn: str, database: str) -> None:
    from sqlproxy.demo.workload import Team
    from sqlproxy.runtime import Runtime

    cfg = Config.model_validate({
        "proxy": {"listen": "127.0.0.1:0", "primary": primary_dsn},
        "admin": {"enabled": False},
        "state": {"enabled": False},
        "log": {"level": "error"},
        "cache": {"rules": [{"table": "teams", "ttl_s": 30}]},
    })
    runtime = Runtime(cfg)
    await runtime.start()
    try:
        cache = runtime.proxy.cache
        assert cache is not None
        cache.catalog(database)
        deadline = time.monotonic() + 10
        while not cache.catalog(database).loaded and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        url = f"postgresql+asyncpg://postgres@127.0.0.1:{runtime.proxy.port}/{database}"
        # Autocommit: reads inside a read-write transaction are never served from the cache.
        engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as conn:
                for _ in range(8):
                    await conn.scalar(select(Team.name).where(Team.id == 1))
                before = cache.stats.total.hits, cache.stats.total.misses
                await conn.execute(update(Team).where(Team.id == 1).values(city="Lyon"))
                await conn.scalar(select(Team.name).where(Team.id == 1))
                await conn.scalar(select(Team.name).where(Team.id == 1))
        finally:
            await engine.dispose()
        t = cache.stats.total
        console.print(
            "Result cache (a second sqlproxy with [[cache.rules]] table = \"teams\", "
            "ttl_s = 30): the repeated team lookup ran 8 times, "
            f"{before[1]} sent to PostgreSQL and {before[0]} answered by sqlproxy "
            f"(mean {t.hit_ms_total / max(t.hits, 1):.3f} ms per hit); an UPDATE of teams "
            f"through it dropped {t.invalidations} entry at its commit, so the next lookup went "
            f"to PostgreSQL again ({t.misses - before[1]} miss, then "
            f"{t.hits - before[0]} hit).", markup=False)
    finally:
        await runtime.stop()
