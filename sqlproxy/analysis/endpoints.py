"""Statistics per endpoint, and per (fingerprint, endpoint): what each route of an application
asks of the database.

An *endpoint* is what a statement's tags name (``Tags.endpoint``: the route, else
controller#action). Only tagged statements come here (the profiler's tagged path); untagged
traffic costs nothing. A *request* is one trace id when statements carry a ``traceparent``,
else one burst of an endpoint's statements on a connection (see ``ConnectionDetector``); so
"statements per request" and "database time per request" are what one hit of the endpoint
costs.

Bounded like the fingerprint statistics: at most ``max_entries`` (fingerprint, endpoint) pairs
and as many endpoints; when full, the least-used 5 % are evicted and usage decays.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from sqlproxy.analysis.sketch import LogSketch
from sqlproxy.analysis.stats import SKETCH_ACCURACY, SORT_KEYS
from sqlproxy.analysis.tags import Tags
from sqlproxy.analysis.timefmt import iso

__all__ = ["ENDPOINT_SORT_KEYS", "Endpoint", "EndpointStore", "RouteEntry"]

ENDPOINT_SORT_KEYS = ("total_ms", "requests", "statements", "statements_per_request",
                      "db_ms_per_request", "errors")


class RouteEntry:
    """One statement shape's executions under one endpoint."""

    __slots__ = ("action", "calls", "controller", "endpoint", "errors", "evicted", "fingerprint",
                 "first_seen", "kind", "last_seen", "max", "query", "route", "rows", "sketch",
                 "total", "usage")

    def __init__(self, fingerprint: str, tags: Tags, query: str, kind: str, now: float) -> None:
        self.fingerprint = fingerprint
        self.endpoint = tags.endpoint
        self.route = tags.route
        self.controller = tags.controller
        self.action = tags.action
        self.query = query
        self.kind = kind
        self.calls = 0
        self.rows = 0
        self.errors = 0
        self.total = 0.0
        self.max = 0.0
        self.sketch = LogSketch(SKETCH_ACCURACY)
        self.usage = 0.0
        self.first_seen = now
        self.last_seen = now
        self.evicted = False

    def add(self, seconds: float, rows: int, failed: bool, now: float) -> None:
        self.calls += 1
        self.rows += rows
        self.total += seconds
        if seconds > self.max:
            self.max = seconds
        if failed:
            self.errors += 1
        self.sketch.add(seconds)
        self.usage += 1.0
        self.last_seen = now

    def sort_value(self, key: str) -> float:
        if key == "total_ms":
            return self.total
        if key == "mean_ms":
            return self.total / self.calls if self.calls else 0.0
        if key in ("calls", "rows", "errors"):
            return float(getattr(self, key))
        if key == "p99_ms":
            return self.sketch.quantile(0.99)
        if key == "p95_ms":
            return self.sketch.quantile(0.95)
        if key == "max_ms":
            return self.max
        raise ValueError(f"unknown sort key {key!r}; expected one of {', '.join(SORT_KEYS)}")

    def to_dict(self, requests: int = 0) -> dict[str, Any]:
        calls = self.calls or 1
        return {
            "fingerprint": self.fingerprint,
            "query": self.query,
            "kind": self.kind,
            "endpoint": self.endpoint,
            "route": self.route,
            "controller": self.controller,
            "action": self.action,
            "calls": self.calls,
            "rows": self.rows,
            "errors": self.errors,
            "total_ms": self.total * 1000,
            "mean_ms": self.total / calls * 1000,
            "max_ms": self.max * 1000,
            "p50_ms": self.sketch.quantile(0.5) * 1000,
            "p95_ms": self.sketch.quantile(0.95) * 1000,
            "p99_ms": self.sketch.quantile(0.99) * 1000,
            "calls_per_request": self.calls / requests if requests else None,
            "first_seen": iso(self.first_seen),
            "last_seen": iso(self.last_seen),
        }


