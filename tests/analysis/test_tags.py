"""Reading sqlcommenter and query-log tags: what frameworks write, and what hostile or broken
comments do (nothing: ignored, never an error)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sqlproxy.analysis.profiler import Profiler, SessionInfo
from sqlproxy.analysis.tags import MAX_COMMENT, TagReader, Tags, edge_comments, parse_comment
from sqlproxy.config import AnalysisSection

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def read(sql: str, extra: frozenset[str] = frozenset()) -> Tags | None:
    return TagReader(extra).read(sql)


def test_django_sqlcommenter() -> None:
    # As google-cloud-sqlcommenter's Django middleware writes it (keys sorted, values quoted).
    sql = ("SELECT \"polls_question\".\"id\" FROM \"polls_question\" WHERE \"id\" = %s "
           "/*app_name='polls',controller='index',db_driver='django.db.backends.postgresql',"
           "framework='django%%3A4.2',route='%%5Epolls/%%24',"
           f"traceparent='{TP}',tracestate='congo%%3Dt61rcWkgMzE'*/")
    tags = read(sql)
    assert tags is not None
    assert tags.route == "^polls/$"
    assert tags.controller == "index"
    assert tags.framework == "django:4.2"
    assert tags.db_driver == "django.db.backends.postgresql"
    assert tags.application == "polls"
    assert (tags.trace_id, tags.span_id, tags.sampled) == (
        "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", True)
    assert tags.tracestate == "congo=t61rcWkgMzE"
    assert tags.endpoint == "^polls/$"


def test_opentelemetry_sqlalchemy_commenter_with_baggage() -> None:
    sql = ("SELECT orders.id FROM orders "
           "/*baggage='http.route%%3D%%252Forders%%252F%%257Bid%%257D',"
           "db_driver='psycopg',db_framework='sqlalchemy%%3A2.0.30',"
           f"traceparent='{TP}'*/")
    tags = read(sql)
    assert tags is not None
    assert tags.route == "/orders/{id}"
    assert tags.framework == "sqlalchemy:2.0.30"
    assert tags.trace_id == "0af7651916cd43dd8448eb211c80319c"


def test_rails_legacy_and_sqlcommenter_formats_at_either_end() -> None:
    tags = read("/*application:Shop,controller:orders,action:show*/ SELECT 1")
    assert tags is not None
    assert (tags.application, tags.controller, tags.action) == ("Shop", "orders", "show")
    assert tags.endpoint == "orders#show"
    tags = read("/*controller='orders',action='index'*/ SELECT 1 /*route='%2Forders'*/;")
    assert tags is not None
    assert (tags.route, tags.controller, tags.action) == ("/orders", "orders", "index")


def test_extra_keys_only_when_configured() -> None:
    sql = "select 1 /*route='r',tenant='acme',secret='x'*/"
    tags = read(sql)
    assert tags is not None and tags.extra == ()
    tags = read(sql, frozenset({"tenant"}))
    assert tags is not None and tags.extra == (("tenant", "acme"),)


def test_untagged_or_plain_comments_say_nothing() -> None:
    assert read("select 1") is None
    assert read("select 1 /* just a note */") is None
    assert read("select /* inside */ 1") is None
    assert read("/* sqlproxy:replica */ select 1") is None


def test_bad_traceparents_are_ignored() -> None:
    for bad in ("ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                "00-00000000000000000000000000000000-b7ad6b7169203331-01",
                "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
                "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
                TP + "-extra"):
        tags = read(f"select 1 /*route='r',traceparent='{bad}'*/")
        assert tags is not None and tags.route == "r" and tags.trace_id == "", bad


def test_hostile_comments_are_ignored() -> None:
    # Unterminated; nested; a `*/` that belongs to a string; too long; not UTF-8.
    assert read("select 1 /* route='x'") is None
    assert read("select 1 /* a /* route='x' */ */") is None
    assert read("select '/*' || 'x' as route, '*/'") is None
    assert read("select 1 /*route='" + "x" * MAX_COMMENT + "'*/") is None
    assert read("select 1 /*route='%ff%fe'*/") is None
    assert read("select 1 /*route='\udcff'*/") is None  # a client's undecodable byte
    assert read("select 1 /*route='\ufffd\ufffd'*/") is None  # ... as the wire layer shows it
    # Control characters (log or terminal injection) drop the pair; the others stay.
    tags = read("select 1 /*route='%0d%0aFAKE LOG LINE',controller='ok'*/")
    assert tags is not None and tags.route == "" and tags.controller == "ok"
    # Injection attempts stay data: a quote, a comment end, SQL in a value.
    tags = read(r"select 1 /*route='x\' OR 1=1; --',action='%2A%2F%3B drop table t'*/")
    assert tags is not None
    assert tags.route == "x' OR 1=1; --"
    assert tags.action == "*/; drop table t"
    # A broken pair does not hide the pairs after it.
    tags = read("select 1 /*junk,=='',route='r'*/")
    assert tags is not None and tags.route == "r"


def test_cache_is_per_comment_without_the_trace_values() -> None:
    reader = TagReader()
    for i in range(50):
        tp = f"00-{i + 1:032x}-{i + 1:016x}-01"
        tags = reader.read(f"select 1 /*route='r',traceparent='{tp}'*/")
        assert tags is not None and tags.trace_id == f"{i + 1:032x}"
    assert reader.misses == 1 and reader.hits == 49


def test_edge_comments() -> None:
    assert edge_comments("/*a*/ select 1 /*b*/;") == "a,b"
    assert edge_comments("select 1") is None


comment_text = st.text(st.characters(codec="utf-8"), max_size=200) | st.text(
    st.sampled_from(list("'\\/*=,%:; abcrouteXX0123456789-")), max_size=200)


@settings(max_examples=400, deadline=None)
@given(body=comment_text, where=st.sampled_from(["lead", "trail", "both"]))
def test_any_comment_is_read_safely_and_the_statement_still_profiled(body: str,
                                                                     where: str) -> None:
    sql = "select id from t where id = $1"
    text = {"lead": f"/*{body}*/ {sql}", "trail": f"{sql} /*{body}*/",
            "both": f"/*{body}*/ {sql} /*{body}*/"}[where]
    tags = read(text)  # never raises
    assert tags is None or isinstance(tags, Tags)
    parse_comment(body)  # never raises either
    prof = Profiler(AnalysisSection())
    ctx = SessionInfo(1, "peer", "db", "u", "app")
    prof.record(ctx, text, 0, b"", 1, None, 1.0, 1.001)
    comment = f"/*{body}*/"
    if comment.count("/*") == 1 and comment.count("*/") == 1:
        assert prof.executions == 1
        assert [e.fingerprint for e in prof.stats.select()] == [
            prof.statements(ctx, sql)[0].fingerprint]
    else:  # the comment may swallow the statement, as PostgreSQL reads it
        assert prof.executions == min(1, len(prof.statements(ctx, text)))
