"""The statement cache: the skeleton shortcut gives exactly what the full scanner gives."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from sqlproxy.analysis.cache import (
    _BLANK,
    _MARK,
    StatementCache,
    _eligible,
    literal_slot,
    same_skeleton,
    skeleton,
    skeleton_key,
    skeleton_prefix,
    skeleton_scan,
    strip_edge_comments,
)
from sqlproxy.analysis.normalize import scan

# The two halves of cache._SKELETON_RE, applied one after the other: the definition that
# skeleton_scan's one-pass loop must match.
_STRING_RE = re.compile(r"'[^'\\]*+'")
_NUMBER_RE = re.compile(r"[0-9](?<![\w$.][0-9])[0-9]*+(?![\w.])")

# Statement templates with holes ({}) where literals of any kind go.
TEMPLATES = [
    "SELECT abalance FROM pgbench_accounts WHERE aid = {};",
    "select * from t where a = {} and b in ({}, {}) limit {}",
    "select * from t where a = {} offset {}",
    "select x::varchar({}) from t where y = {}",
    "insert into t (a, b) values ({}, {})",
    "insert into t (a, b) values ({}, {}), ({}, {})",
    "update t set a = {} where b = {} and c is true",
    "select a -{} from t where b = -{} and c = {}",
    "select * from t1 where c2 = {} and 'x' = {}",
    "select {}; select {}",
    "select * from t where d = interval {} and e = {}::text",
    "select * from t where a in ({}, {}, {}) and b = {}",
    "SELECT * FROM T WHERE A = {} AND B IN ({},{})",
    "select array[{}, {}] from t where c = any(array[{}])",
    "select {}::numeric({}, {}) from t",
    "select cast({} as varchar({})) from t",
    "select * from t where a between {} and {} or b like {}",
    "insert into t values ({}, {}), ({}, {}), ({}, {})",
    "select f({}, {}) from t where x in ({})",
    "select {} {} from t",
    "select a-{}, b+{}, c*-{} from t where d=-{}",
    "select * from t limit {} offset {}",
    "select * from t where a = {} -- {}",
    "select {}, {};",
    "select * from t where a = {} /*traceparent='{c}'*/",
    "/* {c} */ select {} from t where b = {} /* {c} */;",
    "select * from t /* {c} */ where a = {}",
    "select * from t where a = '{c}' and b = {} /*{c}*/",
]
COMMENT_TEXT = st.text(alphabet="ab */'-$;sqlproxy:ignore", max_size=12)
LITERALS = st.one_of(
    st.integers(min_value=0, max_value=10**12).map(str),
    st.integers(min_value=-1000, max_value=-1).map(str),
    st.decimals(min_value=0, max_value=1000, places=3).map(str),
    st.text(alphabet="ab ';-$\\\"x1", max_size=6).map(lambda t: "'" + t.replace("'", "''") + "'"),
    st.sampled_from(["true", "false", "null", "E'a\\'b'", "X'1F'", "1e5", "0x1F", "$1"]),
)


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(TEMPLATES), st.data())
def test_skeleton_stands_for_the_full_scan(template: str, data: st.DataObject) -> None:
    holes = template.count("{}")

    def fill() -> str:
        out = template.replace("{c}", "{%c}")
        for value in data.draw(st.lists(LITERALS, min_size=holes, max_size=holes)):
            out = out.replace("{}", value.replace("{", "{{").replace("}", "}}"), 1)
        while "{%c}" in out:
            out = out.replace("{%c}", data.draw(COMMENT_TEXT), 1)
        return out

    first, second = fill(), fill()
    a, b = skeleton(first), skeleton(second)
    if a is None or b is None or a[0] != b[0]:
        return
    cache = StatementCache()
    n = cache.template(a[0], a[1], first)
    if n is None:
        return
    want = scan(second)
    assert len(want) == 1
    assert (want[0].text, want[0].fingerprint) == (n.text, n.fingerprint)
    assert want[0].values == b[1]
    assert want[0].offset is None and not want[0].hints


def _regex_skeleton_key(sql: str) -> str | None:
    """What skeleton_key's one-pass loop must match: the two regex substitutions."""
    text = _eligible(sql)
    if text is None:
        return None
    key = _STRING_RE.sub("\x01", text) if "'" in text else text
    key = _NUMBER_RE.sub(_MARK, key)
    if key is text or ";" in key.rstrip(_BLANK + ";"):
        return None
    return key


SQLISH = st.text(alphabet="sel ct*from1230.9_aé٣'\"$;-/\\\n()=,xE", max_size=40)


