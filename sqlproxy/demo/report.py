"""The demo's terminal report: what sqlproxy saw, in a few rich tables."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from sqlproxy.config import Config

KIND_TITLES = {
    "n_plus_one": "N+1 select",
    "repeated_query": "repeated query",
    "row_by_row_write": "row-by-row write",
    "commit_per_row": "commit per row",
    "unbounded_result": "unbounded result",
    "deep_offset": "deep OFFSET",
    "pool_saturated": "pool saturated",
    "connection_churn": "connection churn",
    "session_state_in_pool": "session state in pool",
}
POOL_KINDS = ("pool_saturated", "connection_churn", "session_state_in_pool")


def _short(sql: str, width: int = 70) -> str:
    sql = " ".join(sql.split())
    return sql if len(sql) <= width else sql[: width - 1] + "…"


def gather(runtime: Any, database: str, fallbacks_before: int = 0) -> dict[str, Any]:
    """Everything the report shows, as plain data (also what the demo's test checks).

    ``fallbacks_before``: the router's count of reads kept on the primary when the workload
    started (the seeding before it is not part of the report)."""
    router = getattr(runtime, "router", None)
    fallbacks = router.fallbacks - fallbacks_before if router is not None else 0
    prof = runtime.profiler
    if prof is None:
        return {"top": [], "slow": [], "findings": [], "routes": {}, "fallbacks": fallbacks}
    top, _ = prof.top(sort="total_ms", limit=10_000, database=database)
    slow, _ = prof.slow_log(limit=10)
    findings: list[dict[str, Any]] = []
    if hasattr(prof, "findings"):
        findings, _ = prof.findings(limit=100, database=database)
    routes: dict[str, dict[str, int]] = {}
    for item in top:
        kind = item.get("kind", "")
        for route, n in item.get("routes", {}).items():
            per_kind = routes.setdefault(route, {})
            per_kind[kind] = per_kind.get(kind, 0) + n
    return {"top": top, "slow": [s for s in slow if s.get("database") == database],
            "findings": findings, "routes": routes, "fallbacks": fallbacks}


def print_report(console: Console, runtime: Any, config: Config, database: str,
                 fallbacks_before: int = 0) -> dict[str, Any]:
    data = gather(runtime, database, fallbacks_before)

    table = Table(title="Top statements by total time", title_justify="left")
    for col in ("calls", "total ms", "mean ms", "p95 ms", "rows"):
        table.add_column(col, justify="right")
    table.add_column("route")
    table.add_column("statement")
    shown = [i for i in data["top"] if i.get("kind") != "transaction"]
    for item in shown[:10]:
        route = ", ".join(f"{r} {n}" for r, n in sorted(item.get("routes", {}).items()))
        table.add_row(str(item["calls"]), f"{item['total_ms']:.1f}", f"{item['mean_ms']:.2f}",
                      f"{item['p95_ms']:.2f}", str(item["rows"]), route, _short(item["query"]))
    console.print(table)

    slow = Table(title=f"Slow statements (over {config.analysis.slow_query_ms:g} ms)",
                 title_justify="left")
    slow.add_column("ms", justify="right")
    slow.add_column("rows", justify="right")
    slow.add_column("statement")
    for s in data["slow"][:5]:
        slow.add_row(f"{s['duration_ms']:.1f}", str(s["rows"]), _short(s["query"]))
    console.print(slow)

    found = Table(title="Findings", title_justify="left", show_lines=True)
    found.add_column("pattern")
    found.add_column("seen", justify="right")
    found.add_column("ms", justify="right")
    found.add_column("statement")
    found.add_column("what to change")
    for f in data["findings"]:
        statement = _short(f["query"], 60)
        if f.get("parent_query"):
            statement += f"\nafter: {_short(f['parent_query'], 52)}"
        found.add_row(KIND_TITLES.get(f["kind"], f["kind"]), str(f["occurrences"]),
                      f"{f['total_ms']:.1f}", statement, f["suggestion"])
    console.print(found)

    routing = Table(title="Where statements ran", title_justify="left")
    routing.add_column("backend")
    routing.add_column("statements by kind")
    for route, kinds in sorted(data["routes"].items()):
        routing.add_row(route, ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    console.print(routing)
    if config.routing.enabled and config.replicas:
        n = data["fallbacks"]
        console.print(
            "Read-only transactions (BEGIN READ ONLY) and statements outside a transaction may "
            "run on a replica; read-write transactions stay on the primary. "
            f"{n} read-only transaction{'s' if n != 1 else ''} or statement{'s' if n != 1 else ''}"
            " stayed on the primary because no replica had yet replayed the session's last "
            "write (read-your-writes) or none was healthy.",
            style="dim",
        )
    return data


def gather_pools(runtime: Any) -> dict[str, Any]:
    """The transaction pools of ``runtime`` with their sizing advice (as ``/api/pools``), and
    its pool findings (as ``/api/findings``)."""
    from sqlproxy.pool import advice

    manager = runtime.proxy.pools
    pools: list[dict[str, Any]] = []
    findings: list[dict[str, Any]] = []
    if manager is not None:
        manager.report_findings()
        for pool in manager.describe():
            pool["advice"] = advice.sizing(pool)
            pools.append(pool)
    prof = runtime.profiler
    if prof is not None:
        items, _ = prof.findings(limit=100)
        findings = [f for f in items if f["kind"] in POOL_KINDS]
    return {"pools": pools, "findings": findings}


def print_pool_report(console: Console, runtime: Any, config: Config) -> dict[str, Any]:
    data = gather_pools(runtime)
    table = Table(title=f'Transaction pool (pool.mode = "transaction", pool.size = '
                        f"{config.pool.size})", title_justify="left")
    for col in ("pool", "most clients", "most busy", "checkouts", "waited", "wait p99 ms",
                "all busy", "servers opened"):
        table.add_column(col, justify="left" if col == "pool" else "right")
    for p in data["pools"]:
        table.add_row(f"{p['database']}/{p['user']}", str(p["max_clients"]),
                      str(p["max_active"]), str(p["checkouts"]), str(p["waits"]),
                      f"{p['wait_ms']['p99']:.1f}", f"{p['all_busy_share'] * 100:.0f} %",
                      str(p["servers_opened"]))
    console.print(table)
    console.print("Pool advice", style="bold")
    advice = [a for p in data["pools"] for a in p["advice"]]
    for a in advice or ["nothing to change: the pool is sized for what it saw"]:
        console.print(f"  • {a}")
    if data["findings"]:
        found = Table(title="Pool findings", title_justify="left", show_lines=True)
        found.add_column("pattern")
        found.add_column("seen", justify="right")
        found.add_column("ms", justify="right")
        found.add_column("what")
        found.add_column("what to change")
        for f in data["findings"]:
            who = f["application"] or ", ".join(f["users"])
            found.add_row(KIND_TITLES.get(f["kind"], f["kind"]), str(f["occurrences"]),
                          f"{f['total_ms']:.1f}", f"{_short(f['query'], 60)}\n({who})",
                          f["suggestion"])
        console.print(found)
    return data
