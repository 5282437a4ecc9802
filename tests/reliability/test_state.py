"""Durable findings: statistics, slow log and transaction statistics survive a restart; a
corrupted or incompatible state file is set aside with a warning, never a crash."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg

from sqlproxy.analysis.profiler import Profiler, SessionInfo
from sqlproxy.config import AnalysisSection
from sqlproxy.state import FORMAT_VERSION, StateFile, profiler_contributors
from tests.support.proxy import ProxyThread


def _Ctx(id: int = 1) -> SessionInfo:
    return SessionInfo(id, "127.0.0.1:1", "db", "u", "app")


def _profiler(slow_ms: float = 5.0) -> Profiler:
    return Profiler(AnalysisSection(slow_query_ms=slow_ms))


def _fill(p: Profiler) -> None:
    ctx = _Ctx()
    t = 100.0
    for i in range(200):
        d = 0.001 * (1 + i % 17)
        p.record(ctx, f"select * from t where id = {i}", 0, b"", 1, None, t, t + d)
        p.record(ctx, "update t set x = 1 where id = $1", 0, b"1", 1,
                 "40001" if i % 50 == 0 else None, t, t + d / 2)
        t += 0.01
    p.transaction_done(ctx, 0.05, 3, 0.01, False)
    p.transaction_done(ctx, 0.2, 5, 0.1, True)


def _summary(p: Profiler) -> dict[str, Any]:
    rows, total = p.top(limit=1000)
    slow, nslow = p.slow_log(limit=1000)
    return {"top": sorted(rows, key=lambda r: r["fingerprint"]), "total": total,
            "slow": slow, "slow_total": nslow, "tx": p.transaction_summary(),
            "executions": p.executions}


def test_snapshot_roundtrip_is_exact(tmp_path: Path) -> None:
    before = _profiler()
    _fill(before)
    state = StateFile(tmp_path / "state.sqlite")
    state.save(profiler_contributors(before))
    after = _profiler()
    assert StateFile(tmp_path / "state.sqlite").load(profiler_contributors(after))
    assert _summary(after) == _summary(before)
    # Recording continues into the restored entries.
    ctx = _Ctx()
    after.record(ctx, "select * from t where id = 5", 0, b"", 1, None, 1.0, 1.001)
    calls = {r["query"]: r["calls"] for r in after.top(limit=10)[0]}
    assert calls["select * from t where id = $1"] == 201


def test_restored_statistics_respect_max_fingerprints(tmp_path: Path) -> None:
    before = _profiler()
    ctx = _Ctx()
    for i in range(60):
        before.record(ctx, f"select c{i} from t", 0, b"", 1, None, 1.0, 1.001)
    StateFile(tmp_path / "s").save(profiler_contributors(before))
    after = Profiler(AnalysisSection(max_fingerprints=20))
    StateFile(tmp_path / "s").load(profiler_contributors(after))
    assert len(after.stats.entries) == 20
    assert after.stats.evictions == 40


def test_missing_file_is_a_fresh_start(tmp_path: Path) -> None:
    p = _profiler()
    assert not StateFile(tmp_path / "nothing.sqlite").load(profiler_contributors(p))
    assert p.executions == 0


def _aside(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".corrupt-*"))


def test_garbage_file_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    path.write_bytes(b"this is not a database\x00" * 100)
    p = _profiler()
    assert not StateFile(path).load(profiler_contributors(p))
    assert not path.exists()
    assert len(_aside(path)) == 1
    # The next snapshot writes a good file again.
    _fill(p)
    StateFile(path).save(profiler_contributors(p))
    q = _profiler()
    assert StateFile(path).load(profiler_contributors(q))
    assert q.executions == p.executions


def test_truncated_file_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    p = _profiler()
    _fill(p)
    StateFile(path).save(profiler_contributors(p))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    assert not StateFile(path).load(profiler_contributors(_profiler()))
    assert len(_aside(path)) == 1


def test_other_format_version_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    StateFile(path).save(profiler_contributors(_profiler()))
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'format'", (str(FORMAT_VERSION + 1),))
    assert not StateFile(path).load(profiler_contributors(_profiler()))
    assert len(_aside(path)) == 1


def test_bad_section_is_skipped_and_kept_aside(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    p = _profiler()
    _fill(p)
    StateFile(path).save(profiler_contributors(p))
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE sections SET data = ? WHERE name = 'slow_log'",
                     (json.dumps({"entries": [[1, 2]]}),))
        conn.execute("UPDATE sections SET version = 99 WHERE name = 'transactions'")
    q = _profiler()
    assert StateFile(path).load(profiler_contributors(q))
    assert q.executions == p.executions  # statistics restored
    assert q.slow.entries == type(q.slow.entries)(maxlen=q.slow.entries.maxlen)
    assert q.transactions == {}
    assert path.exists() and len(_aside(path)) == 1  # a copy kept for inspection


def test_counts_survive_a_proxy_restart(
    make_proxy: Callable[..., ProxyThread], tmp_path: Path
) -> None:
    path = tmp_path / "state.sqlite"
    state = {"enabled": True, "path": str(path), "snapshot_seconds": 3600}

    async def traffic(proxy: ProxyThread) -> None:
        conn = await asyncpg.connect(proxy.dsn())
        for i in range(25):
            await conn.fetchval("select $1::int + 1", i)
        async with conn.transaction():
            await conn.execute("select pg_sleep(0.01)")
        await conn.close()

    first = make_proxy(state=state, analysis={"slow_query_ms": 5})
    asyncio.run(traffic(first))

    def summary(proxy: ProxyThread) -> dict[str, Any]:
        assert proxy.runtime is not None and proxy.runtime.profiler is not None
        return proxy.call(lambda: _summary(proxy.runtime.profiler))  # type: ignore[union-attr]

    before = summary(first)
    first.stop()  # clean shutdown: final snapshot
    assert path.exists()
    second = make_proxy(state=state, analysis={"slow_query_ms": 5})
    after = summary(second)
    assert after == before
    calls = {r["query"]: r["calls"] for r in after["top"]}
    assert calls["select $1::int + $2"] == 25
    assert after["slow_total"] >= 1
    assert after["tx"][0]["transactions"] == 1
    asyncio.run(traffic(second))
    calls = {r["query"]: r["calls"] for r in summary(second)["top"]}
    assert calls["select $1::int + $2"] == 50


def test_corrupted_state_file_does_not_stop_the_proxy(
    make_proxy: Callable[..., ProxyThread], tmp_path: Path
) -> None:
    path = tmp_path / "state.sqlite"
    path.write_bytes(b"SQLite format 3\x00" + b"\xff" * 5000)
    proxy = make_proxy(state={"enabled": True, "path": str(path)})

    async def main() -> None:
        conn = await asyncpg.connect(proxy.dsn())
        assert await conn.fetchval("select 1") == 1
        await conn.close()

    asyncio.run(main())
    assert len(_aside(path)) == 1


def test_findings_survive_a_restart(tmp_path: Path) -> None:
    """The pattern detector's findings are a state section too."""
    before = _profiler()
    ctx = _Ctx()
    t = 10.0
    before.record(ctx, "select id from teams", 0, b"", 10, None, t, t + 0.001)
    for i in range(10):
        t += 0.002
        before.record(ctx, "select * from players where team_id = $1", 0, b"%d" % (100 + i), 3,
                      None, t, t + 0.0005)
    before.session_closed(ctx)
    found = before.findings(None, limit=100)[0]
    assert [f["kind"] for f in found] == ["n_plus_one"]
    path = tmp_path / "state.sqlite"
    StateFile(path).save(profiler_contributors(before))
    with sqlite3.connect(path) as conn:
        names = {r[0] for r in conn.execute("select name from sections")}
    assert names == {"statistics", "slow_log", "transactions", "findings", "endpoints",
                     "windows"}
    after = _profiler()
    assert StateFile(path).load(profiler_contributors(after))
    assert after.findings(None, limit=100)[0] == found