@settings(max_examples=3000, deadline=None)
@given(st.one_of(SQLISH, st.sampled_from(TEMPLATES).map(lambda t: t.replace("{}", "12"))))
def test_one_pass_skeleton_equals_the_regex_substitutions(sql: str) -> None:
    assert skeleton_key(sql) == _regex_skeleton_key(sql)


@settings(max_examples=3000, deadline=None)
@given(SQLISH, SQLISH, SQLISH)
def test_scan_from_a_known_prefix_changes_nothing(head: str, first: str, second: str) -> None:
    old = head + first
    skel = skeleton_scan(old)
    if not skel:
        return
    prefix = skeleton_prefix(skel)
    new = prefix + second
    if prefix:
        assert old.startswith(prefix)
        assert skeleton_scan(new, len(prefix) - 1) == skeleton_scan(new)


LITERALS = st.one_of(
    st.text(alphabet="0123456789", min_size=1, max_size=6),
    st.text(alphabet="ab 1;'\"$-/*\\é", max_size=8).map(lambda v: f"'{v}'"),
    st.text(alphabet="ab 1;'\"$-/*\\é", max_size=8),
)


@settings(max_examples=3000, deadline=None)
@given(SQLISH, SQLISH, LITERALS, SQLISH)
def test_same_skeleton_means_the_same_skeleton(head: str, tail: str, literal: str,
                                               other: str) -> None:
    """What the profiler's one-literal shortcut answers is what a scan would: a text it takes
    for prefix + literal + suffix has exactly that skeleton."""
    skel = skeleton_scan(head + tail)
    if not skel:
        return
    at = literal_slot(skel)
    if at < 0:
        assert skel.count("\x00") + skel.count("\x01") != 1
        return
    prefix, suffix, string = skel[:at], skel[at + 1 :], skel[at] == "\x01"
    if "'" in prefix or "'" in suffix:
        return  # the profiler keeps no such skeleton
    for text in (prefix + literal + suffix, other, prefix + other + suffix):
        if same_skeleton(text, prefix, suffix, string):
            assert skeleton_scan(text) == skel, text
    # ... and it knows every plain literal of the kind (no false misses for pgbench's case)
    if not string and literal.isascii() and literal.isdigit():
        assert same_skeleton(prefix + literal + suffix, prefix, suffix, string)


def test_same_skeleton_examples() -> None:
    skel = skeleton_scan("SELECT abalance FROM pgbench_accounts WHERE aid = 41;")
    assert skel is not None
    at = literal_slot(skel)
    prefix, suffix = skel[:at], skel[at + 1 :]
    assert (prefix, suffix) == ("SELECT abalance FROM pgbench_accounts WHERE aid = ", ";")
    assert same_skeleton("SELECT abalance FROM pgbench_accounts WHERE aid = 99812;",
                         prefix, suffix, False)
    for other in ["SELECT abalance FROM pgbench_accounts WHERE aid = 9.5;",
                  "SELECT abalance FROM pgbench_accounts WHERE aid = '9';",
                  "SELECT abalance FROM pgbench_accounts WHERE aid = ;",
                  "SELECT abalance FROM pgbench_accounts WHERE aid = 1 OR 1;"]:
        assert not same_skeleton(other, prefix, suffix, False), other
    assert same_skeleton("select * from t where s = 'x y'", "select * from t where s = ", "",
                         True)
    for bad in ["'a--b'", "'a/*b'", "'a$b'", "'a\\b'", "'a''b'", "'a\"b'", "'a", "a'", "'"]:
        assert not same_skeleton(f"select * from t where s = {bad}",
                                 "select * from t where s = ", "", True), bad
    assert literal_slot("select \x00, \x00") == -1
    assert literal_slot("select \x00, \x01") == -1
    assert literal_slot("select a") == -1
    assert literal_slot("select \x01 || b") == 7


def test_skeleton_prefix_of_pgbench() -> None:
    skel = skeleton_scan("SELECT abalance FROM pgbench_accounts WHERE aid = 41;")
    assert skel is not None
    prefix = skeleton_prefix(skel)
    assert prefix == "SELECT abalance FROM pgbench_accounts WHERE aid = "
    new = "SELECT abalance FROM pgbench_accounts WHERE aid = 99812;"
    assert skeleton_scan(new, len(prefix) - 1) == skel
    assert skeleton_prefix("select x from t where s = 'a'".replace("'a'", "\x01")) != ""
    assert skeleton_prefix("\x00 + 1") == ""


