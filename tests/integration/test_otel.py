"""OpenTelemetry export: spans received by a test collector (a tiny OTLP/HTTP server in the
test, parsing the protobuf with opentelemetry-proto) are children of the client's traceparent.
"""

from __future__ import annotations

import secrets
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from sqlproxy.config import load_config
from sqlproxy.errors import ConfigError
from tests.support import pg
from tests.support.proxy import ProxyThread


class Collector:
    """Receives OTLP/HTTP protobuf exports on a free port; keeps the spans."""

    def __init__(self) -> None:
        self.spans: list[tuple[Any, dict[str, Any]]] = []  # (span, resource attributes)
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                for rs in req.resource_spans:
                    resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                    for ss in rs.scope_spans:
                        collector.spans.extend((s, resource) for s in ss.spans)
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.close()


@pytest.fixture
def db(pg_primary: pg.PgCluster) -> Iterator[str]:
    name = f"otel_{uuid.uuid4().hex[:10]}"
    pg_primary.psql(f"create database {name}")
    pg_primary.psql("create table orders (id int primary key, total int)", dbname=name)
    yield name
    pg_primary.psql(f"drop database {name} with (force)")


def attrs(span: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in span.attributes:
        v = a.value
        out[a.key] = v.string_value if v.HasField("string_value") else v.int_value
    return out


def test_spans_are_children_of_the_clients_traceparent(
        make_proxy: Callable[..., ProxyThread], collector: Collector, db: str) -> None:
    proxy = make_proxy(otel={"endpoint": collector.endpoint, "service_name": "shop-db"})
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    unsampled = secrets.token_hex(16)
    with psycopg.connect(proxy.dsn(dbname=db), autocommit=True) as conn:
        tag = f"/*route='/orders',traceparent='00-{trace_id}-{parent}-01'*/"
        conn.execute("insert into orders values (%s, %s) " + tag, (1, 10))
        conn.execute("select id, total from orders where id = %s " + tag, (1,))
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute(f"select * from missing_table {tag}")
        # Not sampled by the client: not exported. Untagged: no span.
        conn.execute(f"select 1 /*traceparent='00-{unsampled}-{parent}-00'*/")
        conn.execute("select 2")
    proxy.stop()  # shutting down sends the last batch
    spans = list(collector.spans)
    assert len(spans) == 3, [s.name for s, _ in spans]
    for span, resource in spans:
        assert resource["service.name"] == "shop-db"
        assert span.trace_id.hex() == trace_id
        assert span.parent_span_id.hex() == parent
        assert span.kind == span.SPAN_KIND_CLIENT
        assert span.end_time_unix_nano >= span.start_time_unix_nano > 0
        a = attrs(span)
        assert a["http.route"] == "/orders" and a["db.system.name"] == "postgresql"
        assert a["db.namespace"] == db and len(a["sqlproxy.fingerprint"]) == 16
    by_name = {s.name: s for s, _ in spans}
    assert set(by_name) == {"INSERT orders", "SELECT orders", "SELECT missing_table"}
    assert attrs(by_name["SELECT orders"])["db.query.text"] == \
        "select id, total from orders where id = $1"
    assert by_name["SELECT missing_table"].status.code == 2  # ERROR
    assert attrs(by_name["SELECT missing_table"])["db.response.status_code"] == "42P01"


def test_sample_ratio_zero_exports_nothing(make_proxy: Callable[..., ProxyThread],
                                           collector: Collector, db: str) -> None:
    proxy = make_proxy(otel={"endpoint": collector.endpoint, "sample_ratio": 0.0})
    with psycopg.connect(proxy.dsn(dbname=db), autocommit=True) as conn:
        for _ in range(5):
            tp = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
            conn.execute(f"select 1 /*traceparent='{tp}'*/")
    proxy.stop()
    time.sleep(0.2)
    assert collector.spans == []


def test_missing_packages_name_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlproxy.otel import SpanExporter

    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    config = load_config(None, {"otel": {"endpoint": "http://127.0.0.1:1/v1/traces"}},
                         environ={})
    with pytest.raises(ConfigError, match=r"pip install 'sqlproxy\[otel\]'"):
        SpanExporter(config.otel)