class Endpoint:
    """One endpoint's requests and their statements."""

    __slots__ = ("action", "applications", "controller", "errors", "first_seen", "last_seen",
                 "name", "requests", "route", "statements", "total", "usage")

    def __init__(self, tags: Tags, now: float) -> None:
        self.name = tags.endpoint
        self.route = tags.route
        self.controller = tags.controller
        self.action = tags.action
        self.requests = 0
        self.statements = 0
        self.errors = 0
        self.total = 0.0
        self.usage = 0.0
        self.first_seen = now
        self.last_seen = now
        self.applications: dict[str, int] = {}

    def sort_value(self, key: str) -> float:
        req = self.requests or 1
        if key == "total_ms":
            return self.total
        if key == "requests":
            return self.requests
        if key == "statements":
            return self.statements
        if key == "statements_per_request":
            return self.statements / req
        if key == "db_ms_per_request":
            return self.total / req
        if key == "errors":
            return self.errors
        raise ValueError(f"unknown sort key {key!r}; expected one of "
                         f"{', '.join(ENDPOINT_SORT_KEYS)}")

    def to_dict(self) -> dict[str, Any]:
        req = self.requests or 1
        return {
            "endpoint": self.name,
            "route": self.route,
            "controller": self.controller,
            "action": self.action,
            "requests": self.requests,
            "statements": self.statements,
            "errors": self.errors,
            "total_ms": self.total * 1000,
            "statements_per_request": self.statements / req,
            "db_ms_per_request": self.total * 1000 / req,
            "applications": sorted(self.applications),
            "first_seen": iso(self.first_seen),
            "last_seen": iso(self.last_seen),
        }


