"""OpenTelemetry export: one span per traced statement, as a child of the client's span.

Off unless ``[otel] endpoint`` is set; then, and only then, the OpenTelemetry SDK and its
OTLP/HTTP exporter are imported (the optional extra ``sqlproxy[otel]``). The profiler calls the
exporter for statements whose comments carry a valid ``traceparent`` (see
analysis/tags.py) — nothing else reaches this module, so untagged traffic and a proxy without
``[otel]`` pay nothing.

Sampling: a client trace whose ``traceparent`` says "not sampled" is never exported (its
parent spans are not recorded either); of the others, ``otel.sample_ratio`` of the trace ids
are (decided from the trace id, so a request's statements are exported all or none). Spans are
batched and sent by the SDK's background thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlproxy.config import OtelSection
from sqlproxy.errors import ConfigError, MissingExtra
from sqlproxy.extras import require

if TYPE_CHECKING:
    from sqlproxy.analysis.statement import SessionInfo, Statement
    from sqlproxy.analysis.tags import Tags

__all__ = ["SpanExporter", "require_otel"]

def require_otel() -> None:
    """Raise the config error naming the extra when the OpenTelemetry packages are missing
    (the ``otel`` extra of ``sqlproxy.extras``)."""
    try:
        require("otel", "otel.endpoint (OpenTelemetry export)")
    except MissingExtra as exc:
        raise ConfigError(exc.message) from None


class SpanExporter:
    """The profiler's ``span_sink`` when ``[otel] endpoint`` is set."""

    def __init__(self, section: OtelSection) -> None:
        require_otel()
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags
        from opentelemetry.trace.status import Status, StatusCode

        assert section.endpoint
        self._trace = trace
        self._span_context = SpanContext
        self._non_recording = NonRecordingSpan
        self._flags = TraceFlags(TraceFlags.SAMPLED)
        self._client = SpanKind.CLIENT
        self._status = Status
        self._error = StatusCode.ERROR
        self.provider = TracerProvider(resource=Resource.create(
            {"service.name": section.service_name}))
        self.provider.add_span_processor(BatchSpanProcessor(
            OTLPSpanExporter(endpoint=section.endpoint)))
        self.tracer = self.provider.get_tracer("sqlproxy")
        # Trace ids whose last 64 bits are below this are exported.
        self.threshold = int(section.sample_ratio * (1 << 64))
        self.exported = 0

    def __call__(self, tags: Tags, stmt: Statement, ctx: SessionInfo, started: float,
                 ended: float, rows: int, sqlstate: str | None, wall_offset: float) -> None:
        if not tags.sampled or int(tags.trace_id[16:], 16) >= self.threshold:
            return
        parent = self._span_context(int(tags.trace_id, 16), int(tags.span_id, 16),
                                    is_remote=True, trace_flags=self._flags)
        context = self._trace.set_span_in_context(self._non_recording(parent))
        shape = stmt.shape
        operation = shape.kind.value.upper()
        name = f"{operation} {shape.tables[0]}" if shape.tables else operation
        attributes: dict[str, Any] = {
            "db.system.name": "postgresql",
            "db.namespace": ctx.database,
            "db.operation.name": operation,
            "db.query.text": stmt.normalized.text,  # literals are $n: nothing personal
            "db.response.returned_rows": rows,
            "sqlproxy.fingerprint": stmt.fingerprint,
        }
        for key, value in (("http.route", tags.route), ("sqlproxy.controller", tags.controller),
                           ("sqlproxy.action", tags.action),
                           ("sqlproxy.application", ctx.application_name)):
            if value:
                attributes[key] = value
        if sqlstate is not None:
            attributes["db.response.status_code"] = sqlstate
        span = self.tracer.start_span(name, context=context, kind=self._client,
                                      attributes=attributes,
                                      start_time=int((started + wall_offset) * 1e9))
        if sqlstate is not None:
            span.set_status(self._status(self._error, sqlstate))
        span.end(end_time=int((ended + wall_offset) * 1e9))
        self.exported += 1

    def shutdown(self) -> None:
        """Send what is batched (blocking: call it off the event loop)."""
        self.provider.shutdown()
