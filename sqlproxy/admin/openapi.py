"""The OpenAPI 3.1 description of the admin API (served at ``/openapi.json``)."""

from __future__ import annotations

from typing import Any

from sqlproxy import __version__
from sqlproxy.analysis.endpoints import ENDPOINT_SORT_KEYS
from sqlproxy.analysis.findings import KINDS
from sqlproxy.analysis.findings import SORT_KEYS as FINDING_SORT
from sqlproxy.analysis.stats import SORT_KEYS

_S = dict[str, Any]


def _ref(name: str) -> _S:
    return {"$ref": f"#/components/schemas/{name}"}


def _list_of(name: str) -> _S:
    return {"type": "object", "required": ["items", "total"],
            "properties": {"items": {"type": "array", "items": _ref(name)},
                           "total": {"type": "integer", "description": "before pagination"}}}


def _q(name: str, description: str, schema: _S | None = None) -> _S:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema or {"type": "string"}}


_PAGE = [
    _q("limit", "page size (1..1000, default 50)",
       {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50}),
    _q("offset", "items to skip (default 0)", {"type": "integer", "minimum": 0, "default": 0}),
]
_FP = {"name": "fingerprint", "in": "path", "required": True,
       "description": "16 hex chars identifying a normalized statement",
       "schema": {"type": "string"}}
_ERR = {"description": "error", "content": {"application/json": {"schema": _ref("Error")}}}


def _json(schema: _S, description: str = "OK") -> _S:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _get(summary: str, schema: _S, params: list[_S] | None = None,
         errors: tuple[str, ...] = ("400", "401")) -> _S:
    responses: _S = {"200": _json(schema)}
    for code in errors:
        responses[code] = _ERR
    return {"get": {"summary": summary, "parameters": params or [], "responses": responses}}


_NUM = {"type": "number"}
_INT = {"type": "integer"}
_STR = {"type": "string"}
_TS = {"type": "string", "format": "date-time", "description": "ISO 8601 UTC"}
_NULLABLE_STR = {"type": ["string", "null"]}

_QUERY_STATS: _S = {
    "type": "object",
    "required": ["fingerprint", "query", "calls", "rows", "errors", "total_ms", "mean_ms",
                 "min_ms", "max_ms", "stddev_ms", "p50_ms", "p95_ms", "p99_ms", "database",
                 "user", "applications", "routes", "first_seen", "last_seen"],
    "properties": {
        "fingerprint": _STR, "query": {"type": "string", "description": "normalized text"},
        "kind": _STR, "database": _STR, "user": _STR, "calls": _INT, "rows": _INT,
        "errors": _INT, "errors_by_sqlstate": {"type": "object", "additionalProperties": _INT},
        "total_ms": _NUM, "mean_ms": _NUM, "min_ms": _NUM, "max_ms": _NUM, "stddev_ms": _NUM,
        "p50_ms": _NUM, "p95_ms": _NUM, "p99_ms": _NUM,
        "applications": {"type": "array", "items": _STR},
        "routes": {"type": "object", "additionalProperties": _INT,
                   "description": '{"primary": n, "<replica>": n}'},
        "tables": {"type": "array", "items": _STR},
        "first_seen": _TS, "last_seen": _TS,
    },
}

