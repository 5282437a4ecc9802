"""Request attribution through ``Profiler.record``: statistics per endpoint, findings per
request (trace id) and per endpoint, with made-up timestamps (no timing is asserted)."""

from __future__ import annotations

from typing import Any

from sqlproxy.analysis.normalize import normalize
from sqlproxy.analysis.profiler import Profiler, SessionInfo
from sqlproxy.config import AnalysisSection

ORDERS = "select id, customer_id from orders order by id limit 10"
CUSTOMER = "select id, name from customers where id = $1"
PRODUCTS = "select id, name from products order by id limit 10"


def tp(n: int) -> str:
    return f"00-{n:032x}-{n:016x}-01"


def tagged(sql: str, route: str, trace: int | None = None, **more: str) -> str:
    pairs = [f"route='{route}'", *(f"{k}='{v}'" for k, v in more.items())]
    if trace is not None:
        pairs.append(f"traceparent='{tp(trace)}'")
    return f"{sql} /*{','.join(sorted(pairs))}*/"


class Clock:
    def __init__(self) -> None:
        self.t = 1.0

    def run(self, prof: Profiler, ctx: SessionInfo, sql: str, param: int = 0, rows: int = 1,
            idle: float = 0.0005) -> None:
        start = self.t + idle
        self.t = start + 0.0005
        bind = param.to_bytes(8, "big") if param else b""
        prof.record(ctx, sql, 0, bind, rows, None, start, self.t)


def ctx(i: int = 1) -> SessionInfo:
    return SessionInfo(i, "peer", "db", "u", "app")


def findings(prof: Profiler, **filters: Any) -> list[dict[str, Any]]:
    return prof.findings(limit=1000, **filters)[0]


def test_tags_do_not_split_fingerprints_and_are_counted_per_endpoint() -> None:
    prof = Profiler(AnalysisSection())
    c, clock = ctx(), Clock()
    for i in range(3):
        clock.run(prof, c, tagged(ORDERS, "/orders", trace=i + 1))
        clock.run(prof, c, tagged(PRODUCTS, "/products", trace=100 + i))
    clock.run(prof, c, ORDERS)  # untagged
    entries = prof.stats.select()
    assert {e.fingerprint for e in entries} == {normalize(ORDERS).fingerprint,
                                                normalize(PRODUCTS).fingerprint}
    assert {e.fingerprint: e.calls for e in entries}[normalize(ORDERS).fingerprint] == 4
    items, total = prof.top(route="/orders")
    assert total == 1
    assert items[0]["fingerprint"] == normalize(ORDERS).fingerprint
    assert items[0]["calls"] == 3 and items[0]["calls_per_request"] == 1.0
    eps = {e["endpoint"]: e for e in prof.endpoint_summary()[0]}
    assert eps["/orders"]["requests"] == 3 and eps["/orders"]["statements"] == 3
    assert eps["/products"]["statements_per_request"] == 1.0
    detail = prof.detail(normalize(ORDERS).fingerprint)
    assert detail is not None
    assert [r["route"] for r in detail["by_route"]] == ["/orders"]


def test_n_plus_one_per_request_on_a_shared_connection() -> None:
    """Two requests of the N+1 endpoint and twenty of a clean one take turns on one pooled
    connection with no idle gap: per connection it is one busy stream; per trace id the N+1
    is found for its route only, with its trace ids."""
    prof = Profiler(AnalysisSection())
    c, clock = ctx(), Clock()
    for r in range(2):
        n1 = 10 + r
        clock.run(prof, c, tagged(ORDERS, "/orders", trace=n1), rows=10)
        for i in range(10):
            # The clean endpoint's requests run in between the loop's statements.
            clock.run(prof, c, tagged(CUSTOMER, "/orders", trace=n1), param=i + 1)
            clock.run(prof, c, tagged(PRODUCTS, "/products", trace=1000 + 100 * r + i),
                      rows=10)
        # A long pause inside the request (a slow remote call) does not split it.
        clock.run(prof, c, tagged(CUSTOMER, "/orders", trace=n1), param=5, idle=5.0)
    items = findings(prof, kind="n_plus_one")
    assert len(items) == 1, items
    f = items[0]
    assert f["route"] == "/orders" and f["endpoint"] == "/orders"
    assert f["fingerprint"] == normalize(CUSTOMER).fingerprint
    assert f["parent_fingerprint"] == normalize(ORDERS).fingerprint
    assert f["occurrences"] == 2 and f["max_burst"] == 11
    assert set(f["trace_ids"]) == {f"{10:032x}", f"{11:032x}"}
    assert findings(prof, route="/products") == []
    assert [x["id"] for x in findings(prof, route="/orders")] == [f["id"]]
    eps = {e["endpoint"]: e for e in prof.endpoint_summary()[0]}
    assert eps["/orders"]["findings"] == 1 and eps["/products"]["findings"] == 0
    assert eps["/orders"]["requests"] == 2 and eps["/orders"]["statements"] == 24
    assert eps["/products"]["requests"] == 20


