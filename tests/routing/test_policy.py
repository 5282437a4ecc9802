"""The routing decision: replica only for provably read-only units."""

from __future__ import annotations

import pytest

from sqlproxy.analysis.classify import classify
from sqlproxy.analysis.normalize import scan
from sqlproxy.routing.policy import (
    Decision,
    FunctionPolicy,
    RoutedStatement,
    SessionView,
    Target,
    decide,
)

# What pg_proc says about a few functions (the proxy reads this from the primary).
VOLATILITY = {
    "lower": "i",
    "pg_catalog.lower": "i",
    "now": "s",
    "count": "i",
    "coalesce": "i",
    "nextval": "v",
    "setval": "v",
    "txid_current": "v",
    "random": "v",
    "add_order": "v",  # a plpgsql function that INSERTs
    "price_of": "s",
}
FUNCS = FunctionPolicy(volatility=VOLATILITY)


def statements(sql: str) -> list[RoutedStatement]:
    return [RoutedStatement(n.text, classify(n.text), n.hints) for n in scan(sql)]


def route(sql: str, session: SessionView | None = None,
          functions: FunctionPolicy = FUNCS) -> Decision:
    return decide(statements(sql), session or SessionView(), functions)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        "select * from orders where id = 42",
        "SELECT o.*, c.name FROM orders o JOIN customers c ON c.id = o.customer_id LIMIT 10",
        "VALUES (1, 'a'), (2, 'b')",
        "TABLE orders",
        "SHOW search_path",
        "EXPLAIN SELECT * FROM orders",
        "EXPLAIN (ANALYZE, BUFFERS) SELECT count(*) FROM orders",
        "SELECT lower(name), now() FROM customers",
        "SELECT pg_catalog.lower('X')",
        "SELECT random(), clock_timestamp(), gen_random_uuid()",
        "WITH x AS (SELECT id FROM orders) SELECT * FROM x",
        "SELECT 1; SELECT 2",
        "SELECT price_of(3)",
        "/* sqlproxy:replica */ SELECT 1",
    ],
)
def test_read_only_statements_may_go_to_a_replica(sql: str) -> None:
    d = route(sql)
    assert d.target is Target.REPLICA, d
    assert not d.writes and not d.pin


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("SELECT nextval('orders_id_seq')", "volatile function nextval"),
        ("SELECT setval('s', 1)", "volatile function setval"),
        ("SELECT add_order(1, 2)", "volatile function add_order"),
        ("SELECT unknown_function(1)", "volatile function unknown_function"),
        ("SELECT txid_current()", "volatile function txid_current"),
        ("WITH u AS (UPDATE orders SET n = 1 RETURNING *) SELECT * FROM u", "modifying cte"),
        ("SELECT * FROM orders FOR UPDATE", "for update"),
        ("SELECT * FROM orders WHERE id = 1 FOR SHARE SKIP LOCKED", "for share"),
        ("SELECT * INTO copy_of_orders FROM orders", "select into"),
        ("INSERT INTO orders VALUES (1)", "insert"),
        ("UPDATE orders SET n = 1", "update"),
        ("DELETE FROM orders", "delete"),
        ("CREATE TABLE t (a int)", "ddl"),
        ("SELECT 1; UPDATE orders SET n = 1", "update"),
        ("EXPLAIN ANALYZE DELETE FROM orders", "writes"),
        ("COPY orders FROM STDIN", "copy"),
        ("CALL do_things()", "call"),
        ("DO $$ BEGIN END $$", "utility"),
        ("VACUUM orders", "utility"),
        ("NOTIFY chan", "utility"),
        ("BEGIN", "transaction block"),
        ("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY", "transaction block"),
        ("SET search_path = app, public", "session setting"),
        ("this is not sql", "not parsed"),
    ],
)
def test_anything_not_provably_read_only_goes_to_the_primary(sql: str, reason: str) -> None:
    d = route(sql)
    assert d.target is Target.PRIMARY
    assert reason in d.reason, d


def test_modifying_cte_reason() -> None:
    d = route("WITH u AS (UPDATE orders SET n = 1 RETURNING *) SELECT * FROM u")
    assert d.target is Target.PRIMARY and d.writes


def test_writes_mark_read_your_writes_but_settings_do_not() -> None:
    assert route("UPDATE orders SET n = 1").writes
    assert route("SELECT nextval('s')").writes
    assert not route("BEGIN").writes  # the statements in the block say whether it writes
    assert route("INSERT INTO t VALUES (1)", SessionView(in_transaction=True)).writes
    assert not route("SET search_path = app").writes
    assert not route("SELECT 1").writes


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TEMP TABLE scratch (a int)",
        "CREATE TEMPORARY TABLE scratch AS SELECT 1",
        "SELECT * INTO TEMP scratch FROM orders",
        "LISTEN jobs",
        "SELECT pg_advisory_lock(42)",
        "SELECT pg_try_advisory_lock(42)",
        "PREPARE q AS SELECT 1",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        "SELECT set_config('search_path', 'x', false)",
        "/* sqlproxy:replica */ LISTEN jobs",
    ],
)
def test_session_bound_features_pin_to_the_primary(sql: str) -> None:
    d = route(sql)
    assert d.target is Target.PRIMARY and d.pin, d


