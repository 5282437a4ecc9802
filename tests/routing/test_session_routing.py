"""A routed session's routing state over its life: pins, writes, horizon, replica backoff."""

from __future__ import annotations

from sqlproxy.analysis.classify import classify
from sqlproxy.analysis.normalize import scan
from sqlproxy.routing.policy import FunctionPolicy, RoutedStatement, Target
from sqlproxy.routing.session_routing import SessionRouting
from sqlproxy.routing.tables import ALL

FUNCS = FunctionPolicy(volatility={"now": "s"})


def stmts(sql: str) -> list[RoutedStatement]:
    return [RoutedStatement(n.text, classify(n.text), n.hints) for n in scan(sql)]


def decide(r: SessionRouting, sql: str | None, **kw: bool):  # type: ignore[no-untyped-def]
    return r.decide(None if sql is None else stmts(sql), in_transaction=kw.get("tx", False),
                    transaction_on_replica=kw.get("tx_replica", False), functions=FUNCS)


def test_reads_go_to_replicas_and_a_write_sets_the_horizon() -> None:
    r = SessionRouting(table_mode=True)
    d = decide(r, "SELECT * FROM t WHERE id = 1")
    assert d is not None and d.target is Target.REPLICA and not r.dirty
    d = decide(r, "UPDATE orders SET n = 1")
    assert d is not None and d.target is Target.PRIMARY and r.dirty
    assert r.primary_idle(horizon=7) == {"orders"}
    assert r.horizon == 7 and not r.dirty and r.written == set()
    assert r.primary_idle(horizon=9) is None and r.horizon == 7  # nothing new written


def test_unknown_statements_may_have_written_everything() -> None:
    r = SessionRouting(table_mode=True)
    assert decide(r, None) is None
    assert r.dirty and r.written == {ALL}


def test_a_pin_is_for_good() -> None:
    r = SessionRouting(table_mode=False)
    d = decide(r, "LISTEN chan")
    assert d is not None and d.pin and r.pinned
    d = decide(r, "SELECT 1")
    assert d is not None and d.target is Target.PRIMARY and d.reason == "session pinned"


def test_a_lone_commit_is_not_worth_a_replica() -> None:
    assert decide(SessionRouting(table_mode=False), "COMMIT") is None


def test_replica_backoff_doubles_up_to_thirty_seconds() -> None:
    r = SessionRouting(table_mode=False)
    r.connect_failed("r1", now=100.0)
    assert r.excluded(100.1) == {"r1"} and r.excluded(100.3) == frozenset()
    for _ in range(10):
        r.connect_failed("r1", now=100.0)
    assert r.excluded(129.9) == {"r1"} and r.excluded(130.1) == frozenset()
    r.connected("r1")
    assert r.excluded(100.0) == frozenset()


def test_no_usable_replica_keeps_reads_on_the_primary() -> None:
    r = SessionRouting(table_mode=False)
    r.no_replica = True
    d = decide(r, "SELECT 1")
    assert d is not None and d.target is Target.PRIMARY
