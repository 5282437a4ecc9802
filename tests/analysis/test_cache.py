"""The statement cache: the skeleton shortcut gives exactly what the full scanner gives."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sqlproxy.analysis.cache import StatementCache, skeleton
from sqlproxy.analysis.normalize import scan

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


@settings(max_examples=400, deadline=None)
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


def test_tagged_statements_share_one_memo_entry() -> None:
    from sqlproxy.analysis.profiler import Profiler
    from sqlproxy.config import Config

    class Ctx:
        id = 1
        peer = "127.0.0.1:1"
        application_name = "app"
        database = "db"
        user = "u"

        def __init__(self) -> None:
            self.memo: dict[str, list[object]] = {}

    prof = Profiler(Config().analysis)
    ctx = Ctx()
    for i in range(50):
        sql = f"SELECT * FROM users WHERE id = $1 /*traceparent='00-{i:032x}-01'*/"
        stmt = prof.record(ctx, sql, 0, i, 1, None, float(i), i + 0.001)  # type: ignore[arg-type]
        assert stmt is not None
    assert list(ctx.memo) == ["SELECT * FROM users WHERE id = $1"]
    [item] = prof.top()[0]
    assert item["calls"] == 50 and item["query"] == "select * from users where id = $1"
    hinted = prof.record(ctx, "select 1 /* sqlproxy:ignore */", 0, 0, 1, None, 0.0, 0.1)  # type: ignore[arg-type]
    assert hinted is not None and "ignore" in hinted.normalized.hints