def test_one_pass_skeleton_examples() -> None:
    for sql in ["select 1", "select a1, 1.5, 1e5, x.1, $1", "select '1' || '' || 'a--b'",
                "select 'it''s', 7 /* c */", "/* a */ select 1 /* b */", "select 'x",
                "select 1; select 2", "select 1;;  ", "select ٣1, 1٣, é1, 1é, 1_, _1",
                "select 'a\\b', 2", "select '$', 2", "select \"c1\", 2"]:
        assert skeleton_key(sql) == _regex_skeleton_key(sql), sql


def test_skeleton_shortcut_is_used_for_pgbench_simple() -> None:
    cache = StatementCache()
    texts = [f"SELECT abalance FROM pgbench_accounts WHERE aid = {i};" for i in (7, 42)]
    cuts = [skeleton(t) for t in texts]
    assert cuts[0] is not None and cuts[1] is not None and cuts[0][0] == cuts[1][0]
    assert cuts[1][1] == ("42",)
    assert cache.template(cuts[0][0], cuts[0][1], texts[0]) is not None
    assert skeleton("select 1 -- comment") is None
    tagged = [skeleton(f"select * from t where id = {i} /*traceparent='00-{i}'*/") for i in (1, 2)]
    assert tagged[0] is not None and tagged[1] is not None and tagged[0][0] == tagged[1][0]
    assert skeleton("select 1 /* sqlproxy:replica */") is None
    assert skeleton("select 1 /* a */ + /* b */ 2") is None
    assert skeleton('select "a1" from t where b = 2') is None
    assert skeleton("select a from t") is None  # nothing to cut


def test_edge_comments_end_where_postgresql_ends_them() -> None:
    assert strip_edge_comments("select 1 /*a*/ ;") == "select 1"
    assert strip_edge_comments("/* a */ /*b*/ select 1 /*c*/") == "select 1"
    # The comment ends at its first */: then comes a statement separator and an open string
    # (found by the Hypothesis test above).
    assert strip_edge_comments("select * from t where a = 0 /*traceparent='*/;'*/") is None
    assert strip_edge_comments("select 1 /*/") is None  # "/*/" opens, it does not close
    assert strip_edge_comments("/*/ select 1") is None
    assert strip_edge_comments("select '/*', 2 */") is None  # the "/*" is inside a string
    assert strip_edge_comments("select 1 /* a /* b */ c */") is None  # nested: leave it alone
    # A leading comment that nests another has not ended at its first */: the whole text is
    # a comment (found by the Hypothesis test above).
    assert strip_edge_comments("/* /* */ select 0 from t where b = 0 /*  */;") is None
    assert strip_edge_comments("/* a /* b */ c */ select 1") is None
    assert strip_edge_comments("select 1 /* sqlproxy:ignore */") is None


def test_tagged_statements_share_one_memo_entry() -> None:
    from sqlproxy.analysis.profiler import Profiler, SessionInfo
    from sqlproxy.config import Config

    prof = Profiler(Config().analysis)
    ctx = SessionInfo(1, "127.0.0.1:1", "db", "u", "app")
    for i in range(50):
        sql = f"SELECT * FROM users WHERE id = $1 /*traceparent='00-{i:032x}-01'*/"
        stmt = prof.record(ctx, sql, 0, b"%d" % i, 1, None, float(i), i + 0.001)
        assert stmt is not None
    assert list(ctx.memo) == ["SELECT * FROM users WHERE id = $1"]
    [item] = prof.top()[0]
    assert item["calls"] == 50 and item["query"] == "select * from users where id = $1"
    hinted = prof.record(ctx, "select 1 /* sqlproxy:ignore */", 0, b"", 1, None, 0.0, 0.1)
    assert hinted is not None and "ignore" in hinted.normalized.hints


def test_one_literal_shortcut_keeps_each_texts_own_values() -> None:
    """Texts found by the session's one-literal skeleton count under their statement, with
    their own values in the slow log, also when statements alternate."""
    from sqlproxy.analysis.profiler import Profiler, SessionInfo
    from sqlproxy.config import AnalysisSection

    prof = Profiler(AnalysisSection(capture_parameters=True, slow_query_ms=0))
    ctx = SessionInfo(1, "127.0.0.1:1", "db", "u", "app")
    for i in range(5):
        for sql in (f"SELECT * FROM t WHERE id = {i}", f"SELECT * FROM u WHERE name = 'n{i}'",
                    f"SELECT * FROM t WHERE id = {i}"):
            prof.record(ctx, sql, 0, b"", 1, None, float(i), i + 0.5)
    assert ctx.lit_stmts is not None and ctx.lit_prefix == "SELECT * FROM t WHERE id = "
    calls = {item["query"]: item["calls"] for item in prof.top()[0]}
    assert calls == {"select * from t where id = $1": 10, "select * from u where name = $1": 5}
    slow, total = prof.slow_log(limit=1000)
    assert total == 15
    assert sorted(tuple(s["parameters"]) for s in slow if "u WHERE" not in s["query"]
                  and s["query"].endswith("id = $1")) == sorted((str(i),) for i in range(5)
                                                               for _ in (0, 1))
    assert sorted(tuple(s["parameters"]) for s in slow if "name" in s["query"]) == [
        (f"'n{i}'",) for i in range(5)]