def test_transaction_scoped_lock_does_not_pin() -> None:
    d = route("SELECT pg_advisory_xact_lock(1)")
    assert d.target is Target.PRIMARY and not d.pin


def test_pinned_session_stays_on_the_primary() -> None:
    d = route("SELECT 1", SessionView(pinned=True))
    assert d.target is Target.PRIMARY and d.reason == "session pinned"


def test_transaction_blocks_stay_on_their_backend() -> None:
    on_primary = SessionView(in_transaction=True)
    assert route("SELECT 1", on_primary).target is Target.PRIMARY
    on_replica = SessionView(in_transaction=True, transaction_on_replica=True)
    assert route("SELECT 1", on_replica).target is Target.REPLICA
    assert route("COMMIT", on_replica).target is Target.REPLICA


def test_read_only_transaction_may_run_on_a_replica() -> None:
    for sql in ("BEGIN READ ONLY", "START TRANSACTION READ ONLY",
                "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
                "BEGIN READ ONLY; SELECT 1; COMMIT"):
        d = route(sql)
        assert d.target is Target.REPLICA, (sql, d)
        assert d.read_only_transaction
    d = route("BEGIN READ ONLY; UPDATE orders SET n = 1; COMMIT")
    assert d.target is Target.PRIMARY


def test_hints() -> None:
    assert route("/* sqlproxy:primary */ SELECT 1").target is Target.PRIMARY
    assert route("SELECT 1 -- sqlproxy:primary").target is Target.PRIMARY
    # The replica hint waives the volatility check only ...
    assert route("/* sqlproxy:replica */ SELECT add_order(1, 2)").target is Target.REPLICA
    # ... never sends a write.
    for sql in (
        "/* sqlproxy:replica */ UPDATE orders SET n = 1",
        "/* sqlproxy:replica */ SELECT * FROM orders FOR UPDATE",
        "/* sqlproxy:replica */ WITH u AS (DELETE FROM orders RETURNING 1) SELECT * FROM u",
        "/* sqlproxy:replica */ SELECT * INTO t2 FROM orders",
    ):
        assert route(sql).target is Target.PRIMARY, sql
    # Hints are per statement: a hint on one read does not move a write in the same unit.
    assert route("/* sqlproxy:replica */ SELECT 1; DELETE FROM t").target is Target.PRIMARY


def test_backend_pid_runs_where_the_client_pid_comes_from() -> None:
    """The driver reports the primary's backend PID: pg_backend_pid() agrees with it (and so
    do joins on pg_stat_activity / pg_locks by it). Not a write and not a pin."""
    for sql in ("SELECT pg_backend_pid()",
                "SELECT * FROM pg_stat_activity WHERE pid = pg_catalog.pg_backend_pid()"):
        d = route(sql)
        assert d.target is Target.PRIMARY, (sql, d)
        assert "primary's" in d.reason and not d.writes and not d.pin
    assert route("/* sqlproxy:replica */ SELECT pg_backend_pid()").target is Target.REPLICA


def test_function_lists_from_config() -> None:
    funcs = FunctionPolicy(read_only_functions=["add_order"], write_functions=["price_of"],
                           volatility=VOLATILITY)
    assert route("SELECT add_order(1)", functions=funcs).target is Target.REPLICA
    assert route("SELECT price_of(1)", functions=funcs).target is Target.PRIMARY
    # A configured write function wins over the replica hint and the default allow-list.
    funcs = FunctionPolicy(write_functions=["random"], volatility=VOLATILITY)
    assert route("/* sqlproxy:replica */ SELECT random()", functions=funcs).target is (
        Target.PRIMARY)


def test_schema_qualified_functions() -> None:
    assert route("SELECT public.add_order(1)").target is Target.PRIMARY
    assert route("SELECT pg_catalog.now()").target is Target.REPLICA


def test_no_replica_usable() -> None:
    d = route("SELECT 1", SessionView(replicas_usable=False))
    assert d.target is Target.PRIMARY


def test_empty_unit_goes_to_the_primary() -> None:
    assert decide([], SessionView(), FUNCS).target is Target.PRIMARY


def test_unknown_functions_are_known_as_unknown() -> None:
    assert FUNCS.known("lower") and FUNCS.known("random")
    assert not FUNCS.known("add_customer")
