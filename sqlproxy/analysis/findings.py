"""Findings: the costly access patterns the per-connection detectors saw, aggregated.

One finding per (kind, fingerprint, parent fingerprint, application_name, endpoint), across
connections and databases (the endpoint is the route, or controller#action, that the
statements' tags named: see tags.py; "" for untagged traffic): how often the pattern occurred,
its largest burst, the time it cost (the time spent in the repeated statements), when it was
first and last seen, a redacted example (the normalized text, literals as ``$n``) and a
one-line suggestion naming the fix, in ORM terms where one applies. Findings of requests keep
a few of their trace ids as examples. The number of findings is bounded like the statistics:
when full, the least-used 5 % are evicted (usage decays, so old findings can leave too).

Nothing here runs per execution: the detector calls ``add`` when a burst ends, or when a single
execution is itself the finding (an unbounded result, a deep OFFSET).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from hashlib import blake2b
from typing import Any

from sqlproxy.analysis.timefmt import iso

__all__ = [
    "COMMIT_PER_ROW",
    "CONNECTION_CHURN",
    "DEEP_OFFSET",
    "KINDS",
    "LATENCY_REGRESSION",
    "NEW_HOT_STATEMENT",
    "N_PLUS_ONE",
    "POOL_KINDS",
    "POOL_SATURATED",
    "REPEATED_QUERY",
    "ROW_BY_ROW_WRITE",
    "SESSION_STATE_IN_POOL",
    "SORT_KEYS",
    "UNBOUNDED_RESULT",
    "Finding",
    "FindingsStore",
    "finding_id",
    "suggest",
]

N_PLUS_ONE = "n_plus_one"
REPEATED_QUERY = "repeated_query"
ROW_BY_ROW_WRITE = "row_by_row_write"
COMMIT_PER_ROW = "commit_per_row"
UNBOUNDED_RESULT = "unbounded_result"
DEEP_OFFSET = "deep_offset"
LATENCY_REGRESSION = "latency_regression"
NEW_HOT_STATEMENT = "new_hot_statement"
# Connection findings (sqlproxy/analysis/churn.py, sqlproxy/pool/report.py): about sessions
# and pools rather than statements; their ``users`` name the database users.
POOL_SATURATED = "pool_saturated"
CONNECTION_CHURN = "connection_churn"
SESSION_STATE_IN_POOL = "session_state_in_pool"
POOL_KINDS = (POOL_SATURATED, CONNECTION_CHURN, SESSION_STATE_IN_POOL)
KINDS = (N_PLUS_ONE, REPEATED_QUERY, ROW_BY_ROW_WRITE, COMMIT_PER_ROW, UNBOUNDED_RESULT,
         DEEP_OFFSET, LATENCY_REGRESSION, NEW_HOT_STATEMENT, *POOL_KINDS)
SORT_KEYS = ("total_ms", "occurrences", "max_burst", "last_seen", "first_seen")
MAX_DATABASES = 16  # database names remembered per finding
MAX_TRACE_IDS = 5  # example trace ids kept per finding (the latest)


def finding_id(kind: str, fingerprint: str, parent: str | None, application: str,
               endpoint: str = "") -> str:
    """16 hex chars naming a finding, stable across processes (for ``/findings/{id}``)."""
    parts = (kind, fingerprint, parent or "", application)
    key = "\x00".join((*parts, endpoint) if endpoint else parts)
    return blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


class Finding:
    """One aggregated pattern."""

    __slots__ = (
        "action",
        "application",
        "controller",
        "databases",
        "endpoint",
        "example",
        "executions",
        "fingerprint",
        "first_seen",
        "id",
        "interleaved_with",
        "kind",
        "last_seen",
        "max_burst",
        "max_offset",
        "max_rows",
        "occurrences",
        "parent_fingerprint",
        "parent_query",
        "query",
        "route",
        "statement_kind",
        "suggestion",
        "tables",
        "total",
        "trace_ids",
        "usage",
        "users",
        "window",
    )

    def __init__(self, kind: str, fingerprint: str, query: str, parent_fingerprint: str | None,
                 parent_query: str | None, application: str, now: float,
                 endpoint: str = "") -> None:
        self.id = finding_id(kind, fingerprint, parent_fingerprint, application, endpoint)
        self.endpoint = endpoint
        self.route = ""
        self.controller = ""
        self.action = ""
        self.trace_ids: list[str] = []
        # Regression findings: the window's figures against the baseline's (see windows.py).
        self.window: dict[str, Any] = {}
        self.kind = kind
        self.fingerprint = fingerprint
        self.query = query
        self.parent_fingerprint = parent_fingerprint
        self.parent_query = parent_query
        self.application = application
        self.occurrences = 0
        self.executions = 0  # repeated statements over all occurrences
        self.max_burst = 0
        self.total = 0.0  # seconds spent in the repeated statements
        self.first_seen = now
        self.last_seen = now
        self.example = ""
        self.suggestion = ""
        self.statement_kind = ""
        self.tables: tuple[str, ...] = ()
        self.interleaved_with: tuple[str, ...] = ()
        self.max_rows = 0
        self.max_offset = 0
        self.databases: dict[str, int] = {}
        self.users: dict[str, int] = {}  # database users (connection findings only)
        self.usage = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "fingerprint": self.fingerprint,
            "query": self.query,
            "parent_fingerprint": self.parent_fingerprint,
            "parent_query": self.parent_query,
            "occurrences": self.occurrences,
            "executions": self.executions,
            "max_burst": self.max_burst,
            "total_ms": self.total * 1000,
            "application": self.application,
            "databases": sorted(self.databases),
            "users": sorted(self.users),
            "suggestion": self.suggestion,
            "first_seen": iso(self.first_seen),
            "last_seen": iso(self.last_seen),
            "example": self.example,
            "statement_kind": self.statement_kind,
            "tables": list(self.tables),
            "interleaved_with": list(self.interleaved_with),
            "max_rows": self.max_rows,
            "max_offset": self.max_offset,
            "endpoint": self.endpoint,
            "route": self.route,
            "controller": self.controller,
            "action": self.action,
            "trace_ids": list(self.trace_ids),
            "window": dict(self.window) if self.window else None,
        }

    def detail(self) -> dict[str, Any]:
        out = self.to_dict()
        occ = self.occurrences or 1
        out["mean_burst"] = self.executions / occ
        out["mean_ms_per_occurrence"] = self.total * 1000 / occ
        out["databases_by_occurrences"] = dict(self.databases)
        return out

    # -- persistence (see sqlproxy/state.py) ---------------------------------------------
    def to_state(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "fingerprint": self.fingerprint, "query": self.query,
            "parent_fingerprint": self.parent_fingerprint, "parent_query": self.parent_query,
            "application": self.application, "occurrences": self.occurrences,
            "executions": self.executions, "max_burst": self.max_burst, "total": self.total,
            "first_seen": self.first_seen, "last_seen": self.last_seen,
            "example": self.example, "suggestion": self.suggestion,
            "statement_kind": self.statement_kind, "tables": list(self.tables),
            "interleaved_with": list(self.interleaved_with), "max_rows": self.max_rows,
            "max_offset": self.max_offset, "databases": dict(self.databases),
            "users": dict(self.users), "usage": self.usage, "endpoint": self.endpoint,
            "route": self.route,
            "controller": self.controller, "action": self.action,
            "trace_ids": list(self.trace_ids), "window": dict(self.window),
        }  # fmt: skip

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> Finding:
        parent = d["parent_fingerprint"]
        f = cls(str(d["kind"]), str(d["fingerprint"]), str(d["query"]),
                None if parent is None else str(parent),
                None if d["parent_query"] is None else str(d["parent_query"]),
                str(d["application"]), float(d["first_seen"]), str(d.get("endpoint") or ""))
        f.route = str(d.get("route") or "")
        f.controller = str(d.get("controller") or "")
        f.action = str(d.get("action") or "")
        f.trace_ids = [str(t) for t in d.get("trace_ids") or ()][-MAX_TRACE_IDS:]
        f.window = dict(d.get("window") or {})
        f.occurrences = int(d["occurrences"])
        f.executions = int(d["executions"])
        f.max_burst = int(d["max_burst"])
        f.total = float(d["total"])
        f.last_seen = float(d["last_seen"])
        f.example = str(d["example"])
        f.suggestion = str(d["suggestion"])
        f.statement_kind = str(d["statement_kind"])
        f.tables = tuple(str(t) for t in d["tables"])
        f.interleaved_with = tuple(str(t) for t in d["interleaved_with"])
        f.max_rows = int(d["max_rows"])
        f.max_offset = int(d["max_offset"])
        f.databases = {str(k): int(v) for k, v in dict(d["databases"]).items()}
        f.users = {str(k): int(v) for k, v in dict(d.get("users") or {}).items()}
        f.usage = float(d["usage"])
        return f

    def merge(self, other: Finding) -> None:
        """Fold ``other`` (the same finding, from elsewhere) into this one."""
        self.occurrences += other.occurrences
        self.executions += other.executions
        self.max_burst = max(self.max_burst, other.max_burst)
        self.total += other.total
        self.first_seen = min(self.first_seen, other.first_seen)
        if other.last_seen >= self.last_seen:
            self.last_seen = other.last_seen
            self.example = other.example or self.example
            self.suggestion = other.suggestion or self.suggestion
        self.max_rows = max(self.max_rows, other.max_rows)
        self.max_offset = max(self.max_offset, other.max_offset)
        self.interleaved_with = tuple(sorted(set(self.interleaved_with)
                                             | set(other.interleaved_with)))
        for db, n in other.databases.items():
            if db in self.databases or len(self.databases) < MAX_DATABASES:
                self.databases[db] = self.databases.get(db, 0) + n
        for user, n in other.users.items():
            if user in self.users or len(self.users) < MAX_DATABASES:
                self.users[user] = self.users.get(user, 0) + n
        self.usage += other.usage
        for t in other.trace_ids:
            if t not in self.trace_ids:
                self.trace_ids.append(t)
        del self.trace_ids[:-MAX_TRACE_IDS]


def _key(kind: str, fingerprint: str, parent: str | None, application: str,
         endpoint: str) -> tuple[str, str, str, str, str]:
    return (kind, fingerprint, parent or "", application, endpoint)


class FindingsStore:
    """Bounded map (kind, fingerprint, parent fingerprint, application, endpoint) -> Finding.

    Also a state contributor (``sqlproxy.state``): findings survive restarts.
    """

    state_section = "findings"
    state_version = 1

    def __init__(self, max_entries: int = 2000, log: Any = None) -> None:
        self.max_entries = max_entries
        self.log = log
        self.entries: dict[tuple[str, str, str, str, str], Finding] = {}
        self.by_id: dict[str, Finding] = {}
        self.evictions = 0
        self.reported = 0  # occurrences ever added

    def add(
        self,
        kind: str,
        fingerprint: str,
        query: str,
        parent_fingerprint: str | None,
        parent_query: str | None,
        application: str,
        database: str,
        burst: int,
        seconds: float,
        now: float,
        *,
        example: str,
        suggestion: str,
        statement_kind: str = "",
        tables: tuple[str, ...] = (),
        interleaved_with: tuple[str, ...] = (),
        rows: int = 0,
        offset: int = 0,
        connection_id: int | None = None,
        endpoint: str = "",
        route: str = "",
        controller: str = "",
        action: str = "",
        trace_id: str = "",
        user: str = "",
        count: int = 1,
    ) -> Finding:
        """Record one occurrence of a pattern; logs the first occurrence of each finding.
        ``endpoint`` (with its ``route``, ``controller``, ``action``) is what the statements'
        tags named; ``trace_id`` the request's, kept as an example. ``count`` occurrences
        at once (connection findings report what happened since they last looked), of the
        database ``user`` (connection findings only)."""
        key = _key(kind, fingerprint, parent_fingerprint, application, endpoint)
        f = self.entries.get(key)
        new = f is None
        if f is None:
            if len(self.entries) >= self.max_entries:
                self._evict()
            f = Finding(kind, fingerprint, query, parent_fingerprint, parent_query, application,
                        now, endpoint)
            f.route = route
            f.controller = controller
            f.action = action
            self.entries[key] = f
            self.by_id[f.id] = f
        if trace_id and trace_id not in f.trace_ids:
            f.trace_ids.append(trace_id)
            if len(f.trace_ids) > MAX_TRACE_IDS:
                del f.trace_ids[0]
        f.occurrences += count
        f.executions += burst
        if burst > f.max_burst:
            f.max_burst = burst
        f.total += seconds
        f.last_seen = now
        f.usage += 1.0
        if new or burst >= f.max_burst:
            f.example = example  # the largest occurrence is the telling one
        f.suggestion = suggestion
        f.statement_kind = statement_kind
        f.tables = tables
        if interleaved_with:
            f.interleaved_with = tuple(sorted(set(f.interleaved_with) | set(interleaved_with)))
        if rows > f.max_rows:
            f.max_rows = rows
        if offset > f.max_offset:
            f.max_offset = offset
        dbs = f.databases
        if database in dbs:
            dbs[database] += 1
        elif len(dbs) < MAX_DATABASES:
            dbs[database] = 1
        if user:
            users = f.users
            if user in users:
                users[user] += count
            elif len(users) < MAX_DATABASES:
                users[user] = count
        self.reported += count
        if new and self.log is not None:
            self.log.warning(
                "finding", kind=kind, finding_id=f.id, fingerprint=fingerprint,
                query=query[:2000], parent_fingerprint=parent_fingerprint,
                parent_query=parent_query[:2000] if parent_query else None,
                application_name=application, database=database, user=user or None,
                burst=burst,
                duration_ms=round(seconds * 1000, 3), suggestion=suggestion,
                connection_id=connection_id, route=route or None,
                controller=controller or None, action=action or None,
                trace_id=trace_id or None,
            )
        return f

    def _evict(self) -> None:
        """Drop the least-used 5 % (at least one), and decay the usage of the others."""
        victims = sorted(self.entries.items(), key=lambda kv: (kv[1].usage, kv[1].last_seen))
        n = max(1, len(victims) * 5 // 100)
        for key, f in victims[:n]:
            del self.entries[key]
            self.by_id.pop(f.id, None)
        self.evictions += n
        for f in self.entries.values():
            f.usage *= 0.99

    def select(
        self,
        kind: str | None = None,
        application: str | None = None,
        database: str | None = None,
        fingerprint: str | None = None,
        sort: str = "total_ms",
        route: str | None = None,
        controller: str | None = None,
        action: str | None = None,
    ) -> list[Finding]:
        """Matching findings, most costly first (or by ``sort``, descending)."""
        if kind is not None and kind not in KINDS:
            raise ValueError(f"unknown finding kind {kind!r}; expected one of {', '.join(KINDS)}")
        if sort not in SORT_KEYS:
            raise ValueError(f"unknown sort key {sort!r}; expected one of {', '.join(SORT_KEYS)}")
        items: Iterable[Finding] = self.entries.values()
        if kind:
            items = (f for f in items if f.kind == kind)
        if application is not None:
            items = (f for f in items if f.application == application)
        if database:
            items = (f for f in items if database in f.databases)
        if fingerprint:
            items = (f for f in items
                     if f.fingerprint == fingerprint or f.parent_fingerprint == fingerprint)
        if route:
            items = (f for f in items if route in (f.route, f.endpoint))
        if controller:
            items = (f for f in items if f.controller == controller)
        if action:
            items = (f for f in items if f.action == action)
        attr = "total" if sort == "total_ms" else sort
        return sorted(items, key=lambda f: (getattr(f, attr), f.last_seen), reverse=True)

    def get(self, id_: str) -> Finding | None:
        return self.by_id.get(id_)

    def reset(self) -> None:
        self.entries.clear()
        self.by_id.clear()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self.entries)

    # -- persistence ---------------------------------------------------------------------
    def to_state(self) -> Any:
        return {"findings": [f.to_state() for f in self.entries.values()],
                "evictions": self.evictions}

    def from_state(self, data: Any, version: int) -> None:
        if version != self.state_version:
            raise ValueError(f"findings state version {version} is not supported")
        restored = [Finding.from_state(d) for d in data["findings"]]
        for f in restored:
            key = _key(f.kind, f.fingerprint, f.parent_fingerprint, f.application, f.endpoint)
            mine = self.entries.get(key)
            if mine is not None:  # seen since start: keep both
                f.merge(mine)
            elif len(self.entries) >= self.max_entries:
                self._evict()
            self.entries[key] = f
            self.by_id[f.id] = f
        self.evictions += int(data.get("evictions", 0))


# ------------------------------------------------------------------------------ suggestions
_EQ_PARAM_RE = re.compile(r'((?:"[^"]+"|[a-z_][\w$]*)(?:\.(?:"[^"]+"|[a-z_][\w$]*))?)\s*=\s*'
                          r"\$\d+(?:::[\w ]+)?")
_PARAM_EQ_RE = re.compile(r'\$\d+(?:::[\w ]+)?\s*=\s*((?:"[^"]+"|[a-z_][\w$]*)'
                          r'(?:\.(?:"[^"]+"|[a-z_][\w$]*))?)')


def lookup_column(query: str) -> str | None:
    """The column a lookup filters on (``team_id`` in ``where players.team_id = $1``)."""
    low = query.lower()
    where = low.rfind(" where ")
    part = query[where:] if where >= 0 else query
    m = _EQ_PARAM_RE.search(part) or _PARAM_EQ_RE.search(part)
    if m is None:
        return None
    return m.group(1).rsplit(".", 1)[-1]


def _names(tables: tuple[str, ...]) -> str:
    return " and ".join(t.rsplit(".", 1)[-1] for t in tables) if tables else "the rows"


def suggest(
    kind: str,
    *,
    query: str = "",
    tables: tuple[str, ...] = (),
    parent_tables: tuple[str, ...] | None = None,
    statement_kind: str = "",
    interleaved_tables: tuple[str, ...] = (),
    rows: int = 0,
    offset: int = 0,
    repeats: int = 0,
) -> str:
    """One line naming the fix."""
    what = _names(tables)
    if kind == N_PLUS_ONE:
        col = lookup_column(query) or "id"
        if interleaved_tables:
            also = _names(interleaved_tables)
            per = f"the {_names(parent_tables)}" if parent_tables else "the parent rows"
            return (f"load {what} and {also} for all {per} up front: one selectinload/"
                    f"joinedload per relationship, or one query per table with "
                    f"`{col} = ANY($1)`, instead of a query per row for each")
        if parent_tables:
            return (f"load {what} with the {_names(parent_tables)}: selectinload/joinedload, "
                    f"or one query with `{col} = ANY($1)`")
        return (f"batch these lookups: one query with `{col} = ANY($1)` (selectinload/"
                f"joinedload for an ORM relationship) instead of one per row")
    if kind == REPEATED_QUERY:
        return (f"the same query with the same values ran {repeats} times in a row: run it "
                "once and reuse the result (load it before the loop, memoize it per request, "
                "or cache it)")
    if kind == ROW_BY_ROW_WRITE:
        if statement_kind == "insert":
            return (f"insert the {what} rows in one statement: session.add_all() with one "
                    "flush, executemany, a multi-row VALUES, insert(...).values([...]) or COPY")
        if statement_kind == "update":
            return (f"update {what} in one statement: UPDATE … FROM (VALUES …) or "
                    "`WHERE id = ANY($1)`, or a bulk update (session.execute(update(Model), "
                    "[{...}, ...])) / executemany")
        if statement_kind == "delete":
            return f"delete from {what} in one statement: `DELETE … WHERE id = ANY($1)`"
        return f"write the {what} rows in one statement or with executemany, not one per row"
    if kind == COMMIT_PER_ROW:
        return ("commit once after the loop, not once per row (each COMMIT waits for a WAL "
                "flush): one transaction for the batch (session.add_all() then one commit())")
    if kind == UNBOUNDED_RESULT:
        return (f"{rows} rows read without LIMIT: paginate (LIMIT with keyset `WHERE id > $1`) "
                "or stream them (yield_per / a server-side cursor) instead of loading "
                f"all of {what} at once")
    if kind == LATENCY_REGRESSION:
        return ("this statement got slower than its baseline: EXPLAIN it (a dropped or unused "
                "index, a changed plan, grown data, locks) and compare with a deploy or a data "
                "change at the window's start")
    if kind == NEW_HOT_STATEMENT:
        return ("a statement never seen before takes a large share of the database's time: "
                "check the code that started sending it (a new query, or a changed one that "
                "lost its index or its batching)")
    if kind == DEEP_OFFSET:
        return (f"OFFSET {offset} reads and throws away {offset} rows: use keyset pagination "
                "(`WHERE (sort_key, id) > ($1, $2) ORDER BY sort_key, id LIMIT n`)")
    return ""
