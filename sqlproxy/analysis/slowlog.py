"""The slow-query log: a bounded ring of executions slower than ``slow_query_ms``."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from sqlproxy.analysis.timefmt import iso


@dataclass(frozen=True, slots=True)
class SlowQuery:
    at: float  # wall-clock end time
    duration: float  # seconds
    fingerprint: str
    query: str  # normalized text
    database: str
    user: str
    application: str
    client: str
    connection_id: int
    rows: int
    sqlstate: str | None
    route: str
    parameters: tuple[str, ...] | None  # only when analysis.capture_parameters is on

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": iso(self.at),
            "duration_ms": self.duration * 1000,
            "fingerprint": self.fingerprint,
            "query": self.query,
            "database": self.database,
            "user": self.user,
            "application": self.application,
            "client": self.client,
            "connection_id": self.connection_id,
            "rows": self.rows,
            "sqlstate": self.sqlstate,
            "route": self.route,
            "parameters": list(self.parameters) if self.parameters is not None else None,
        }


class SlowLog:
    def __init__(self, size: int = 1000) -> None:
        self.entries: deque[SlowQuery] = deque(maxlen=size)
        self.total = 0

    def add(self, item: SlowQuery) -> None:
        self.entries.append(item)
        self.total += 1

    def select(self, since: float | None = None, min_ms: float | None = None,
               fingerprint: str | None = None) -> list[SlowQuery]:
        """Newest first."""
        out = []
        for item in reversed(self.entries):
            if since is not None and item.at < since:
                break
            if min_ms is not None and item.duration * 1000 < min_ms:
                continue
            if fingerprint is not None and item.fingerprint != fingerprint:
                continue
            out.append(item)
        return out

    def reset(self) -> None:
        self.entries.clear()
        self.total = 0
