"""The sans-IO parts: canonical units and keys, the policy, the LRU's accounting."""

from __future__ import annotations

import gc
import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st

from sqlproxy.analysis.classify import classify
from sqlproxy.cache.keys import (
    binds_unnamed_first,
    canonical_unit,
    entry_key,
    settings_digest,
    statement_identity,
)
from sqlproxy.cache.policy import Catalog, RuleSet, hint_ttl, statement_problem
from sqlproxy.cache.store import ALL, Entry, LocalStore
from sqlproxy.config import CacheSection
from tests.cache.conftest import DESCRIBE_PORTAL, EXECUTE, FLUSH, SYNC, bind, msg, parse


def test_canonical_forms() -> None:
    q = msg(b"Q", b"SELECT 1\0")
    c = canonical_unit(q, {}, None)
    assert c is not None and c.sqls == ("SELECT 1",)
    unit = parse("SELECT $1::int", types=(23,)) + bind([b"1"]) + DESCRIBE_PORTAL + EXECUTE + SYNC
    a = canonical_unit(unit, {}, None)
    assert a is not None and a.sqls == ("SELECT $1::int",)
    assert a.parses_unnamed == statement_identity(parse("SELECT $1::int", types=(23,)))
    # Other parameter values, formats or result formats: other units.
    for other in (bind([b"2"]), bind([b"1"], result_formats=(1,)), bind([b"1"], formats=(0,))):
        b = canonical_unit(parse("SELECT $1::int", types=(23,)) + other + DESCRIBE_PORTAL
                           + EXECUTE + SYNC, {}, None)
        assert b is not None and b.data != a.data
    # A named statement is known by what it names, whatever its name.
    ident = statement_identity(parse("SELECT $1::int", name=b"s1", types=(23,)))
    x = canonical_unit(bind([b"1"], name=b"s1") + EXECUTE + SYNC, {b"s1": ident}, None)
    y = canonical_unit(bind([b"1"], name=b"other") + EXECUTE + SYNC, {b"other": ident}, None)
    assert x is not None and y is not None and x.data == y.data
    # No key: a named Parse, an unknown statement, Flush, a row limit, no Execute.
    assert canonical_unit(parse("SELECT 1", name=b"n") + SYNC, {}, None) is None
    assert canonical_unit(bind([], name=b"nope") + EXECUTE + SYNC, {}, None) is None
    assert canonical_unit(parse("SELECT 1") + bind([]) + EXECUTE + FLUSH, {}, None) is None
    assert canonical_unit(parse("SELECT 1") + bind([]) + msg(b"E", b"\0\0\0\0\5") + SYNC,
                          {}, None) is None
    assert canonical_unit(parse("SELECT 1") + SYNC, {}, None) is None
    assert binds_unnamed_first(bind([]) + EXECUTE + SYNC)
    assert not binds_unnamed_first(parse("SELECT 1") + bind([]) + EXECUTE + SYNC)


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_canonical_unit_never_raises(data: bytes) -> None:
    canonical_unit(data, {}, None)
    canonical_unit(data, {b"": b"SELECT 1\0\0\0"}, b"x\0\0\0")
    binds_unnamed_first(data)


@given(st.lists(st.tuples(st.sampled_from([b"P", b"B", b"D", b"E", b"S", b"Q", b"H", b"C"]),
                          st.binary(max_size=30)), max_size=8))
@settings(max_examples=300, deadline=None)
def test_canonical_unit_on_framed_garbage(parts: list[tuple[bytes, bytes]]) -> None:
    data = b"".join(msg(t, body) for t, body in parts)
    out = canonical_unit(data, {}, None)
    assert out is None or isinstance(out.data, bytes)


def test_keys_differ_by_context() -> None:
    s1 = settings_digest({"TimeZone": "UTC", "application_name": "a"}, {}, [])
    s2 = settings_digest({"TimeZone": "UTC", "application_name": "b"}, {}, [])
    s3 = settings_digest({"TimeZone": "Asia/Tokyo"}, {}, [])
    s4 = settings_digest({"TimeZone": "UTC"}, {}, ["SET search_path = x"])
    assert s1 == s2 != s3 and s1 != s4
    k = entry_key("db", "u", s1, b"Q")
    assert k != entry_key("db2", "u", s1, b"Q") and k != entry_key("db", "u2", s1, b"Q")


