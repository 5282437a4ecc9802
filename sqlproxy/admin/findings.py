"""Read access to the pattern detector's findings (``Profiler.findings`` and friends), as the
API serves them: unknown kinds or sort keys become 400s, and a profiler without a detector
(analysis off) answers empty lists."""

from __future__ import annotations

import time
from typing import Any

from sqlproxy.admin.params import bad_parameter
from sqlproxy.analysis.profiler import Profiler

FINDING_KEYS = (
    "kind", "fingerprint", "query", "parent_fingerprint", "parent_query", "occurrences",
    "max_burst", "total_ms", "application", "suggestion", "first_seen", "last_seen",
)
N_PLUS_ONE = "n_plus_one"
REPEATED_QUERY = "repeated_query"
_ALL = 1_000_000_000


def with_cache_rule(item: dict[str, Any]) -> dict[str, Any]:
    """A repeated query, with the result-cache rule that would serve it (docs/cache.md)."""
    if item.get("kind") == REPEATED_QUERY and item.get("fingerprint"):
        fp = item["fingerprint"]
        toml = f'[[cache.rules]]\nfingerprint = "{fp}"\nttl_s = 30'
        item["cache_rule"] = {"fingerprint": fp, "ttl_s": 30, "toml": toml}
        suggestion = item.get("suggestion") or ""
        if "cache.rules" not in suggestion:
            item["suggestion"] = (f"{suggestion}; or let sqlproxy serve it from its result "
                                  f"cache (read-only statements, invalidated by writes through "
                                  f"the proxy): [[cache.rules]] fingerprint = \"{fp}\", "
                                  f"ttl_s = 30").lstrip("; ")
    return item


class Findings:
    def __init__(self, profiler: Profiler | None) -> None:
        self.profiler = profiler

    def select(self, kind: str | None = None, application: str | None = None,
               limit: int = 50, offset: int = 0, database: str | None = None,
               sort: str = "total_ms", route: str | None = None,
               controller: str | None = None,
               action: str | None = None) -> tuple[list[dict[str, Any]], int]:
        if self.profiler is None:
            return [], 0
        try:
            items, total = self.profiler.findings(kind, application, limit, offset, database,
                                                  sort, route, controller, action)
            return [with_cache_rule(i) for i in items], total
        except ValueError as exc:
            raise bad_parameter("sort" if "sort" in str(exc) else "kind", str(exc)) from None

    def n_plus_one(self, application: str | None = None, limit: int = 50, offset: int = 0,
                   database: str | None = None) -> tuple[list[dict[str, Any]], int]:
        return self.select(N_PLUS_ONE, application, limit, offset, database)

    def detail(self, finding_id: str) -> dict[str, Any] | None:
        found = self.profiler.finding(finding_id) if self.profiler is not None else None
        return with_cache_rule(found) if found is not None else None

    def for_fingerprint(self, fingerprint: str) -> list[dict[str, Any]]:
        """Findings about a statement: as the repeated one or as the parent of a burst."""
        if self.profiler is None:
            return []
        self.profiler.detector.flush_idle(time.perf_counter())
        found = self.profiler.detector.findings.select(fingerprint=fingerprint)
        return [with_cache_rule(f.to_dict()) for f in found]

    def counts(self) -> dict[str, int]:
        if self.profiler is None:
            return {}
        out: dict[str, int] = {}
        for f in self.profiler.detector.findings.entries.values():
            out[f.kind] = out.get(f.kind, 0) + 1
        return out

    @property
    def evictions(self) -> int:
        return self.profiler.detector.findings.evictions if self.profiler is not None else 0
