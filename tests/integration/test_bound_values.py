"""Values bound in the extended protocol: OFFSET $n and captured example parameters."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg
import psycopg

from tests.integration.test_detector import db, findings, proxy  # noqa: F401 (fixtures)
from tests.support.proxy import ProxyThread


def test_bound_offset_is_deep_pagination(proxy: ProxyThread, db: str) -> None:  # noqa: F811
    async def main() -> None:
        conn = await asyncpg.connect(proxy.dsn(dbname=db))
        try:
            sql = "select id from big order by id limit $1 offset $2"
            rows = await conn.fetch(sql, 10, 20000)
            assert rows[0]["id"] == 20001
            await conn.fetch(sql, 10, 20)
        finally:
            await conn.close()

    asyncio.run(main())
    [item] = findings(proxy, db)
    assert item["kind"] == "deep_offset"
    assert item["max_offset"] == 20000


def test_captured_parameters_come_from_bind(
    make_proxy: Callable[..., ProxyThread], db: str  # noqa: F811
) -> None:
    captured = make_proxy(analysis={"capture_parameters": True})
    # psycopg sends parameters in text format (asyncpg's binary ones are not captured: their
    # types are not known to the proxy).
    with psycopg.connect(captured.dsn(dbname=db), autocommit=True) as conn:
        conn.execute("select count(*) from big where v = %s", ("it's",), prepare=True)

    def read() -> dict[str, Any]:
        assert captured.runtime is not None and captured.runtime.profiler is not None
        prof = captured.runtime.profiler
        items, _ = prof.top(database=db, limit=100)
        [item] = [i for i in items if "from big where v" in i["query"]]
        detail = prof.detail(item["fingerprint"])
        assert detail is not None
        return detail

    detail = captured.call(read)
    assert detail["example"] == "select count(*) from big where v = $1"
    assert detail["example_parameters"] == ["'it''s'"]
