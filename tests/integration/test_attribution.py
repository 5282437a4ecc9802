"""Request attribution with real applications through the proxy (docs/attribution.md).

Two small apps, each with an N+1 endpoint and a clean one, serve interleaved requests over ONE
pooled connection (a scheduler resumes each request's generator in turn, so their statements
alternate on the wire with no idle gap between requests):

- a Django-style app that tags its statements as Django's sqlcommenter middleware does
  (route, controller, framework, db_driver, traceparent; ``%`` doubled for the driver);
- a SQLAlchemy app instrumented by OpenTelemetry with ``enable_commenter=True``: the
  instrumentation appends the traceparent of its own span, and the route and controller the
  web framework's instrumentation put in the context (as opentelemetry-instrumentation-flask
  does with its own ``enable_commenter``: ``SQLCOMMENTER_ORM_TAGS_AND_VALUES``).

The N+1 must be reported for its route with its requests' trace ids, the clean endpoint never;
the admin API filters by route. Hostile comments are ignored with the statement profiled.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from typing import Any

import httpx
import psycopg
import pytest

from tests.support import pg
from tests.support.proxy import ProxyThread

ORDERS = 12
SCHEMA = f"""
create table customers (id int primary key, name text not null);
create table orders (id int primary key, customer_id int not null references customers (id),
                     total numeric not null);