def test_policy() -> None:
    cat = Catalog({"lower": "i", "now": "s", "random": "v", "count": "i"},
                  {"t": "r", "v": "v", "f": "f", "p": "p", "p1": "r"},
                  {"v": frozenset({"t"})}, {"p1": frozenset({"p"}), "p": frozenset({"p1"})},
                  loaded=True)
    wf: frozenset[str] = frozenset({"bump"})

    def problem(sql: str) -> str | None:
        return statement_problem(classify(sql), cat, wf)

    assert problem("select lower(v), count(*) from t where id = $1") is None
    assert problem("select now() from t") == "stable function now"
    assert problem("select random() from t") == "volatile function random"
    assert problem("select mystery(1) from t") == "unknown function mystery"
    assert problem("select * from t for update") == "for update"
    assert problem("update t set v = 1") == "update"
    assert problem("with x as (delete from t returning *) select * from x") is not None
    assert problem("select * into z from t") is not None
    assert cat.read_set(["v"]) == (frozenset({"v", "t"}), None)
    assert cat.read_set(["f"])[1] is not None
    assert cat.read_set(["pg_catalog.pg_class"])[1] is not None
    assert cat.affected(["p1"]) == {"p1", "p"}
    rules = RuleSet(CacheSection(rules=[{"table": "t", "ttl_s": 10},  # type: ignore[list-item]
                                        {"fingerprint": "abc", "ttl_s": 5}]))
    assert rules.cover("select 1", ["abc"], []) is not None
    cov = rules.cover("select * from t", ["x"], ["public.t"])
    assert cov is not None and cov.ttl_s == 10
    assert rules.cover("select * from u", ["x"], ["u"]) is None
    assert hint_ttl("/* sqlproxy:cache ttl=7 */ select 1", 60, 3600) == 7
    assert hint_ttl("/* SQLPROXY:CACHE */ select 1", 60, 3600) == 60
    assert hint_ttl("/* sqlproxy:cache ttl=99999 */ select 1", 60, 3600) == 3600
    assert hint_ttl("select 1", 60, 3600) is None


def _entry(i: int, size: int = 100, table: str = "t", db: str = "d") -> Entry:
    return Entry(i.to_bytes(20, "big"), bytes(size), db, frozenset({table}), 1e12, "r", "fp")


def test_lru_accounting_and_invalidation() -> None:
    store = LocalStore(10 * _entry(0).size)
    for i in range(25):
        assert store.put(_entry(i, table="a" if i % 2 else "b"))
        assert store.bytes <= store.max_bytes
    assert len(store) == 10 and store.stats.total.evictions == 15
    assert store.get((24).to_bytes(20, "big"), 0) is not None
    assert store.get((0).to_bytes(20, "big"), 0) is None
    since = store.clock
    assert store.invalidate("d", {"a"}) == 5
    assert not store.may_store("d", {"a"}, since) and store.may_store("d", {"b"}, since)
    assert store.invalidate("other", {ALL}) == 0
    assert store.invalidate("d", {ALL}) == 5
    assert store.bytes == 0 and len(store) == 0
    assert store.stats.total.entries == 0 and store.stats.total.bytes == 0
    assert not store.put(_entry(1, size=store.max_bytes))  # alone over max_bytes
    store.put(Entry(b"x" * 20, b"v", "d", frozenset({"t"}), 5.0, "r", "fp"))
    assert store.get(b"x" * 20, 6.0) is None and store.stats.total.expirations == 1


def test_memory_within_max_bytes_under_100000_keys() -> None:
    """The accounting covers what the store really allocates: with 100,000 distinct keys
    going through a 4 MB store, tracemalloc sees no more than max_bytes held by it."""
    max_bytes = 4 * 1024 * 1024
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        store = LocalStore(max_bytes)
        tables = [frozenset({f"t{i}"}) for i in range(50)]
        for i in range(100_000):
            store.put(Entry(i.to_bytes(20, "big"), bytes(60 + i % 200), "db", tables[i % 50],
                            1e12, "rule", "fp"))
            assert store.bytes <= max_bytes
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert store.stats.total.evictions > 80_000
    assert held <= max_bytes, (held, len(store))
