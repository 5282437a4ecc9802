"""Classification of normalized statements, and the caches in front of it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sqlproxy.analysis.cache import StatementCache
from sqlproxy.analysis.classify import Shape, StatementKind, classify
from sqlproxy.analysis.normalize import normalize

K = StatementKind


def shape(sql: str) -> Shape:
    """Classify as the proxy does: the normalized text."""
    return classify(normalize(sql).text)


# ------------------------------------------------------------------------------- the examples


def test_plain_select_is_read_only() -> None:
    s = shape("SELECT abalance FROM pgbench_accounts WHERE aid = 48123")
    assert s.kind is K.SELECT
    assert s.command == "select"
    assert s.tables == ("pgbench_accounts",)
    assert not s.writes
    assert s.parsed


def test_nextval_in_select_is_a_function() -> None:
    s = shape("SELECT nextval('orders_id_seq')")
    assert s.kind is K.SELECT
    assert "nextval" in s.functions
    assert not s.writes  # the routing policy judges functions, from this list


def test_functions_are_named_as_written() -> None:
    s = shape(
        'SELECT now(), count(*), pg_catalog.now(), s.my_func(1), "MyFunc"(a), COALESCE(a, 1), '
        "random(), lower(b) FROM t"
    )
    assert s.functions == (
        "MyFunc",
        "coalesce",
        "count",
        "lower",
        "now",
        "pg_catalog.now",
        "random",
        "s.my_func",
    )


def test_set_returning_function_in_from() -> None:
    s = shape("select * from generate_series(1, 10) g join t on t.id = g")
    assert s.functions == ("generate_series",)
    assert s.tables == ("t",)


def test_modifying_cte_writes() -> None:
    s = shape("WITH u AS (UPDATE t SET a = 1 WHERE id = 2 RETURNING *) SELECT * FROM u")
    assert s.kind is K.SELECT
    assert s.modifying_cte
    assert s.writes
    assert s.tables == ("t",)  # the CTE name is not a table


def test_read_only_cte() -> None:
    s = shape("with x as (select 1) select * from x join y on true")
    assert not s.modifying_cte
    assert not s.writes
    assert s.tables == ("y",)


@pytest.mark.parametrize(
    ("sql", "locking"),
    [
        ("SELECT * FROM t WHERE id = 1 FOR UPDATE", "for update"),
        ("select * from t for no key update skip locked", "for no key update"),
        ("select * from t for share", "for share"),
        ("select * from t for key share nowait", "for key share"),
        ("select * from t join lateral (select * from u for update) x on true", "for update"),
    ],
)
def test_locking_clauses(sql: str, locking: str) -> None:
    s = shape(sql)
    assert s.kind is K.SELECT
    assert s.locking == locking
    assert s.writes


def test_select_into_writes() -> None:
    s = shape("SELECT a, b INTO new_table FROM t")
    assert s.kind is K.SELECT
    assert s.has_into
    assert s.writes
    assert s.tables == ("new_table", "t")


def test_limit_and_offset() -> None:
    s = shape("select * from t order by id limit 10 offset 100000")
    assert s.has_limit and s.has_offset
    s = shape("select * from t offset 5")
    assert not s.has_limit and s.has_offset
    assert not shape("select * from t").has_limit
    assert not shape("select * from t limit all").has_limit
    assert not shape("select * from (select * from t limit 1) s").has_limit  # only outermost
    assert shape("select * from t fetch first 5 rows only").has_limit
    assert shape("(select 1) union all (select 2) limit 5").has_limit


@pytest.mark.parametrize(
    ("sql", "kind", "tables"),
    [
        ("insert into t (a, b) values (1, 2), (3, 4) on conflict (a) do update set b = "
         "excluded.b returning id", K.INSERT, ("t",)),
        ("insert into t select * from s", K.INSERT, ("s", "t")),
        ("update t set a = a + 1 from s where s.id = t.id", K.UPDATE, ("s", "t")),
        ("delete from public.t where id in (1, 2, 3)", K.DELETE, ("public.t",)),
        ("merge into t using s on t.id = s.id when matched then update set a = 1", K.MERGE,
         ("s", "t")),
        ('select * from "MyTable" m, s."T"', K.SELECT, ("MyTable", "s.T")),
        ("values (1), (2)", K.SELECT, ()),
        ("table t", K.SELECT, ("t",)),
    ],
)  # fmt: skip
def test_dml_kinds_and_tables(sql: str, kind: StatementKind, tables: tuple[str, ...]) -> None:
    s = shape(sql)
    assert s.kind is kind
    assert s.tables == tables
    assert s.writes is (kind is not K.SELECT)
    assert s.parsed


@pytest.mark.parametrize(
    ("sql", "op", "read_only"),
    [
        ("BEGIN", "begin", False),
        ("BEGIN READ ONLY", "begin", True),
        ("begin transaction isolation level repeatable read, read only", "begin", True),
        ("START TRANSACTION READ ONLY", "begin", True),
        ("start transaction read write", "begin", False),
        ("COMMIT", "commit", False),
        ("END", "commit", False),
        ("ROLLBACK", "rollback", False),
        ("ABORT", "rollback", False),
        ("SAVEPOINT sp1", "savepoint", False),
        ("RELEASE SAVEPOINT sp1", "release", False),
        ("ROLLBACK TO SAVEPOINT sp1", "rollback_to", False),
        ("rollback to sp1", "rollback_to", False),
        ("PREPARE TRANSACTION 'tx1'", "prepare", False),
        ("COMMIT PREPARED 'tx1'", "commit_prepared", False),
        ("ROLLBACK PREPARED 'tx1'", "rollback_prepared", False),
        ("SET TRANSACTION READ ONLY", "set_transaction", True),
    ],
)
def test_transaction_control(sql: str, op: str, read_only: bool) -> None:
    s = shape(sql)
    assert s.kind is K.TRANSACTION
    assert s.transaction_op == op
    assert s.read_only_txn is read_only
    assert not s.writes


@pytest.mark.parametrize(
    ("sql", "kind", "command", "writes", "session_state"),
    [
        ("SET search_path = public", K.SET, "set", False, True),
        ("SET LOCAL statement_timeout = 5", K.SET, "set", False, True),
        ("RESET ALL", K.SET, "reset", False, True),
        ("SHOW work_mem", K.SHOW, "show", False, False),
        ("DISCARD ALL", K.UTILITY, "discard", False, True),
        ("LISTEN channel", K.UTILITY, "listen", True, True),
        ("UNLISTEN *", K.UTILITY, "unlisten", True, True),
        ("NOTIFY channel, 'payload'", K.UTILITY, "notify", True, False),
        ("EXECUTE q(1)", K.UTILITY, "execute", True, False),
        ("DEALLOCATE q", K.UTILITY, "deallocate", False, True),
        ("FETCH 10 FROM c", K.UTILITY, "fetch", False, False),
        ("MOVE NEXT IN c", K.UTILITY, "move", False, False),
        ("CLOSE c", K.UTILITY, "close", False, True),
        ("VACUUM ANALYZE t", K.UTILITY, "vacuum", True, False),
        ("ANALYZE t", K.UTILITY, "analyze", True, False),
        ("CLUSTER t", K.UTILITY, "cluster", True, False),
        ("REINDEX TABLE t", K.UTILITY, "reindex", True, False),
        ("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", K.UTILITY, "lock", True, False),
        ("REFRESH MATERIALIZED VIEW v", K.UTILITY, "refresh", True, False),
        ("CHECKPOINT", K.UTILITY, "checkpoint", True, False),
        ("DO $$ BEGIN PERFORM 1; END $$", K.UTILITY, "do", True, False),
        ("CALL my_proc(1, 2)", K.CALL, "call", True, False),
        ("COPY t FROM STDIN", K.COPY, "copy", True, False),
        ("COPY t (a, b) TO STDOUT", K.COPY, "copy", False, False),
        ("COPY (SELECT * FROM t) TO STDOUT WITH CSV", K.COPY, "copy", False, False),
        ("COPY t TO '/tmp/x.csv'", K.COPY, "copy", True, False),
        ("CREATE TABLE s.x (a varchar(10))", K.DDL, "create", True, False),
        ("CREATE TEMP TABLE x (a int)", K.DDL, "create", True, True),
        ("create temporary table x as select * from y", K.DDL, "create", True, True),
        ("CREATE INDEX CONCURRENTLY i ON t (a)", K.DDL, "create", True, False),
        ("DROP TABLE x", K.DDL, "drop", True, False),
        ("ALTER TABLE x ADD COLUMN b int", K.DDL, "alter", True, False),
        ("TRUNCATE t", K.DDL, "truncate", True, False),
        ("GRANT SELECT ON t TO bob", K.DDL, "grant", True, False),
        ("COMMENT ON TABLE t IS 'x'", K.DDL, "comment", True, False),
    ],
)
def test_utility_statements(
    sql: str, kind: StatementKind, command: str, writes: bool, session_state: bool
) -> None:
    s = shape(sql)
    assert s.kind is kind
    assert s.command == command
    assert s.writes is writes
    assert s.session_state is session_state


def test_statements_carrying_statements() -> None:
    s = shape("PREPARE q (int) AS SELECT * FROM t WHERE a = $1")
    assert (s.kind, s.tables, s.writes, s.session_state) == (K.UTILITY, ("t",), False, True)
    s = shape("PREPARE d AS DELETE FROM t")
    assert s.writes
    s = shape("DECLARE c CURSOR WITH HOLD FOR SELECT * FROM t FOR UPDATE")
    assert (s.kind, s.tables, s.locking, s.writes) == (K.UTILITY, ("t",), "for update", True)
    assert shape("COPY (SELECT nextval('s')) TO STDOUT").functions == ("nextval",)
    assert shape("COPY t TO STDOUT").tables == ("t",)
    assert shape("CALL s.proc()").functions == ("s.proc",)


@pytest.mark.parametrize(
    ("sql", "writes"),
    [
        ("EXPLAIN SELECT * FROM t", False),
        ("EXPLAIN DELETE FROM t", False),  # planned, not run
        ("EXPLAIN ANALYZE DELETE FROM t", True),  # run
        ("EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET a = 1", True),
        ("EXPLAIN (ANALYZE) SELECT * FROM t", False),
        ("EXPLAIN (FORMAT JSON) SELECT * FROM t", False),
    ],
)
def test_explain(sql: str, writes: bool) -> None:
    s = shape(sql)
    assert s.kind is K.EXPLAIN
    assert s.writes is writes
    assert s.tables == ("t",)


@pytest.mark.parametrize(
    "sql",
    [
        "garbage text here !!",
        "select from where",
        "SELECT * FROM",
        ")))",
        "select 1; select 2",
        "start",
        "",
        "   ",
        "$1",
        "'x'",
        "select " + "(" * 3000 + "1" + ")" * 3000,
        "with x as (",
        "\x00",
    ],
)
def test_unparseable_text_never_raises(sql: str) -> None:
    s = classify(sql)
    assert isinstance(s.kind, StatementKind)
    if s.kind is K.OTHER and sql.strip():
        assert s.writes and not s.parsed


def test_garbage_is_unparsed_and_writes() -> None:
    s = classify("frobnicate the widgets")
    assert s.kind is K.OTHER
    assert not s.parsed
    assert s.writes


def test_unparseable_select_falls_back_to_keywords() -> None:
    s = classify("select nextval($1) from t where x = ??? for update")
    assert s.kind is K.SELECT
    assert not s.parsed
    assert s.locking == "for update"
    assert s.writes
    assert "nextval" in s.functions
    assert "t" in s.tables
    s = classify("with w as (delete from t returning *) select ??? from w")
    assert not s.parsed and s.modifying_cte and s.writes
    s = classify("select f(x) from t where a = = 1")
    assert not s.parsed and not s.writes and s.functions == ("f",)


def test_collapsed_lists_parse() -> None:
    for sql in [
        "select * from t where id in (1, 2, 3) and b = any(array[1, 2])",
        "insert into t (a, b) values (1, 'x'), (2, 'y') on conflict do nothing",
        "select * from t where a=1 and b=2||3",  # `$1=$2` trips sqlglot's tokenizer unless spaced
    ]:
        assert shape(sql).parsed, sql


def test_kind_values_are_lowercase_strings() -> None:
    assert all(k.value == k.value.lower() for k in StatementKind)
    assert str(K.SELECT) == "select"


@given(st.text(max_size=120))
@settings(max_examples=150, deadline=None)
def test_classify_never_raises(text: str) -> None:
    s = classify(text)
    assert isinstance(s, Shape)
    classify(normalize(text).text)


# ------------------------------------------------------------------------------------- cache


def test_cache_by_raw_text_and_by_fingerprint() -> None:
    cache = StatementCache(max_raw=2, max_shapes=2)
    a = cache.scan("select * from t where id = 1")
    assert cache.scan("select * from t where id = 1") is a
    assert (cache.raw_hits, cache.raw_misses) == (1, 1)
    b = cache.scan("select * from t where id = 2")
    assert b[0].fingerprint == a[0].fingerprint
    sa = cache.shape(a[0])
    assert cache.shape(b[0]) is sa
    assert (cache.shape_hits, cache.shape_misses) == (1, 1)
    assert sa.tables == ("t",)


def test_cache_is_bounded_lru() -> None:
    cache = StatementCache(max_raw=2, max_shapes=2)
    cache.scan("select 1")
    cache.scan("select 2")
    cache.scan("select 1")  # refreshes "select 1"
    cache.scan("select 3")  # evicts "select 2"
    assert len(cache) == 2
    cache.scan("select 1")
    assert cache.raw_hits == 2
    cache.scan("select 2")
    assert cache.raw_misses == 4
    for sql in ("select 1 from a", "select 1 from b", "select 1 from c"):
        cache.shape(cache.scan(sql)[0])
    assert cache.shape_count == 2


def test_cache_skips_long_texts() -> None:
    cache = StatementCache(max_text_length=100)
    long = "insert into t values " + ", ".join(f"({i})" for i in range(100))
    assert cache.scan(long)[0].text == "insert into t values ($1) /*, ... */"
    assert len(cache) == 0


def test_cache_multi_statement_and_empty() -> None:
    cache = StatementCache()
    assert [n.text for n in cache.scan("begin; select 1; commit")] == [
        "begin",
        "select $1",
        "commit",
    ]
    assert cache.scan("") == []
    assert cache.scan("") == []


def test_cache_rejects_silly_sizes() -> None:
    with pytest.raises(ValueError):
        StatementCache(max_raw=0)


def test_the_first_word_must_lead() -> None:
    assert classify("$1 select").kind is K.OTHER
    assert classify("((select 1))").kind is K.SELECT