def test_without_tags_bursts_stay_per_connection() -> None:
    prof = Profiler(AnalysisSection())
    c, clock = ctx(), Clock()
    clock.run(prof, c, ORDERS, rows=10)
    for i in range(10):
        clock.run(prof, c, CUSTOMER, param=i + 1)
    prof.session_closed(c)
    (f,) = findings(prof, kind="n_plus_one")
    assert f["route"] == "" and f["trace_ids"] == []
    assert prof.endpoint_summary() == ([], 0)


def test_tags_without_trace_ids_split_the_burst_where_the_endpoint_changes() -> None:
    """Rails-style tags (controller/action, no traceparent): one request after another on a
    connection with no gap; the loop is blamed on its own endpoint."""
    prof = Profiler(AnalysisSection())
    c, clock = ctx(), Clock()
    tag = "/*application:Shop,controller:orders,action:index*/ "
    clock.run(prof, c, tag + ORDERS, rows=10)
    for i in range(10):
        clock.run(prof, c, tag + CUSTOMER, param=i + 1)
    other = "/*application:Shop,controller:products,action:index*/ "
    for i in range(4):
        clock.run(prof, c, other + CUSTOMER, param=50 + i)
    prof.session_closed(c)
    # Static tags repeat: such texts are remembered with their tags (no trace id in them),
    # unless their own literals matter (ORDERS inlines one: found by its skeleton).
    assert set(c.tagged) == {tag + CUSTOMER, other + CUSTOMER}
    (f,) = findings(prof, kind="n_plus_one")
    assert (f["controller"], f["action"], f["endpoint"]) == ("orders", "index", "orders#index")
    assert f["max_burst"] == 10
    eps = {e["endpoint"]: e for e in prof.endpoint_summary()[0]}
    assert eps["orders#index"]["requests"] == 1
    assert eps["products#index"]["requests"] == 1


def test_untagged_transaction_statements_belong_to_the_request() -> None:
    """Drivers send BEGIN/COMMIT themselves, untagged: they count in the request's
    transaction, so writes inside one transaction are no commit per row."""
    prof = Profiler(AnalysisSection())
    c, clock = ctx(), Clock()
    clock.run(prof, c, "BEGIN")
    for i in range(10):
        clock.run(prof, c, tagged("insert into events (id) values ($1)", "/import", trace=7),
                  param=i + 1)
    clock.run(prof, c, "COMMIT")
    kinds = {f["kind"] for f in findings(prof)}
    assert "row_by_row_write" in kinds and "commit_per_row" not in kinds


def test_endpoints_and_request_findings_survive_a_restart(tmp_path: Any) -> None:
    from sqlproxy.state import StateFile, profiler_contributors

    before = Profiler(AnalysisSection())
    c, clock = ctx(), Clock()
    clock.run(before, c, tagged(ORDERS, "/orders", trace=1), rows=10)
    for i in range(10):
        clock.run(before, c, tagged(CUSTOMER, "/orders", trace=1), param=i + 1)
    (f,) = findings(before, kind="n_plus_one")
    path = tmp_path / "state.sqlite"
    StateFile(path).save(profiler_contributors(before))
    after = Profiler(AnalysisSection())
    assert StateFile(path).load(profiler_contributors(after))
    (g,) = findings(after, kind="n_plus_one")
    assert (g["id"], g["route"], g["trace_ids"]) == (f["id"], "/orders", [f"{1:032x}"])
    assert after.endpoint_summary()[0] == before.endpoint_summary()[0]
    assert after.top(route="/orders") == before.top(route="/orders")