insert into customers select g, 'customer ' || g from generate_series(1, {ORDERS}) g;
insert into orders select g, g, g * 10 from generate_series(1, {ORDERS}) g;
analyze;
"""

Request = Generator[None, None, None]


@pytest.fixture
def db(pg_primary: pg.PgCluster) -> Iterator[str]:
    name = f"attr_{uuid.uuid4().hex[:10]}"
    pg_primary.psql(f"create database {name}")
    pg_primary.psql(SCHEMA, dbname=name)
    yield name
    pg_primary.psql(f"drop database {name} with (force)")


@pytest.fixture
def proxy(make_proxy: Callable[..., ProxyThread]) -> ProxyThread:
    # Requests end when their trace has been idle this long (ms): short, for the test.
    return make_proxy(analysis={"trace_idle_ms": 300.0})


def interleave(requests: list[Request]) -> None:
    """Resume each request in turn until all are done: their statements alternate."""
    live = list(requests)
    while live:
        for r in list(live):
            try:
                next(r)
            except StopIteration:
                live.remove(r)


def admin(proxy: ProxyThread) -> httpx.Client:
    assert proxy.runtime is not None and proxy.runtime.admin_port
    return httpx.Client(base_url=f"http://127.0.0.1:{proxy.runtime.admin_port}", timeout=30)


def findings_when_judged(proxy: ProxyThread, client: httpx.Client, db: str,
                         **params: str) -> list[dict[str, Any]]:
    """Findings once every request has been judged (its trace idle for trace_idle_ms; reading
    the findings judges those that are)."""
    assert proxy.runtime is not None and proxy.runtime.profiler is not None
    traces = proxy.runtime.profiler.detector.traces
    deadline = time.monotonic() + 20
    while True:
        r = client.get("/api/findings", params={"database": db, "limit": 1000, **params})
        assert r.status_code == 200, r.text
        if proxy.call(lambda: len(traces.open)) == 0:
            items: list[dict[str, Any]] = r.json()["items"]
            return items
        assert time.monotonic() < deadline, "requests were not judged"
        time.sleep(0.1)


def traceparent() -> tuple[str, str]:
    trace_id = secrets.token_hex(16)
    return trace_id, f"00-{trace_id}-{secrets.token_hex(8)}-01"


# ---------------------------------------------------------------------------- Django-style
def django_comment(route: str, controller: str, tp: str) -> str:
    # google-cloud-sqlcommenter's Django middleware: sorted keys, URL-quoted values, and
    # every % doubled because Django's cursor formats the SQL with its parameters.
    from urllib.parse import quote

    def q(v: str) -> str:
        return quote(v, safe="").replace("%", "%%")

    pairs = {"controller": controller, "db_driver": "django.db.backends.postgresql",
             "framework": "django:4.2.11", "route": route, "traceparent": tp}
    return " /*" + ",".join(f"{k}='{q(v)}'" for k, v in sorted(pairs.items())) + "*/"


def test_django_style_n_plus_one_per_route(proxy: ProxyThread, db: str) -> None:
    n1_traces: list[str] = []
    clean_traces: list[str] = []

    def order_list(cur: psycopg.Cursor[Any]) -> Request:
        """GET orders/ — the N+1: one query per order for its customer."""
        trace_id, tp = traceparent()
        n1_traces.append(trace_id)
        tag = django_comment("orders/", "order_list", tp)
        cur.execute('SELECT "orders"."id", "orders"."customer_id" FROM "orders" '
                    'ORDER BY "orders"."id" LIMIT %s' + tag, (ORDERS,))
        rows = cur.fetchall()
        yield
        for _, customer_id in rows:
            cur.execute('SELECT "customers"."id", "customers"."name" FROM "customers" '
                        'WHERE "customers"."id" = %s LIMIT 21' + tag, (customer_id,))
            cur.fetchall()
            yield

    def customer_list(cur: psycopg.Cursor[Any]) -> Request:
        """GET customers/ — clean: one query with a join."""
        trace_id, tp = traceparent()
        clean_traces.append(trace_id)
        tag = django_comment("customers/", "customer_list", tp)
        cur.execute('SELECT "customers"."id", COUNT("orders"."id") FROM "customers" '
                    'LEFT JOIN "orders" ON "orders"."customer_id" = "customers"."id" '
                    'WHERE "customers"."id" > %s GROUP BY 1' + tag, (0,))
        cur.fetchall()
        yield

    # One pooled connection serves every request, autocommit as Django runs by default.
    with psycopg.connect(proxy.dsn(dbname=db), autocommit=True,
                         application_name="shop") as conn, conn.cursor() as cur:
        for _ in range(3):
            interleave([order_list(cur), *(customer_list(cur) for _ in range(4)),
                        order_list(cur)])
    with admin(proxy) as client:
        items = findings_when_judged(proxy, client, db)
        n1 = [f for f in items if f["kind"] == "n_plus_one"]
        assert len(n1) == 1, items
        f = n1[0]
        assert (f["route"], f["controller"], f["endpoint"]) == ("orders/", "order_list",
                                                                "orders/")
        assert '"customers"' in f["query"] and f["max_burst"] == ORDERS
        assert f["occurrences"] == 6
        assert f["trace_ids"] and set(f["trace_ids"]) <= set(n1_traces)
        assert not any(f["route"] == "customers/" for f in items)
        assert client.get("/api/findings", params={"route": "customers/"}).json()["total"] == 0
        by_route = client.get("/api/findings", params={"route": "orders/"}).json()
        assert [x["id"] for x in by_route["items"]] == [f["id"]]
        # Statistics per (fingerprint, route), and the endpoints view.
        q = client.get("/api/queries", params={"route": "orders/"}).json()
        assert q["total"] == 2
        calls = {i["query"].split(" from ")[1].split()[0]: i for i in q["items"]}
        assert calls['"customers"']["calls_per_request"] == ORDERS
        eps = {e["endpoint"]: e for e in client.get("/api/endpoints").json()["items"]}
        assert eps["orders/"]["requests"] == 6
        assert eps["orders/"]["statements_per_request"] == ORDERS + 1
        assert eps["orders/"]["findings"] == 1
        assert eps["customers/"]["requests"] == 12
        assert eps["customers/"]["statements_per_request"] == 1
        assert eps["customers/"]["findings"] == 0
        # Tags never split a fingerprint: one entry per statement shape.
        all_q = client.get("/api/queries", params={"database": db}).json()
        assert all_q["total"] == 3


# ---------------------------------------------------------------------------- SQLAlchemy + OTel
def test_sqlalchemy_opentelemetry_commenter(proxy: ProxyThread, db: str) -> None:
    from opentelemetry import context, trace
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from sqlalchemy import create_engine, text

    provider = TracerProvider()  # records spans (the commenter only tags recorded ones)
    tracer = provider.get_tracer("shop")
    url = proxy.dsn(dbname=db).replace("postgresql://", "postgresql+psycopg://")
    engine = create_engine(url, pool_size=1, max_overflow=0)
    # skip_dep_check: the instrumentation's declared range lags SQLAlchemy's releases.
    SQLAlchemyInstrumentor().instrument(engine=engine, tracer_provider=provider,
                                        enable_commenter=True, skip_dep_check=True)
    n1_traces: list[str] = []

    def request(route: str, body: Callable[[Any], Request]) -> Request:
        """One request: its server span and framework tags are the current context whenever
        it runs (a generator is resumed by the scheduler, so the context is attached per step)."""
        span = tracer.start_span(f"GET {route}", kind=trace.SpanKind.SERVER)
        ctx = context.set_value("SQLCOMMENTER_ORM_TAGS_AND_VALUES",
                                {"framework": "flask:3.0.3", "route": route,
                                 "controller": route.strip("/")},
                                trace.set_span_in_context(span))
        if route == "/orders":
            n1_traces.append(format(span.get_span_context().trace_id, "032x"))
        steps = body(conn)
        while True:
            token = context.attach(ctx)
            try:
                next(steps)
            except StopIteration:
                break
            finally:
                context.detach(token)
            yield
        span.end()

    def orders(c: Any) -> Request:
        rows = c.execute(text("select id, customer_id from orders order by id")).all()
        yield
        for _, customer_id in rows:
            c.execute(text("select id, name from customers where id = :id"),
                      {"id": customer_id}).all()
            yield

    def customers(c: Any) -> Request:
        c.execute(text("select c.id, count(o.id) from customers c left join orders o "
                       "on o.customer_id = c.id group by c.id")).all()
        yield

    with engine.connect() as raw:
        conn = raw.execution_options(isolation_level="AUTOCOMMIT")
        for _ in range(2):
            interleave([request("/orders", orders), request("/customers", customers),
                        request("/customers", customers), request("/orders", orders)])
    SQLAlchemyInstrumentor().uninstrument()
    engine.dispose()
    with admin(proxy) as client:
        items = findings_when_judged(proxy, client, db)
        n1 = [f for f in items if f["kind"] == "n_plus_one"]
        assert len(n1) == 1, items
        f = n1[0]
        assert (f["route"], f["controller"]) == ("/orders", "orders")
        assert "from customers" in f["query"]
        assert f["occurrences"] == 4 and f["max_burst"] == ORDERS
        assert f["trace_ids"] and set(f["trace_ids"]) <= set(n1_traces)
        assert not any(x["route"] == "/customers" for x in items)
        eps = {e["endpoint"]: e for e in client.get("/api/endpoints").json()["items"]}
        assert eps["/orders"]["requests"] == 4 and eps["/customers"]["requests"] == 4
        assert eps["/orders"]["statements_per_request"] == ORDERS + 1


# ---------------------------------------------------------------------------- hostile input
HOSTILE = [
    "select 1 as a /* route='unterminated",
    "select 1 as a /*route='" + "x" * 100_000 + "'*/",
    "select 1 as a /*route='%ff%fe%fd',controller='ok'*/",
    "select 1 as a /*route='x'' ; drop table customers; --'*/",
    "select 1 as a /*route='%2A%2F%3B%20drop%20table%20customers%3B%20%2F%2A'*/",
    "select 1 as a /*route='a\\'b',traceparent='00-zz-zz-01'*/",
    "/* a /* nested route='x' */ */ select 1 as a",
    "select 1 as a /*route='%0d%0aforged log line'*/",
]


def test_hostile_comments_are_ignored_and_statements_profiled(proxy: ProxyThread,
                                                              db: str) -> None:
    with psycopg.connect(proxy.dsn(dbname=db), autocommit=True) as conn:
        for sql in HOSTILE:
            if sql.rstrip().endswith("*/") or sql.startswith("/*"):
                assert conn.execute(sql).fetchone() == (1,)
            else:  # PostgreSQL refuses an unterminated comment (42601): still profiled
                with pytest.raises(psycopg.errors.SyntaxError):
                    conn.execute(sql)
        # Bytes that are not UTF-8 in the comment: the server refuses the text (22021), the
        # proxy still counts the execution, as an error.
        conn.execute("set client_encoding = 'SQL_ASCII'")
        with pytest.raises(psycopg.Error):
            conn.execute(b"select 1 as a /*route='\xff\xfe'*/")
        conn.execute("set client_encoding = 'UTF8'")
        assert conn.execute("select count(*) from customers").fetchone() == (ORDERS,)

    def calls() -> int:
        assert proxy.runtime is not None and proxy.runtime.profiler is not None
        entries = proxy.runtime.profiler.stats.select(database=db)
        return sum(e.calls for e in entries if e.query == "select $1 as a")

    assert proxy.call(calls) == len(HOSTILE) + 1
    with admin(proxy) as client:
        eps = {e["endpoint"] for e in client.get("/api/endpoints").json()["items"]}
        # Only what could be read safely became an endpoint; nothing forged one.
        assert eps <= {"*/; drop table customers; /*", "a'b", "ok"}
        assert not any("\n" in e or "\r" in e for e in eps)


def test_requests_still_open_are_judged_at_shutdown(make_proxy: Callable[..., ProxyThread],
                                                    db: str) -> None:
    proxy = make_proxy(analysis={"trace_idle_ms": 600_000.0})
    _, tp = traceparent()
    tag = f" /*route='/orders',traceparent='{tp}'*/"
    with psycopg.connect(proxy.dsn(dbname=db), autocommit=True) as conn:
        ids = [r[1] for r in conn.execute("select id, customer_id from orders" + tag)]
        for i in ids:
            conn.execute("select name from customers where id = %s" + tag, (i,))
    assert proxy.runtime is not None and proxy.runtime.profiler is not None
    prof = proxy.runtime.profiler
    assert proxy.call(lambda: len(prof.detector.traces.open)) == 1
    proxy.stop()
    assert [f["route"] for f in prof.findings("n_plus_one")[0]] == ["/orders"]
