"""The literal scanner: concrete forms, statement splitting, and properties."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sqlproxy.analysis.normalize import HINTS, Normalized, fingerprint_of, normalize, scan

# ---------------------------------------------------------------------------------- examples


@pytest.mark.parametrize(
    ("sql", "text", "values"),
    [
        # numbers
        ("SELECT 1", "select $1", ("1",)),
        ("select 42, 3.14, .5, 1e10, 2.5E-3, 0x1F, 1_000", "select $1, $2, $3, $4, $5, $6, $7",
         ("42", "3.14", ".5", "1e10", "2.5E-3", "0x1F", "1_000")),
        # negative numbers fold after an operator, '(' or ','; a binary minus stays
        ("select * from t where a = -5", "select * from t where a = $1", ("-5",)),
        ("select f(-1, -2.5)", "select f($1, $2)", ("-1", "-2.5")),
        ("select a -1, a-1", "select a -$1, a-$2", ("1", "1")),
        ("update a set b = b + -4711 where c = 1",
         "update a set b = b + $1 where c = $2", ("-4711", "1")),
        # strings
        ("select 'abc'", "select $1", ("'abc'",)),
        ("select 'it''s'", "select $1", ("'it''s'",)),
        ("select E'a\\'b\\\\'", "select $1", ("E'a\\'b\\\\'",)),
        ("select e'x'", "select $1", ("e'x'",)),
        ("select U&'d\\0061t' UESCAPE '!'", "select $1", ("U&'d\\0061t' UESCAPE '!'",)),
        ("select B'0101', X'1F', N'nat'", "select $1, $2, $3", ("B'0101'", "X'1F'", "N'nat'")),
        ("select $$a ' b$$", "select $1", ("$$a ' b$$",)),
        ("select $fn$ x $$ y $fn$", "select $1", ("$fn$ x $$ y $fn$",)),
        ("select 'a' || 'b'", "select $1 || $2", ("'a'", "'b'")),
        # booleans; NULL stays; IS TRUE is a test
        ("select true, FALSE, null", "select $1, $2, null", ("true", "FALSE")),
        ("select * from t where a is true and b is not false and c = true",
         "select * from t where a is true and b is not false and c = $1", ("true",)),
        # casts stay, type modifiers stay
        ("select 'abc'::text, '1'::int[], 5::numeric(10,2)",
         "select $1::text, $2::int[], $3::numeric(10, 2)", ("'abc'", "'1'", "5")),
        ("select cast(x as varchar(20)), interval '1 day'",
         "select cast(x as varchar(20)), interval $1", ("'1 day'",)),
        ("create table t (a character varying(10), b timestamp(3))",
         "create table t (a character varying(10), b timestamp(3))", ()),
        # identifiers with digits, `$` in identifiers, parameters
        ("select t1.col_2, x$1 from t1", "select t1.col_2, x$1 from t1", ()),
        ("select * from t where a = $1 and b = 7", "select * from t where a = $1 and b = $2",
         ("7",)),
        ("select $2, $1, $2", "select $1, $2, $1", ()),
        # quoted identifiers kept exactly, case and all
        ('SELECT "MyCol", "x""y" FROM "MyTable" WHERE "1" = 1',
         'select "MyCol", "x""y" from "MyTable" where "1" = $1', ("1",)),
        ('select "a -- b", "c /* d */"', 'select "a -- b", "c /* d */"', ()),
        # case folding and whitespace
        ("SELECT  A,B ,  C\n\tFROM  T  WHERE ( X = 1 )",
         "select a, b, c from t where (x = $1)", ("1",)),
        ("select f( a , b )", "select f(a, b)", ()),
        # comments
        ("select 1 -- trailing", "select $1", ("1",)),
        ("/* lead */ select /* mid */ 1 /* end */", "select $1", ("1",)),
        ("select /* a /* nested */ b */ 1", "select $1", ("1",)),
        ("select f(/* x */ 1 /* y */, 2)", "select f($1, $2)", ("1", "2")),
        ("select a/**/from t", "select a from t", ()),
        # OFFSET
        ("select * from t limit 10 offset 5000", "select * from t limit $1 offset $2",
         ("10", "5000")),
    ],
)  # fmt: skip
def test_forms(sql: str, text: str, values: tuple[str, ...]) -> None:
    n = normalize(sql)
    assert n.text == text
    assert n.values == values
    assert n.fingerprint == fingerprint_of(text)


@pytest.mark.parametrize(
    ("sql", "text"),
    [
        ("select * from t where id in (1, 2, 3)", "select * from t where id in ($1 /*, ... */)"),
        ("select * from t where id IN ('a','b')", "select * from t where id in ($1 /*, ... */)"),
        ("select * from t where id in ($1, $2, $3) and b = $4",
         "select * from t where id in ($1 /*, ... */) and b = $2"),
        ("select * from t where id in ($1::int, $2::int)",
         "select * from t where id in ($1::int /*, ... */)"),
        ("select * from t where id not in (-1, 2)",
         "select * from t where id not in ($1 /*, ... */)"),
        ("select * from t where id = any(array[1, 2, 3])",
         "select * from t where id = any(array[$1 /*, ... */])"),
        ("insert into t (a, b) values (1, 'x'), (2, 'y'), (3, null)",
         "insert into t (a, b) values ($1, $2) /*, ... */"),
        ("insert into t values (default, 1), (default, 2)",
         "insert into t values (default, $1) /*, ... */"),
        ("select * from t where id in (1)", "select * from t where id in ($1 /*, ... */)"),
        ("select * from t where id = any(array[$1])",
         "select * from t where id = any(array[$1 /*, ... */])"),
        # not collapsed: one row, non-constant elements, a subquery
        ("insert into t (a) values (1)", "insert into t (a) values ($1)"),
        ("select * from t where id in (a, b)", "select * from t where id in (a, b)"),
        ("select * from t where id in (1, f(2))", "select * from t where id in ($1, f($2))"),
        ("select * from t where id in (select 1)", "select * from t where id in (select $1)"),
        ("insert into t values (1, now()), (2, now())",
         "insert into t values ($1, now()), ($2, now())"),
    ],
)  # fmt: skip
def test_collapsed_lists(sql: str, text: str) -> None:
    assert normalize(sql).text == text


def test_collapsed_lists_keep_every_value() -> None:
    n = normalize("select * from t where a in (1, 'x''y', E'\\n', -2, TRUE) and b = 9")
    assert n.values == ("1", "'x''y'", "E'\\n'", "-2", "TRUE", "9")
    n = normalize("insert into t values (1, 'a'), (2, NULL), (3, 'c')")
    assert n.values == ("1", "'a'", "2", "3", "'c'")


def test_in_lists_of_3_and_30_share_a_fingerprint() -> None:
    three = normalize("select * from users where id in (1, 2, 3) and active")
    thirty = normalize(f"select * from users where id in ({', '.join(map(str, range(30)))}) "
                       "and active")  # fmt: skip
    dollars = ",".join(f"${i}" for i in range(1, 31))
    params = normalize(f"select * from users where id in ({dollars}) and active")
    assert three.fingerprint == thirty.fingerprint == params.fingerprint
    assert len(thirty.values) == 30


def test_values_of_2_and_50_rows_share_a_fingerprint() -> None:
    def insert(rows: int) -> Normalized:
        body = ", ".join(f"({i}, 'name {i}', {i * 1.5})" for i in range(rows))
        return normalize(f"INSERT INTO t (a, b, c) VALUES {body} RETURNING id")

    assert insert(2).fingerprint == insert(50).fingerprint
    assert insert(2).text == "insert into t (a, b, c) values ($1, $2, $3) /*, ... */ returning id"
    assert insert(1).fingerprint != insert(2).fingerprint  # a one-row INSERT is its own shape
    assert len(insert(50).values) == 150


def test_numbering_after_a_collapsed_list_does_not_depend_on_its_length() -> None:
    a = normalize("select * from t where a in (1, 2) and b = 'x' and c = $9")
    b = normalize("select * from t where a in (1, 2, 3, 4, 5) and b = 'y' and c = $9")
    assert a.text == b.text == "select * from t where a in ($1 /*, ... */) and b = $2 and c = $3"


def test_hints() -> None:
    n = normalize("/* sqlproxy:replica */ select 1")
    assert n.hints == {"replica"}
    assert n.text == "select $1"
    n = normalize("select 1 -- sqlproxy:primary sqlproxy:ignore\n")
    assert n.hints == {"primary", "ignore"}
    assert normalize("SELECT 1 /* SQLPROXY:Replica */").hints == {"replica"}
    assert normalize("select 1 /* sqlproxy:unknown */").hints == frozenset()
    assert normalize("select '/* sqlproxy:replica */'").hints == frozenset()
    assert {"ignore", "primary", "replica"} == HINTS


def test_offset_is_recorded_from_the_literal() -> None:
    assert normalize("select * from t order by id limit 20 offset 100000").offset == 100000
    assert normalize("select * from t offset 5 rows").offset == 5
    assert normalize("select * from t limit 20").offset is None
    assert normalize("select * from t offset $1").offset is None
    sub = normalize("select * from (select * from t offset 10) s offset 300")
    assert sub.offset == 300


def test_fingerprint_is_stable() -> None:
    # blake2b of the text, 8 bytes: the same in every process, across restarts.
    n = normalize("SELECT abalance FROM pgbench_accounts WHERE aid = 48123;")
    assert n.text == "select abalance from pgbench_accounts where aid = $1"
    assert n.fingerprint == "d5a947714c2ed465"
    assert re.fullmatch(r"[0-9a-f]{16}", n.fingerprint)


def test_literals_and_comments_do_not_change_the_fingerprint() -> None:
    a = normalize("SELECT * FROM t WHERE a = 1 AND b = 'x' /* app=1 */")
    b = normalize("select *\nfrom t\nwhere a = 22 and b = 'yy' -- trace=abc")
    assert a.fingerprint == b.fingerprint
    assert a.values != b.values


# ---------------------------------------------------------------------------------- splitting


def test_scan_splits_statements() -> None:
    got = scan("select 1; select 'a;b'; select $$;$$ ; select /* ; */ 2 -- ;\n; select \";\"")
    assert [n.text for n in got] == ["select $1"] * 4 + ['select ";"']
    assert [n.values for n in got] == [("1",), ("'a;b'",), ("$$;$$",), ("2",), ()]


def test_scan_numbering_restarts_per_statement() -> None:
    got = scan("select 1, 2; select 3")
    assert [n.text for n in got] == ["select $1, $2", "select $1"]


def test_scan_hints_and_offsets_are_per_statement() -> None:
    got = scan("/* sqlproxy:primary */ select 1 offset 9; select 2")
    assert got[0].hints == {"primary"} and got[0].offset == 9
    assert got[1].hints == frozenset() and got[1].offset is None


def test_scan_does_not_split_inside_parentheses() -> None:
    got = scan("create rule r as on insert to t do also (insert into a values (1); notify x); "
               "select 1")  # fmt: skip
    assert len(got) == 2
    assert got[0].text.endswith("(insert into a values ($1); notify x)")


@pytest.mark.parametrize("sql", ["", " ", ";", " ; ;; \n", "-- only a comment", "/* x */ ;"])
def test_scan_empty(sql: str) -> None:
    assert scan(sql) == []
    assert normalize(sql).text == ""


def test_normalize_keeps_one_statement() -> None:
    assert normalize("select 1;").text == "select $1"
    assert normalize("select 1;\n").text == "select $1"
    n = normalize("select 1; select 2")
    assert n.text == "select $1; select $2"
    assert n.values == ("1", "2")


@pytest.mark.parametrize(
    "sql",
    [
        "select 'unterminated",
        'select "unterminated',
        "select $$unterminated",
        "select /* unterminated",
        "select E'\\",
        "select /* /* /* /* too deep */ */ */ */ 1",
        "\x00select\x00 1",
        "select '\ud800'",
        "SELECT İ FROM ﬁ",
    ],
)
def test_odd_input_does_not_raise(sql: str) -> None:
    n = normalize(sql)
    assert re.fullmatch(r"[0-9a-f]{16}", n.fingerprint)
    scan(sql)


def test_non_ascii_identifiers_are_kept_and_only_ascii_is_folded() -> None:
    n = normalize("SELECT Größe FROM Straße WHERE x = 'Ä'")
    assert n.text == "select größe from straße where x = $1"
    assert n.values == ("'Ä'",)


# --------------------------------------------------------------------------------- properties

_SQLISH = st.text(
    alphabet="'\"$;()[],.-+/*=:\\ \n\t0123456789eExXbBnNuU&abcinvalustrfo_", max_size=80
)


@given(st.one_of(st.text(max_size=200), _SQLISH))
@example("select $a$ $b$ $a$")
@example("'''")
@example("e'\\''")
@settings(max_examples=400)
def test_scan_never_raises(sql: str) -> None:
    statements = scan(sql)
    one = normalize(sql)
    for n in [*statements, one]:
        assert re.fullmatch(r"[0-9a-f]{16}", n.fingerprint)
        assert n.fingerprint == fingerprint_of(n.text)
        assert n.text == n.text.strip(" ")
        assert n.hints <= HINTS
    if "\x00" not in sql:
        for n in [*statements, one]:
            for v in n.values:
                assert v in sql  # values are raw source text


_KEYWORDS = {
    "true", "false", "null", "in", "values", "array", "offset", "is", "not", "and", "or",
    "select", "from", "where", "default", "limit",
}  # fmt: skip
_identifier = st.from_regex(r"[A-Za-z_][A-Za-z0-9_$]{0,12}", fullmatch=True).filter(
    lambda s: s.lower() not in _KEYWORDS
)
_quoted_identifier = st.text(
    alphabet=st.characters(exclude_characters="\x00", exclude_categories=["Cs"]),
    min_size=1,
    max_size=12,
).map(lambda s: '"' + s.replace('"', '""') + '"')


@given(st.lists(st.one_of(_identifier, _quoted_identifier), min_size=3, max_size=3))
@example(["t1", "col_2", '"MyTable"'])
@example(["x1e5", "a$1", '"1"'])
@example(["e", "b", "x"])
@example(["varchar", "numeric", "\"it''s\""])
def test_identifiers_are_never_parameters(idents: list[str]) -> None:
    a, b, c = idents
    n = normalize(f"SELECT {a}, {b} FROM {c} WHERE {a} = 7 AND {b} IN (1, 2)")

    def expected(ident: str) -> str:
        return ident if ident.startswith('"') else ident.lower()

    assert n.text == (
        f"select {expected(a)}, {expected(b)} from {expected(c)} "
        f"where {expected(a)} = $1 and {expected(b)} in ($2 /*, ... */)"
    )
    assert n.values == ("7", "1", "2")


def _sql_string(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _e_string(s: str) -> str:
    return "E'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


_text = st.text(alphabet=st.characters(exclude_characters="\x00", exclude_categories=["Cs"]))
_common_literal = st.one_of(
    st.integers().map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.decimals(allow_nan=False, allow_infinity=False, places=3).map(str),
    _text.map(_sql_string),
    _text.map(_e_string),
    st.booleans().map(lambda b: "TRUE" if b else "false"),
)
# Tagged dollar quotes anywhere; lists of constants take untagged ones only.
_literal = st.one_of(
    _common_literal,
    _text.filter(lambda s: "$q" not in s and not s.endswith("$")).map(lambda s: f"$q${s}$q$"),
)
_list_literal = st.one_of(
    _common_literal,
    _text.filter(lambda s: "$$" not in s and not s.endswith("$")).map(lambda s: f"$${s}$$"),
)


@given(
    st.lists(_literal, min_size=4, max_size=4),
    st.lists(_list_literal, min_size=1, max_size=40),
    st.lists(st.tuples(_list_literal, _list_literal), min_size=2, max_size=20),
)
def test_same_shape_other_literals_same_fingerprint(
    scalars: list[str], in_list: list[str], rows: list[tuple[str, str]]
) -> None:
    def statement(s: list[str], lst: list[str], rs: list[tuple[str, str]]) -> str:
        values = ", ".join(f"({x}, {y})" for x, y in rs)
        return (
            f"WITH x AS (INSERT INTO t (a, b) VALUES {values} RETURNING a) "
            f"SELECT {s[0]}, f({s[1]}) FROM t1 WHERE a = {s[2]} AND b IN ({', '.join(lst)}) "
            f"AND c = {s[3]}::text"
        )

    n = normalize(statement(scalars, in_list, rows))
    reference = normalize(statement(["1", "2", "3", "4"], ["1", "2"], [("1", "2"), ("3", "4")]))
    assert n.fingerprint == reference.fingerprint, n.text
    flat_rows = [v for row in rows for v in row]
    assert n.values == (*flat_rows, *scalars[:3], *in_list, scalars[3])