_SCHEMAS: _S = {
    "Error": {"type": "object", "required": ["error"],
              "properties": {"error": _STR, "parameter": _STR}},
    "QueryStats": _QUERY_STATS,
    "QueryDetail": {"allOf": [_QUERY_STATS, {"type": "object", "properties": {
        "example": {"type": "string",
                    "description": "normalized text, or the first raw text when "
                                   "analysis.capture_parameters is on"},
        "example_parameters": {"type": "array", "items": _STR},
        "by_database_user": {"type": "array", "items": _ref("QueryStats")},
        "by_route": {"type": "array", "items": _ref("RouteStats")},
        "windows": {"type": "array", "items": _ref("Window"),
                    "description": "regression windows (analysis.window_s), oldest first"},
        "slow": {"type": "array", "items": _ref("SlowQuery")},
        "findings": {"type": "array", "items": _ref("Finding")},
        "explain": {"oneOf": [_ref("ExplainResult"), {"type": "null"}]},
    }}]},
    "RouteStats": {"type": "object", "description":
                   "one statement under one endpoint (route, else controller#action)",
                   "properties": {
        "fingerprint": _STR, "query": _STR, "kind": _STR, "endpoint": _STR, "route": _STR,
        "controller": _STR, "action": _STR, "calls": _INT, "rows": _INT, "errors": _INT,
        "total_ms": _NUM, "mean_ms": _NUM, "max_ms": _NUM, "p50_ms": _NUM, "p95_ms": _NUM,
        "p99_ms": _NUM, "calls_per_request": {"type": ["number", "null"]},
        "first_seen": _TS, "last_seen": _TS}},
    "Endpoint": {"type": "object", "properties": {
        "endpoint": _STR, "route": _STR, "controller": _STR, "action": _STR,
        "requests": {"type": "integer", "description": "trace ids, else bursts of the "
                                                       "endpoint on a connection"},
        "statements": _INT, "errors": _INT, "total_ms": _NUM,
        "statements_per_request": _NUM, "db_ms_per_request": _NUM,
        "applications": {"type": "array", "items": _STR},
        "findings": _INT, "findings_by_kind": {"type": "object", "additionalProperties": _INT},
        "statements_top": {"type": "array", "items": _ref("RouteStats")},
        "first_seen": _TS, "last_seen": _TS}},
    "Window": {"type": "object", "properties": {
        "start": _TS, "end": _TS, "calls": _INT, "total_ms": _NUM,
        "mean_ms": {"type": ["number", "null"]}, "p50_ms": {"type": ["number", "null"]},
        "p95_ms": {"type": ["number", "null"]}, "p99_ms": {"type": ["number", "null"]}}},
    "HistoryPoint": {"type": "object", "properties": {
        "at": _TS, "calls": _INT, "errors": _INT, "mean_ms": {"type": ["number", "null"]},
        "p50_ms": {"type": ["number", "null"]}, "p95_ms": {"type": ["number", "null"]},
        "p99_ms": {"type": ["number", "null"]}}},
    "SlowQuery": {"type": "object", "properties": {
        "at": _TS, "duration_ms": _NUM, "fingerprint": _STR, "query": _STR, "database": _STR,
        "user": _STR, "application": _STR, "client": _STR, "connection_id": _INT, "rows": _INT,
        "sqlstate": _NULLABLE_STR, "route": _STR,
        "parameters": {"type": ["array", "null"], "items": _STR,
                       "description": "only with analysis.capture_parameters"}}},
    "Finding": {"type": "object", "required": [
        "kind", "fingerprint", "query", "parent_fingerprint", "parent_query", "occurrences",
        "max_burst", "total_ms", "application", "suggestion", "first_seen", "last_seen"],
        "properties": {
            "id": _STR, "kind": _STR, "fingerprint": _STR, "query": _STR,
            "parent_fingerprint": _NULLABLE_STR, "parent_query": _NULLABLE_STR,
            "occurrences": _INT, "max_burst": {"type": ["integer", "null"]},
            "total_ms": _NUM, "application": _NULLABLE_STR, "suggestion": _STR,
            "first_seen": _TS, "last_seen": _TS, "endpoint": _STR, "route": _STR,
            "controller": _STR, "action": _STR,
            "trace_ids": {"type": "array", "items": _STR,
                          "description": "example requests (W3C trace ids), the latest last"},
            "window": {"type": ["object", "null"],
                       "description": "regression findings: the window against its baseline"},
            "users": {"type": "array", "items": _STR,
                      "description": "connection findings (pool_saturated, connection_churn, "
                                     "session_state_in_pool): the database users"}}},
    "Transactions": {"type": "object", "properties": {
        "database": _STR, "user": _STR, "transactions": _INT, "failed": _INT,
        "total_ms": _NUM, "mean_ms": _NUM, "max_ms": _NUM, "p99_ms": _NUM,
        "statements_per_transaction": _NUM, "idle_in_transaction_ms": _NUM}},
    "Pool": {"type": "object", "description": "One transaction pool (pool.mode = "
             "\"transaction\"): a (database, user) pair's server connections", "properties": {
        "database": _STR, "user": _STR, "size": _INT, "servers": _INT, "active": _INT,
        "idle": _INT, "clients": _INT, "clients_waiting": _INT, "checkouts": _INT,
        "wait_timeouts": _INT, "wait_total_ms": _NUM, "max_waiting": _INT,
        "wait_ms": {"type": "object",
                                           "description": "max, p50, p99 of the waits"},
        "all_busy_share": _NUM, "servers_opened": _INT,
        "servers_closed": {"type": "object", "description": "closes by reason"},
        "pinned_clients": {"type": "array", "items": {"type": "object"}},
        "advice": {"type": "array", "items": _STR},
        "findings": {"type": "array", "items": {"type": "object"}}}},
    "Connection": {"type": "object", "properties": {
        "id": _INT, "client": _STR, "user": _NULLABLE_STR, "database": _NULLABLE_STR,
        "application_name": _STR, "state": _STR,
        "transaction_status": {"type": ["string", "null"], "description": "I, T or E"},
        "current": {"type": ["object", "null"],
                    "properties": {"query": _STR, "running_ms": _NUM}},
        "backends": {"type": "array", "items": _STR}, "connected_at": _TS,
        "tls": {"type": ["string", "null"], "description": "the client's TLS version"},
        "direct_relay": {"type": "boolean", "description":
                         "bytes moved by the direct relay (plain sessions; proxy.direct_relay)"},
        "pinned": {"type": "boolean", "description": "routed sessions: pinned to the primary"},
        "fast_path": {"type": ["object", "null"], "description":
                      "routed sessions: units the routed fast path sent to a replica and to "
                      "the primary", "properties": {"to_replica": _INT, "to_primary": _INT}}}},
    "Backend": {"type": "object", "properties": {
        "name": _STR, "role": {"type": "string", "enum": ["primary", "replica"]},
        "address": _STR, "healthy": {"type": ["boolean", "null"]},
        "in_rotation": {"type": "boolean"}, "lag_ms": {"type": ["number", "null"]},
        "lag_bytes": {"type": ["integer", "null"]}, "routed": _INT,
        "server_connections": _INT, "error": _NULLABLE_STR,
        "checked_at": {"type": ["string", "null"], "format": "date-time"}}},
    "Health": {"type": "object", "properties": {
        "status": {"type": "string", "enum": ["ok", "unavailable"]},
        "failed": {"type": "array", "items": _STR},
        "checks": {"type": "object", "additionalProperties": {"type": "object"}},
        "details": {"type": "object", "description": "not health checks: never a 503",
                    "properties": {"state_store": _ref("StateStore")}}}},
    "StateStore": {"type": "object", "properties": {
        "ok": {"type": "boolean", "description": "false while snapshots fail"},
        "kind": {"type": "string", "enum": ["sqlite", "postgresql"]},
        "where": {"type": "string", "description": "file path, or URL without password"},
        "instance": _STR, "error": _NULLABLE_STR,
        "retry_in_s": {"type": ["number", "null"], "description": "next attempt, while failing"},
        "failures": _INT,
        "restored": {"type": "boolean",
                     "description": "this instance's own state was read back"},
        "last_snapshot": {"type": ["string", "null"], "format": "date-time"},
        "fleet_instances": {"type": "integer", "description": "other instances in the view"},
        "warning": {"type": ["string", "null"],
                    "description": "e.g. another process writing under this instance name"}}},
    "Worker": {"type": "object", "properties": {
        "worker": {"type": "integer", "description": "index (first byte of its cancel keys)"},
        "pid": {"type": ["integer", "null"]}, "alive": {"type": "boolean"},
        "restarts": {"type": "integer", "description": "times restarted after dying"},
        "started_at": {"type": ["string", "null"], "format": "date-time"},
        "last_exit": {"type": ["string", "null"],
                      "description": "how its previous process ended (signal or exit code)"},
        "sessions": {"type": "integer", "description": "client sessions, as last asked"},
        "rejected": {"type": "object"}, "timeouts": {"type": "object"}}},
    "FleetInstance": {"type": "object", "properties": {
        "instance": _STR, "local": {"type": "boolean", "description": "this instance"},
        "sqlproxy": _STR, "snapshot_seconds": _NUM,
        "last_snapshot": {"type": ["string", "null"], "format": "date-time"},
        "age_s": {"type": ["number", "null"],
                  "description": "seconds since its last snapshot (null: this instance)"}}},
    "ExplainRequest": {"type": "object", "additionalProperties": False, "properties": {
        "analyze": {"type": "boolean", "default": False,
                    "description": "EXPLAIN ANALYZE: runs the statement (always rolled back); "
                                   "only for read-only statements unless insist"},
        "insist": {"type": "boolean", "default": False,
                   "description": "ANALYZE a statement that may write "
                                  "(needs admin.allow_analyze_writes)"}}},
    "Advice": {"type": "object", "required": ["kind", "message", "suggestion"],
               "properties": {
                   "kind": {"type": "string", "enum": [
                       "missing_index", "stale_statistics", "never_analyzed",
                       "row_misestimate", "sort_spill", "hash_spill"]},
                   "message": _STR, "suggestion": _STR, "relation": _NULLABLE_STR,
                   "columns": {"type": "array", "items": _STR}}},
    "ExplainResult": {"type": "object", "properties": {
        "fingerprint": _STR, "database": _STR, "user": _STR, "query": _STR,
        "analyze": {"type": "boolean"}, "generic_plan": {"type": "boolean"},
        "parameters": {"type": "string", "enum": ["none", "captured", "generic"]},
        "plan": {"description": "EXPLAIN (FORMAT JSON, VERBOSE) output"},
        "planning_ms": {"type": ["number", "null"]},
        "execution_ms": {"type": ["number", "null"]},
        "advice": {"type": "array", "items": _ref("Advice")},
        "notes": {"type": "array", "items": _STR}, "explained_at": _TS}},
    "ResetRequest": {"type": "object", "additionalProperties": False, "properties": {
        "what": {"type": "string", "enum": ["all", "statistics", "slow", "findings"],
                 "default": "all"}}},
}

