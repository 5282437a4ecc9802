"""The connection findings (``pool_saturated``, ``connection_churn``,
``session_state_in_pool``) as findings: the pure parts (the churn meter, the pools' reporter,
the pin finding), their durability in a state snapshot, and end to end against a real
PostgreSQL: ``/api/findings``, the ``sqlproxy_findings`` metric, in transaction mode and (for
clients that connect per request) in session mode."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from sqlproxy.analysis.churn import CHURN_SESSIONS, ChurnMeter
from sqlproxy.analysis.findings import FindingsStore
from sqlproxy.analysis.profiler import Profiler, SessionInfo
from sqlproxy.config import AnalysisSection
from sqlproxy.pool.report import PoolReporter
from sqlproxy.state import StateFile, profiler_contributors
from tests.pool.test_pooling import _admin, bench_db, pooled, pools_of  # noqa: F401 - the fixture
from tests.support.proxy import ProxyThread


# ------------------------------------------------------------------------------ pure parts
def test_churn_meter_reports_short_sessions_at_a_rate() -> None:
    m = ChurnMeter(short_s=1.0, sessions=5, window_s=10.0)
    t = 100.0
    assert m.closed("web", "db", "u", 30.0, 0.01, t) is None  # long: not churn
    out = [m.closed("web", "db", "u", 0.05, 0.01, t + i) for i in range(5)]
    assert out[:4] == [None] * 4
    first = out[4]
    assert first is not None and (first.sessions, first.in_window) == (5, 5)
    assert first.login_s == pytest.approx(0.05)
    nxt = m.closed("web", "db", "u", 0.05, 0.02, t + 5)  # the rate holds: each one reported
    assert nxt is not None and nxt.sessions == 1 and nxt.in_window == 6
    # Another application, and sessions spread out beyond the window: nothing.
    assert all(m.closed("batch", "db", "u", 0.05, 0.01, t + 20 * i) is None for i in range(10))


def _pool(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "database": "app", "user": "web", "size": 2, "min_idle": 0, "checkouts": 100,
        "waits": 0, "wait_timeouts": 0, "wait_total_ms": 0.0, "max_waiting": 0,
        "wait_ms": {"max": 0.0, "p50": 0.0, "p99": 0.0}, "max_active": 2,
        "all_busy_share": 0.0, "servers_opened": 2, "servers_closed": {},
        "pinned_clients": [], "max_active_by_application": {},
        "max_clients_by_application": {}}
    base.update(over)
    return base


def test_pool_reporter_turns_running_totals_into_occurrences() -> None:
    store = FindingsStore()
    r = PoolReporter()
    r.report(store, [_pool()], 1000.0)
    assert len(store) == 0  # a healthy pool: nothing
    busy = _pool(waits=30, wait_timeouts=2, wait_total_ms=900.0, max_waiting=7,
                 all_busy_share=0.4, wait_ms={"max": 200.0, "p50": 10.0, "p99": 150.0})
    r.report(store, [busy], 1001.0)
    r.report(store, [busy], 1002.0)  # nothing new: no new occurrence
    (f,) = store.select()
    d = f.to_dict()
    assert (d["kind"], d["occurrences"], d["max_burst"], d["databases"], d["users"]) == (
        "pool_saturated", 32, 7, ["app"], ["web"])
    assert d["total_ms"] == pytest.approx(900.0) and d["query"] == "pool app/web"
    assert "pool.size" in d["suggestion"]
    churn = _pool(servers_opened=80, servers_closed={"login": 78})
    r.report(store, [churn], 1003.0)
    (c,) = store.select(kind="connection_churn")
    assert c.occurrences == 80 and "log" in c.suggestion


def _ctx() -> SessionInfo:
    return SessionInfo(7, "127.0.0.1:5000", "appdb", "alice", "web")


def test_pin_and_churn_findings_survive_a_state_snapshot(tmp_path: Path) -> None:
    before = Profiler(AnalysisSection())
    ctx = _ctx()
    before.note_pool_pin(ctx, "listen", "LISTEN jobs")
    before.note_pool_pin(ctx, "set outside a transaction",
                         "select 1; SET statement_timeout = 5000")
    now = time.time()
    for _ in range(CHURN_SESSIONS):
        before.session_closed(_ctx(), now - 0.05, time.perf_counter() - 0.04)
    found = {f["kind"] + ":" + f["query"]: f for f in before.findings(None, limit=100)[0]}
    pin = found["session_state_in_pool:listen jobs"]
    assert (pin["application"], pin["databases"], pin["users"]) == ("web", ["appdb"], ["alice"])
    assert "LISTEN needs a session" in pin["suggestion"]
    assert "session_state_in_pool:set statement_timeout = $1" in found
    (churn,) = [f for f in found.values() if f["kind"] == "connection_churn"]
    assert churn["occurrences"] == CHURN_SESSIONS and churn["application"] == "web"
    assert churn["total_ms"] > 0 and "client-side pool" in churn["suggestion"]
    path = tmp_path / "state.sqlite"
    StateFile(path).save(profiler_contributors(before))
    after = Profiler(AnalysisSection())
    assert StateFile(path).load(profiler_contributors(after))
    assert after.findings(None, limit=100)[0] == before.findings(None, limit=100)[0]


# ------------------------------------------------------------------------------ end to end
def _findings(p: ProxyThread, kind: str, want: int = 1,
              timeout: float = 10.0) -> list[dict[str, Any]]:
    """The findings of ``kind`` once there are ``want`` (the proxy hears of a departed client
    a moment after it has gone)."""
    deadline = time.monotonic() + timeout
    while True:
        items: list[dict[str, Any]] = _admin(p, f"/api/findings?kind={kind}")["items"]
        if len(items) >= want or time.monotonic() > deadline:
            return items
        time.sleep(0.05)


def test_pool_findings_in_api_findings_and_metrics(
    make_proxy: Callable[..., ProxyThread], bench_db: str,  # noqa: F811
) -> None:
    p = pooled(make_proxy, size=1, max_wait_ms=200)
    with psycopg.connect(p.dsn(dbname=bench_db), application_name="web") as holder, \
            psycopg.connect(p.dsn(dbname=bench_db), autocommit=True,
                            application_name="web") as waiter, \
            psycopg.connect(p.dsn(dbname=bench_db), autocommit=True,
                            application_name="listener") as listener:
        holder.execute("SELECT 1")  # opens a transaction: holds the only server
        with pytest.raises(psycopg.errors.TooManyConnections):
            waiter.execute("SELECT 2")
        holder.commit()
        listener.execute("LISTEN pool_findings")  # pins the listener
        (sat,) = _findings(p, "pool_saturated")
        assert (sat["query"], sat["databases"], sat["users"]) == (
            f"pool {bench_db}/postgres", [bench_db], ["postgres"])
        assert sat["occurrences"] >= 1 and "pool.size" in sat["suggestion"]
        (pin,) = _findings(p, "session_state_in_pool")
        assert (pin["query"], pin["application"], pin["databases"], pin["users"]) == (
            "listen pool_findings", "listener", [bench_db], ["postgres"])
        assert "listen" in pin["example"]
        detail = _admin(p, f"/api/findings/{pin['id']}")
        assert detail["kind"] == "session_state_in_pool"
        metrics = _admin(p, "/metrics")
        assert 'sqlproxy_findings{kind="pool_saturated"} 1.0' in metrics
        assert 'sqlproxy_findings{kind="session_state_in_pool"} 1.0' in metrics


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_clients_that_connect_per_request_are_connection_churn(
    make_proxy: Callable[..., ProxyThread], bench_db: str, mode: str,  # noqa: F811
) -> None:
    p = make_proxy(pool={"mode": mode, "size": 2})
    for i in range(CHURN_SESSIONS + 2):
        with psycopg.connect(p.dsn(dbname=bench_db), application_name="cgi") as c:
            c.execute("SELECT %s::int", (i,))
    (churn,) = _findings(p, "connection_churn")
    assert (churn["application"], churn["databases"], churn["users"]) == (
        "cgi", [bench_db], ["postgres"])
    assert churn["occurrences"] >= CHURN_SESSIONS and churn["total_ms"] > 0
    assert "client-side pool" in churn["suggestion"]
    # A long-lived client is no churn.
    with psycopg.connect(p.dsn(dbname=bench_db), application_name="steady") as c:
        for i in range(CHURN_SESSIONS + 2):
            c.execute("SELECT %s::int", (i,))
    assert [f["application"] for f in _findings(p, "connection_churn", want=2, timeout=0.5)
            ] == ["cgi"]


def test_startup_options_pin_the_client_and_are_reported(
    make_proxy: Callable[..., ProxyThread], bench_db: str,  # noqa: F811
) -> None:
    p = pooled(make_proxy, size=2)
    with psycopg.connect(p.dsn(dbname=bench_db), autocommit=True,
                         options="-c search_path=public -c work_mem=8MB") as c:
        assert c.execute("SHOW work_mem").fetchone() == ("8MB",)
        pid = c.execute("SELECT pg_backend_pid()").fetchone()
        (pool,) = pools_of(p)
        (pinned,) = pool["pinned_clients"]
        assert pinned["reason"] == "startup options"
        assert pinned["statement"] == "SET search_path = 'public'; SET work_mem = '8MB'"
        with psycopg.connect(p.dsn(dbname=bench_db), autocommit=True) as other:
            assert other.execute("SHOW work_mem").fetchone() != ("8MB",)
        assert c.execute("SELECT pg_backend_pid()").fetchone() == pid
    (pin,) = _findings(p, "session_state_in_pool")
    assert pin["query"] == "set search_path = $1"
    assert "pinned: startup options" in pin["example"]
    assert "ALTER ROLE" in pin["suggestion"]