PIECES = st.text(alphabet="ab 1;'\"$-/*\\é€😀0", max_size=10)


@settings(max_examples=3000, deadline=None)
@given(PIECES, PIECES, PIECES, st.booleans(), st.booleans())
def test_native_skeleton_literal_is_the_definition(prefix: str, middle: str, suffix: str,
                                                   string: bool, framed: bool) -> None:
    """The profiler's ``skeleton_literal`` (``_sockio``, in C) answers as its definition in
    cache.py (``same_skeleton``), on texts of every character width, framed by the prefix and
    suffix or not."""
    from sqlproxy.analysis.cache import skeleton_literal, skeleton_literal_at
    from sqlproxy.proxy import _sockio

    assert skeleton_literal is _sockio.skeleton_literal
    literal = f"'{middle}'" if string else "".join(c for c in middle if c.isdigit())
    for text in (prefix + middle + suffix if framed else middle, prefix + literal + suffix):
        got = skeleton_literal(text, prefix, suffix, string)
        assert got == skeleton_literal_at(text, prefix, suffix, string)
        assert (got is not None) == same_skeleton(text, prefix, suffix, string)
        if isinstance(got, int):  # an integer literal's value (a key that costs no string)
            literal_text = text[len(prefix) : len(text) - len(suffix)]
            assert not string and len(literal_text) <= 18 and int(literal_text) == got
        elif got is not None:
            assert prefix + got + suffix == text
            assert string or len(got) > 18


@settings(max_examples=3000, deadline=None)
@given(PIECES, PIECES, PIECES, st.booleans(), st.booleans(),
       st.binary(max_size=3), st.binary(max_size=3), st.booleans())
def test_native_skeleton_literal_of_bytes_is_the_text_s(
        prefix: str, middle: str, suffix: str, string: bool, framed: bool, head: bytes,
        tail: bytes, nul: bool) -> None:
    """``skeleton_literal_bytes`` (C) answers on a message's bytes what ``skeleton_literal``
    answers on its text decoded (up to its first NUL, invalid UTF-8 replaced): the same
    literal, or None where only the decoded text has the prefix (bytes replaced)."""
    from sqlproxy.analysis.cache import (
        skeleton_literal_at,
        skeleton_literal_bytes,
        skeleton_literal_bytes_at,
    )
    from sqlproxy.proxy import _sockio

    assert skeleton_literal_bytes is _sockio.skeleton_literal_bytes
    literal = f"'{middle}'" if string else "".join(c for c in middle if c.isdigit())
    pb, sb = prefix.encode(), suffix.encode()
    for body in ((prefix + middle + suffix).encode() if framed else middle.encode(),
                 (prefix + literal + suffix).encode(),
                 (prefix + literal).encode() + tail,  # invalid UTF-8 where the suffix is
                 head + (literal + suffix).encode()):
        data = b"Q...." + body + (b"\0junk" if nul else b"") + b"\0"
        stop = len(data) - 1
        text = data[5:].split(b"\0")[0].decode("utf-8", "replace")
        want = skeleton_literal_at(text, prefix, suffix, string)
        assert skeleton_literal_bytes_at(data, 5, stop, pb, sb, string) == want
        got = skeleton_literal_bytes(data, 5, stop, pb, sb, string)
        assert got == want or (got is None and data[5:].split(b"\0")[0] != text.encode())
        if body == (prefix + literal + suffix).encode() and not nul:
            assert got == want


