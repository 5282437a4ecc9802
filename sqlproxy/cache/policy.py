"""What may be cached, under which rule, for how long (pure, no I/O).

A statement is cacheable only when it is *provably* read-only and its result depends on nothing
but the tables it names, the statement text, its parameters and the session settings in the
key: a SELECT (VALUES, TABLE, set operations) that sqlglot parsed, without a locking clause,
INTO or a data-modifying CTE (the routing policy's own test), calling only functions the
catalog says are IMMUTABLE (``now()`` is stable, ``random()`` volatile: neither is cached), and
reading only tables and views the catalog knows (not the system catalogs, not foreign tables).

A cacheable statement is cached when a rule covers it — ``fingerprint`` (the statement's id)
or ``table`` (any of the relations it reads) — or when its text carries the hint
``/* sqlproxy:cache */`` or ``/* sqlproxy:cache ttl=30 */``. Nothing else is ever cached.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from sqlproxy.analysis.classify import Shape, StatementKind
from sqlproxy.config import CacheRule, CacheSection

__all__ = ["Catalog", "Coverage", "RuleSet", "hint_ttl", "statement_problem"]

_K = StatementKind
_HINT_RE = re.compile(r"/\*\s*sqlproxy:cache(?:\s+ttl\s*=\s*([0-9]+(?:\.[0-9]+)?))?\s*\*/",
                      re.IGNORECASE)
#: Relation kinds whose rows change only through statements the proxy sees: tables,
#: partitioned tables, views (through their tables), materialized views (REFRESH).
_CACHEABLE_RELKINDS = frozenset("rpvm")


def _base(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def hint_ttl(sql: str, default: float, maximum: float) -> float | None:
    """The TTL a ``/* sqlproxy:cache [ttl=N] */`` hint in ``sql`` asks for (None: no hint)."""
    if "sqlproxy:cache" not in sql and "SQLPROXY:CACHE" not in sql.upper():
        return None
    m = _HINT_RE.search(sql)
    if m is None:
        return None
    ttl = float(m.group(1)) if m.group(1) else default
    return min(ttl, maximum) if ttl > 0 else None


@dataclass(slots=True)
class Catalog:
    """What the cache must know of one database: function volatility (``pg_proc``), the
    relations and their kinds, what each view reads and each partition's parents."""

    volatility: Mapping[str, str] = field(default_factory=dict)
    relkinds: Mapping[str, str] = field(default_factory=dict)
    view_reads: Mapping[str, frozenset[str]] = field(default_factory=dict)
    parents: Mapping[str, frozenset[str]] = field(default_factory=dict)
    loaded: bool = False

    def function_problem(self, name: str, write_functions: frozenset[str]) -> str | None:
        if name in write_functions or _base(name) in write_functions:
            return f"write function {name}"
        vol = self.volatility.get(name)
        if vol is None and "." in name:
            vol = self.volatility.get(_base(name))
        if vol == "i":
            return None
        if vol is None:
            return f"unknown function {name}"
        return f"{'volatile' if vol == 'v' else 'stable'} function {name}"

    def read_set(self, tables: Iterable[str]) -> tuple[frozenset[str], str | None]:
        """The base names of the relations a read depends on (views expanded), or a reason
        why it cannot be cached (a relation the catalog does not know, a foreign table)."""
        out: set[str] = set()
        for t in tables:
            if t.startswith(("pg_catalog.", "information_schema.")):
                return frozenset(), f"system relation {t}"
            b = _base(t)
            kind = self.relkinds.get(b)
            if kind is None:
                return frozenset(), f"unknown relation {t}"
            if kind not in _CACHEABLE_RELKINDS:
                return frozenset(), f"relation {t} of kind {kind!r}"
            out.add(b)
            out.update(self.view_reads.get(b, ()))
        return frozenset(out), None

    def affected(self, written: Iterable[str]) -> set[str]:
        """The base names a write to ``written`` invalidates (with a partition's parents)."""
        out: set[str] = set()
        for t in written:
            b = _base(t)
            out.add(b)
            out.update(self.parents.get(b, ()))
        return out


def statement_problem(shape: Shape, catalog: Catalog,
                      write_functions: frozenset[str]) -> str | None:
    """Why one statement cannot be cached, or None when it can."""
    if shape.kind is not _K.SELECT:
        return shape.kind.value
    if not shape.parsed:
        return "not parsed"
    if shape.locking is not None:
        return shape.locking
    if shape.has_into:
        return "select into"
    if shape.modifying_cte:
        return "data-modifying cte"
    if shape.writes or shape.session_state:
        return "writes"
    for f in shape.functions:
        problem = catalog.function_problem(f, write_functions)
        if problem is not None:
            return problem
    return None


@dataclass(frozen=True, slots=True)
class Coverage:
    """The rule (or hint) that covers a statement and the entry's TTL."""

    rule: str
    ttl_s: float


class RuleSet:
    """The configured rules, indexed for one lookup per statement."""

    __slots__ = ("by_fingerprint", "by_table", "config", "write_functions")

    def __init__(self, config: CacheSection, write_functions: Iterable[str] = ()) -> None:
        self.config = config
        self.by_fingerprint: dict[str, CacheRule] = {}
        self.by_table: dict[str, CacheRule] = {}
        for rule in config.rules:
            if rule.fingerprint is not None:
                self.by_fingerprint.setdefault(rule.fingerprint, rule)
            elif rule.table is not None:
                self.by_table.setdefault(_base(rule.table), rule)
        self.write_functions = frozenset(f.lower() for f in write_functions)

    def cover(self, sql: str, fingerprints: Sequence[str],
              tables: Iterable[str]) -> Coverage | None:
        """Which rule covers a unit with these statements (None: not cached). A hint wins;
        then a fingerprint rule (all the unit's statements must share one); then the table
        rule with the shortest TTL among the tables read."""
        cfg = self.config
        ttl = hint_ttl(sql, cfg.hint_ttl_s, cfg.max_hint_ttl_s)
        if ttl is not None:
            return Coverage("hint", ttl)
        if len(set(fingerprints)) == 1:
            rule = self.by_fingerprint.get(fingerprints[0])
            if rule is not None:
                return Coverage(rule.label, rule.ttl_s)
        best: CacheRule | None = None
        if self.by_table:
            for t in tables:
                rule = self.by_table.get(_base(t))
                if rule is not None and (best is None or rule.ttl_s < best.ttl_s):
                    best = rule
        if best is not None:
            return Coverage(best.label, best.ttl_s)
        return None

    def suggestion(self, fingerprint: str, tables: Sequence[str]) -> str:
        """The ``[[cache.rules]]`` entry that would serve a statement (for findings)."""
        return f'[[cache.rules]] fingerprint = "{fingerprint}"  ttl_s = 30'
