"""The admin side's own state, shared by the HTTP handlers and the background tasks."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry

from sqlproxy.admin.explain import AutoExplainer, Explainer
from sqlproxy.admin.findings import Findings
from sqlproxy.admin.history import History
from sqlproxy.admin.metrics import ProfilerCollector, make_registry
from sqlproxy.admin.probe import PrimaryProbe
from sqlproxy.admin.source import AdminSource


class AdminState:
    def __init__(self, source: AdminSource, probe: PrimaryProbe | None = None) -> None:
        self.source = source
        self.findings = Findings(source.profiler)
        self.history = History(top_n=max(source.config.admin.metrics_top_n, 20))
        self.explainer = Explainer(source)
        self.auto_explainer = AutoExplainer(source, self.explainer)
        self.probe = probe or PrimaryProbe(source.config.proxy.primary_url.dsn())
        self.collector = ProfilerCollector(source, self.findings, self.backends, self.explainer)
        self.registry: CollectorRegistry = make_registry(self.collector)
        self.started_at = time.time()

    def sample_history(self) -> None:
        profiler = self.source.profiler
        if profiler is not None:
            self.history.tick(list(profiler.stats.entries.values()))

    def routed_counts(self) -> dict[str, int]:
        """Statements per route (backend name), from the statistics."""
        out: dict[str, int] = {}
        profiler = self.source.profiler
        if profiler is None:
            return out
        for e in profiler.stats.entries.values():
            for route, n in e.routes.items():
                out[route] = out.get(route, 0) + n
        return out

    def backends(self) -> list[dict[str, Any]]:
        routed = self.routed_counts()
        out = []
        for b in self.source.backends():
            item = dict(b)
            if item.get("role") == "primary" and item.get("healthy") is None:
                # Nobody else probes the primary (routing off): our probe's last word.
                st = self.probe.status
                item.update(healthy=st.healthy, error=st.error, **{
                    k: v for k, v in st.to_dict().items() if k not in ("healthy", "error")})
            item.setdefault("routed", routed.get(str(item.get("name")), 0))
            out.append(item)
        return out