_FILTERS = [_q("database", "only this database"), _q("user", "only this user"),
            _q("application", "only statements from this application_name")]
_WHERE = [_q("route", "only this route (or endpoint name) of the statements' tags"),
          _q("controller", "only this controller"), _q("action", "only this action")]
_SCOPE = _q("scope", "local: this instance; fleet: every instance sharing the state database "
                     "([state] url) that wrote within state.fleet_window snapshot periods, "
                     "merged (this instance alone without one)",
            {"type": "string", "enum": ["local", "fleet"], "default": "local"})


def openapi_spec() -> dict[str, Any]:
    paths: _S = {
        "/healthz": {"get": {
            "summary": "200 when the proxy accepts connections and the primary is reachable",
            "security": [],
            "responses": {"200": _json(_ref("Health")),
                          "503": _json(_ref("Health"), "a check failed")}}},
        "/api/queries": _get(
            "Per-fingerprint statement statistics", _list_of("QueryStats"),
            [*_PAGE, _q("sort", "order, descending", {"type": "string", "enum": list(SORT_KEYS),
                                                      "default": "total_ms"}), *_FILTERS,
             *_WHERE, _SCOPE]),
        "/api/endpoints": _get(
            "Endpoints named by the statements' tags: requests, statements and database "
            "time per request, findings", _list_of("Endpoint"),
            [*_PAGE, _q("sort", "order, descending", {
                "type": "string", "enum": list(ENDPOINT_SORT_KEYS), "default": "total_ms"}),
             *_WHERE]),
        "/api/queries/{fingerprint}": _get(
            "One fingerprint: statistics, redacted example, slow executions, findings",
            _ref("QueryDetail"), [_FP, _SCOPE], ("400", "401", "404")),
        "/api/queries/{fingerprint}/history": _get(
            "Latency over time (per sampling interval), newest first",
            _list_of("HistoryPoint"), [_FP, *_PAGE], ("400", "401", "404")),
        "/api/queries/{fingerprint}/explain": {"post": {
            "summary": "EXPLAIN the stored example on the primary, with advice",
            "parameters": [_FP],
            "requestBody": {"required": False, "content": {
                "application/json": {"schema": _ref("ExplainRequest")}}},
            "responses": {"200": _json(_ref("ExplainResult")), "400": _ERR, "401": _ERR,
                          "403": _ERR, "404": _ERR, "422": _ERR, "502": _ERR}}},
        "/api/slow": _get(
            "The slow-query log, newest first", _list_of("SlowQuery"),
            [*_PAGE, _q("since", "ISO 8601 time or Unix seconds"),
             _q("min_ms", "at least this duration", {"type": "number", "minimum": 0}),
             _SCOPE]),
        "/api/transactions": _get("Explicit transactions per database and user",
                                  _list_of("Transactions"), [*_PAGE, _SCOPE]),
        "/api/n-plus-one": _get("N+1 findings", _list_of("Finding"),
                                [*_PAGE, _q("application", "only this application_name"),
                                 _q("database", "only findings seen in this database"),
                                 _SCOPE]),
        "/api/findings": _get(
            "All findings, most costly first", _list_of("Finding"),
            [*_PAGE, _q("kind", "only this kind", {"type": "string", "enum": list(KINDS)}),
             _q("application", "only this application_name"),
             _q("database", "only findings seen in this database"),
             _q("sort", "order, descending", {"type": "string", "enum": list(FINDING_SORT),
                                              "default": "total_ms"}), *_WHERE, _SCOPE]),
        "/api/findings/{finding_id}": _get(
            "One finding in detail, with the statistics of its statements",
            {"type": "object"},
            [{"name": "finding_id", "in": "path", "required": True,
              "schema": {"type": "string"}}, _SCOPE], ("400", "401", "404")),
        "/api/fleet": _get(
            "This instance and the other instances in the fleet view ([state] url)",
            _list_of("FleetInstance"), _PAGE),
        "/api/workers": _get(
            "The worker processes ([proxy] workers): pid, alive, restarts, sessions",
            _list_of("Worker"), _PAGE),
        "/api/connections": _get("Live client sessions", _list_of("Connection"),
                                 [*_PAGE, *_FILTERS]),
        "/api/pools": _get("Transaction pools: size, busy, waits, opens and closes, pinned "
                           "clients, sizing advice and pool findings", _list_of("Pool"),
                           _PAGE),
        "/api/cache": {"get": {
            "summary": "The result cache: rules, hits, misses, bytes, evictions and "
                       "invalidations per rule and per fingerprint, the Redis store's health, "
                       "and what a write that bypasses the proxy means (TTL only)",
            "responses": {"200": _json({"type": "object"}), "401": _ERR}}},
        "/api/backends": _get("Primary and replicas: health, lag, rotation, routed, pool",
                              _list_of("Backend"), _PAGE),
        "/api/reset": {"post": {
            "summary": "Reset statistics, the slow log, findings, or all of them",
            "parameters": [_q("what", "overrides the body's what")],
            "requestBody": {"required": False, "content": {
                "application/json": {"schema": _ref("ResetRequest")}}},
            "responses": {"200": _json({"type": "object",
                                        "properties": {"reset": _STR}}),
                          "401": _ERR, "422": _ERR}}},
        "/metrics": {"get": {"summary": "Prometheus text exposition", "responses": {
            "200": {"description": "OK", "content": {"text/plain": {"schema": _STR}}},
            "401": _ERR}}},
        "/openapi.json": {"get": {"summary": "This document", "responses": {
            "200": _json({"type": "object"}), "401": _ERR}}},
        "/": {"get": {"summary": "The dashboard (static page; asks for the token itself)",
                      "security": [], "responses": {
                          "200": {"description": "OK",
                                  "content": {"text/html": {"schema": _STR}}}}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "sqlproxy admin API", "version": __version__,
                 "description": "Statistics, slow queries, findings, live sessions, backends, "
                                "EXPLAIN advice and metrics of a sqlproxy process. List "
                                'endpoints answer {"items": [...], "total": n}; errors '
                                '{"error": message}.'},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "admin.token; required on every path but /healthz and / "
                               "when set"}},
        },
    }