def test_profiler_records_undecoded_texts_as_decoded_ones() -> None:
    """A Query whose text the profiler matches from its bytes (the last one-literal statement
    again) is recorded as its decoded text would be, and never decoded unless asked."""
    from sqlproxy.analysis.profiler import Profiler
    from sqlproxy.analysis.statement import SessionInfo
    from sqlproxy.config import AnalysisSection
    from sqlproxy.wire.requests import QUERY, lazy

    profiler = Profiler(AnalysisSection())
    ctx = SessionInfo(1, "peer", "d", "u", "app")
    t = 100.0
    for i in range(5):
        msg = f"select * from accounts where aid = {i}\0".encode()
        data = b"Q" + (len(msg) + 4).to_bytes(4, "big") + msg
        pending = lazy(QUERY, data, 5, len(data) - 1, t)
        stmt = profiler.record_pending(ctx, pending, 0, 1, None, t, t + 0.001)
        assert stmt is not None and stmt.normalized.text.endswith("aid = $1")
        assert len(pending.raw) == (0 if i == 0 else len(data))  # from the second on: bytes
        assert pending.sql == f"select * from accounts where aid = {i}"
        t += 0.01
    (entry,) = [e for e in profiler.stats.select() if "accounts" in e.query]
    assert entry.calls == 5 and entry.rows == 5


def test_profiler_takes_the_fast_path_s_shape_only_when_it_is_its_own() -> None:
    """A Query the pooled fast path found to be of a DigitShape (prefix, digits, suffix) with
    its digits' value is recorded without its text being compared again, once a text of that
    shape matched the profiler's last one-literal statement, and recorded as it would be
    without the shape: the same statement, the same values told apart. A shape that is not
    the statement's own is never taken."""
    from sqlproxy.analysis.profiler import Profiler
    from sqlproxy.analysis.statement import SessionInfo
    from sqlproxy.config import AnalysisSection
    from sqlproxy.wire.requests import QUERY, DigitShape, lazy

    prefix = b"select * from accounts where aid = "
    own = DigitShape(prefix, b"")
    other = DigitShape(b"select * from accounts where bid = ", b"")
    values = [7, 8, 8, 9, 9, 9, 10**19, 9]

    def run(shape: DigitShape | None) -> tuple[object, ...]:
        profiler = Profiler(AnalysisSection())
        ctx = SessionInfo(1, "peer", "d", "u", "app")
        t = 100.0
        for n, v in enumerate(values):
            msg = prefix + str(v).encode() + b"\0"
            data = b"Q" + (len(msg) + 4).to_bytes(4, "big") + msg
            pending = lazy(QUERY, data, 5, len(data) - 1, t)
            if shape is not None:
                pending.shape = shape
                pending.value = v if v < 10**18 else str(v)
            stmt = profiler.record_pending(ctx, pending, 0, 1, None, t, t + 0.001)
            assert stmt is not None and stmt.normalized.text.endswith("aid = $1")
            if n >= 1:
                assert ctx.lit_shape is (own if shape is own else None)
                assert len(pending.raw) == len(data)  # not decoded
            t += 0.001
        (entry,) = [e for e in profiler.stats.select() if "accounts" in e.query]
        det = ctx.detector
        assert det is not None
        (r,) = det.runs.values()
        return entry.calls, entry.rows, r.count, r.max_same, len(r.digests)

    plain = run(None)
    assert plain == (8, 8, 8, 4, 4)
    assert run(own) == plain
    assert run(other) == plain


def test_the_text_found_in_the_memo_last_is_forgotten_with_the_memo() -> None:
    """A text found in the session's memo is kept at hand with its statements (the same text
    object again: no lookup); the memo cleared at its bound forgets it too."""
    from sqlproxy.analysis.profiler import MEMO_LIMIT, Profiler
    from sqlproxy.analysis.statement import SessionInfo
    from sqlproxy.config import AnalysisSection

    profiler = Profiler(AnalysisSection())
    ctx = SessionInfo(1, "peer", "d", "u", "app")
    text = "select abalance from pgbench_accounts where aid = $1"
    t = 100.0
    for _ in range(3):
        stmt = profiler.record(ctx, text, 0, b"\x00\x00\x00\x01\x00\x00\x00\x017", 1, None, t,
                               t + 0.001)
        t += 0.001
        assert stmt is not None and stmt.normalized.text == text
    assert ctx.memo_text is text and ctx.memo_found is ctx.memo[text]
    for i in range(MEMO_LIMIT):  # other texts fill the memo to its bound: it is cleared
        profiler.record(ctx, f"select c{i} from t where k = $1", 0, b"", 1, None, t, t)
    assert ctx.memo_text is None and text not in ctx.memo
    again = profiler.record(ctx, text, 0, b"", 1, None, t, t + 0.001)
    assert again is not None and again.normalized.text == text
    (entry,) = [e for e in profiler.stats.select() if "pgbench_accounts" in e.query]
    assert entry.calls == 4
