"""``read_your_writes = "table"``: other sessions' reads of a table just written stay on the
primary until a replica has replayed the write; reads of other tables keep using the replica."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest

from sqlproxy.analysis.cache import StatementCache
from sqlproxy.routing.policy import FunctionPolicy, RoutedStatement
from sqlproxy.routing.tables import ALL, TableHorizons, view_closure, written_tables
from tests.routing.test_routing import calls, router_of, wait_for, wait_ready
from tests.support.clients import unique_name
from tests.support.pg import PgCluster
from tests.support.proxy import ProxyThread

# -------------------------------------------------------------------------------- unit level

_cache = StatementCache()


def stmts(sql: str) -> list[RoutedStatement]:
    return [RoutedStatement(n.text, _cache.shape(n), n.hints) for n in _cache.scan(sql)]


FUNCS = FunctionPolicy(volatility={"lower": "i", "now": "s", "my_writer": "v"})


@pytest.mark.parametrize(("sql", "tables"), [
    ("UPDATE a SET v = 1 FROM b WHERE a.id = b.id", {"a", "b"}),
    ("INSERT INTO s.t (x) VALUES (lower('A'))", {"t"}),
    ("DELETE FROM \"Mixed\" WHERE id = 1", {"Mixed"}),
    ("WITH u AS (UPDATE t SET v = 1 RETURNING id) SELECT id FROM u", {"t"}),
    ("SELECT nextval('seq')", set()),
    ("SELECT my_writer(1)", {ALL}),
    ("SELECT unknown_function()", {ALL}),
    ("CALL proc()", {ALL}),
    ("DO $$ BEGIN END $$", {ALL}),
    ("TRUNCATE t1, t2", {"t1", "t2"}),
    ("BEGIN; UPDATE t SET v = 2; SELECT * FROM u; COMMIT", {"t"}),
])
def test_written_tables(sql: str, tables: set[str]) -> None:
    assert written_tables(stmts(sql), FUNCS) == tables


def test_unknown_unit_writes_everything() -> None:
    assert written_tables(None, FUNCS) == {ALL}


def test_horizons() -> None:
    h = TableHorizons()
    assert h.horizon(("t",)) == 0
    h.note_writes({"t"}, 5)
    h.note_writes({"t"}, 3)  # an older horizon never lowers a newer one
    h.note_writes({"u"}, 7)
    assert h.horizon(("t",)) == 5
    assert h.horizon(("public.t", "x")) == 5  # schema ignored; x was never written
    assert h.horizon(("x",)) == 0
    h.relations = frozenset({"t", "u", "v", "x"})
    h.views = view_closure([("v", "w"), ("w", "u")])  # v reads w, which reads u
    assert h.horizon(("v",)) == 7
    assert h.horizon(("brand_new",)) == 7  # unknown to the catalog: the latest of all
    h.note_writes({ALL}, 9)
    assert h.horizon(("x",)) == 9
    h.prune(lambda cycle: cycle <= 7)
    assert h.written == {ALL: 9}


# -------------------------------------------------------------------------------- integration


def test_other_sessions_read_a_written_table_fresh(
    make_proxy: Callable[..., ProxyThread], pg_primary: PgCluster, pg_replica: PgCluster
) -> None:
    t, other, view, fn = (unique_name(p) for p in ("hot", "cold", "hotv", "hotfn"))
    pg_primary.psql(
        f"CREATE TABLE {t} (id int PRIMARY KEY, v int); INSERT INTO {t} VALUES (1, 0);"
        f"CREATE TABLE {other} (id int PRIMARY KEY, v int); INSERT INTO {other} VALUES (1, 0);"
        f"CREATE VIEW {view} AS SELECT id, v AS w FROM {t};"
        f"CREATE FUNCTION {fn}(n int) RETURNS int LANGUAGE plpgsql AS $$ BEGIN "
        f"UPDATE {t} SET v = n WHERE id = 1; RETURN n; END $$"
    )
    pg_replica.set_apply_delay(0)
    pg_replica.wait_for_replay()
    table_mode = make_proxy(routing={"enabled": True, "health_interval_ms": 50,
                                     "read_your_writes": "table"},
                            replicas=[{"url": pg_replica.dsn(), "name": "r1"}])
    wait_ready(table_mode)  # the function and relation catalogs, with the view
    router = router_of(table_mode)
    pg_replica.set_apply_delay(300)
    try:
        with psycopg.connect(table_mode.dsn(), autocommit=True) as writer, \
                psycopg.connect(table_mode.dsn(), autocommit=True) as reader:
            for i in range(1, 11):
                writer.execute(f"UPDATE {t} SET v = %s WHERE id = 1", (i,))
                assert reader.execute(f"SELECT v FROM {t} WHERE id = 1").fetchone() == (i,)
                assert reader.execute(f"SELECT w FROM {view} WHERE id = 1").fetchone() == (i,)
                # A table nobody wrote is still read from the replica.
                assert reader.execute(f"SELECT v FROM {other} WHERE id = 1").fetchone() == (0,)
            assert calls(pg_replica, f"SELECT v FROM {other}") == 10
            for i in range(11, 16):
                # A write the proxy cannot attribute to a table: it may have written any.
                writer.execute(f"SELECT {fn}(%s)", (i,))
                assert reader.execute(f"SELECT v FROM {t} WHERE id = 1").fetchone() == (i,)
                assert reader.execute(f"SELECT w FROM {view} WHERE id = 1").fetchone() == (i,)
        assert calls(pg_replica, f"SELECT v FROM {t}") == 0
        assert calls(pg_replica, f"SELECT w FROM {view}") == 0
    finally:
        pg_replica.set_apply_delay(0)
    # Once the replica has replayed the writes, reads of the table return to it.
    with psycopg.connect(table_mode.dsn(), autocommit=True) as reader:
        wait_for(lambda: (reader.execute(f"SELECT v FROM {t} WHERE id = 1").fetchone() == (15,)
                          and calls(pg_replica, f"SELECT v FROM {t}") > 0),
                 what="reads of the table back on the replica")
    assert table_mode.call(lambda: dict(router._tables["postgres"].written)) == {}
    pg_primary.psql(f"DROP VIEW {view}; DROP TABLE {t}, {other}; DROP FUNCTION {fn}(int)")