class EndpointStore:
    """Bounded maps endpoint -> Endpoint and (fingerprint, endpoint) -> RouteEntry."""

    state_section = "endpoints"
    state_version = 1

    def __init__(self, max_entries: int = 5000) -> None:
        self.max_entries = max_entries
        self.pairs: dict[tuple[str, str], RouteEntry] = {}
        self.endpoints: dict[str, Endpoint] = {}
        self.evictions = 0

    def record(self, tags: Tags, fingerprint: str, query: str, kind: str, seconds: float,
               rows: int, failed: bool, new_request: bool, application: str,
               now: float) -> None:
        name = tags.endpoint
        ep = self.endpoints.get(name)
        if ep is None:
            if len(self.endpoints) >= self.max_entries:
                self._evict_endpoints()
            ep = self.endpoints[name] = Endpoint(tags, now)
        if new_request:
            ep.requests += 1
        ep.statements += 1
        ep.total += seconds
        ep.usage += 1.0
        ep.last_seen = now
        if failed:
            ep.errors += 1
        if application not in ep.applications and len(ep.applications) < 16:
            ep.applications[application] = 1
        key = (fingerprint, name)
        entry = self.pairs.get(key)
        if entry is None:
            if len(self.pairs) >= self.max_entries:
                self._evict_pairs()
            entry = self.pairs[key] = RouteEntry(fingerprint, tags, query, kind, now)
        entry.add(seconds, rows, failed, now)

    def _evict_pairs(self) -> None:
        victims = sorted(self.pairs.items(), key=lambda kv: kv[1].usage)
        n = max(1, len(victims) * 5 // 100)
        for key, e in victims[:n]:
            e.evicted = True
            del self.pairs[key]
        self.evictions += n
        for e in self.pairs.values():
            e.usage *= 0.99

    def _evict_endpoints(self) -> None:
        victims = sorted(self.endpoints.items(), key=lambda kv: kv[1].usage)
        n = max(1, len(victims) * 5 // 100)
        for name, _ in victims[:n]:
            del self.endpoints[name]
        for ep in self.endpoints.values():
            ep.usage *= 0.99

    def matches(self, ep: Endpoint | RouteEntry, route: str | None, controller: str | None,
                action: str | None) -> bool:
        """Whether an endpoint (or pair) matches the filters: ``route`` matches the route or
        the endpoint's name."""
        if route and route != ep.route and route != getattr(ep, "name", ep.route) \
                and route != getattr(ep, "endpoint", ep.route):
            return False
        if controller and controller != ep.controller:
            return False
        return not (action and action != ep.action)

    def select_pairs(self, sort: str = "total_ms", route: str | None = None,
                     controller: str | None = None, action: str | None = None,
                     fingerprint: str | None = None) -> list[RouteEntry]:
        if sort not in SORT_KEYS:
            raise ValueError(f"unknown sort key {sort!r}; expected one of {', '.join(SORT_KEYS)}")
        items: Iterable[RouteEntry] = self.pairs.values()
        if fingerprint:
            items = (e for e in items if e.fingerprint == fingerprint)
        items = (e for e in items if self.matches(e, route, controller, action))
        return sorted(items, key=lambda e: e.sort_value(sort), reverse=True)

    def select(self, sort: str = "total_ms", route: str | None = None,
               controller: str | None = None, action: str | None = None) -> list[Endpoint]:
        if sort not in ENDPOINT_SORT_KEYS:
            raise ValueError(f"unknown sort key {sort!r}; expected one of "
                             f"{', '.join(ENDPOINT_SORT_KEYS)}")
        items = (e for e in self.endpoints.values()
                 if self.matches(e, route, controller, action))
        return sorted(items, key=lambda e: e.sort_value(sort), reverse=True)

    def requests(self, endpoint: str) -> int:
        ep = self.endpoints.get(endpoint)
        return ep.requests if ep is not None else 0

    def reset(self) -> None:
        for e in self.pairs.values():
            e.evicted = True
        self.pairs.clear()
        self.endpoints.clear()
        self.evictions = 0

    # -- persistence (sqlproxy.state.StateContributor) -----------------------------------
    def to_state(self) -> Any:
        def finite(x: float) -> float:
            return x if math.isfinite(x) else 0.0

        return {
            "endpoints": [
                {"name": e.name, "route": e.route, "controller": e.controller,
                 "action": e.action, "requests": e.requests, "statements": e.statements,
                 "errors": e.errors, "total": e.total, "usage": e.usage,
                 "first_seen": e.first_seen, "last_seen": e.last_seen,
                 "applications": sorted(e.applications)}
                for e in self.endpoints.values()
            ],
            "pairs": [
                {"fingerprint": e.fingerprint, "endpoint": e.endpoint, "route": e.route,
                 "controller": e.controller, "action": e.action, "query": e.query,
                 "kind": e.kind, "calls": e.calls, "rows": e.rows, "errors": e.errors,
                 "total": e.total, "max": finite(e.max), "usage": e.usage,
                 "first_seen": e.first_seen, "last_seen": e.last_seen,
                 "sketch": e.sketch.to_state()}
                for e in self.pairs.values()
            ],
        }

    def from_state(self, data: Any, version: int) -> None:
        if version != self.state_version:
            raise ValueError(f"endpoints state version {version} is not supported")
        for d in data["endpoints"]:
            tags = Tags(route=str(d["route"]), controller=str(d["controller"]),
                        action=str(d["action"]))
            ep = Endpoint(tags, float(d["first_seen"]))
            ep.name = str(d["name"])
            ep.requests = int(d["requests"])
            ep.statements = int(d["statements"])
            ep.errors = int(d["errors"])
            ep.total = float(d["total"])
            ep.usage = float(d["usage"])
            ep.last_seen = float(d["last_seen"])
            ep.applications = {str(a): 1 for a in d["applications"]}
            if ep.name not in self.endpoints and len(self.endpoints) < self.max_entries:
                self.endpoints[ep.name] = ep
        for d in data["pairs"]:
            tags = Tags(route=str(d["route"]), controller=str(d["controller"]),
                        action=str(d["action"]))
            e = RouteEntry(str(d["fingerprint"]), tags, str(d["query"]), str(d["kind"]),
                           float(d["first_seen"]))
            e.endpoint = str(d["endpoint"])
            e.calls = int(d["calls"])
            e.rows = int(d["rows"])
            e.errors = int(d["errors"])
            e.total = float(d["total"])
            e.max = float(d["max"])
            e.usage = float(d["usage"])
            e.last_seen = float(d["last_seen"])
            e.sketch = LogSketch.from_state(d["sketch"])
            key = (e.fingerprint, e.endpoint)
            if key not in self.pairs and len(self.pairs) < self.max_entries:
                self.pairs[key] = e
