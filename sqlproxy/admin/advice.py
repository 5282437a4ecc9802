"""Advice from an EXPLAIN (FORMAT JSON, VERBOSE) plan. Pure: plan and catalog facts in, advice out.

Three findings, each with what to do:

* ``missing_index``: a sequential scan of a large table (at least ``LARGE_TABLE_ROWS`` rows)
  whose filter keeps a small part of it (at most ``SELECTIVE_FRACTION``) → ``CREATE INDEX`` on
  the filtered columns, equality columns first (an index serves equality on leading columns and
  then one range), unless an index already leads with them (then the statistics are stale).
* ``row_misestimate`` (EXPLAIN ANALYZE only): a node whose actual rows differ from the
  estimate by more than ``MISESTIMATE_FACTOR`` → ANALYZE, or extended statistics.
* ``sort_spill`` / ``hash_spill`` (EXPLAIN ANALYZE only): a sort or hash that went to disk →
  more ``work_mem`` for that query, or an index that delivers the order.

The filter text is PostgreSQL's deparsed expression (``((email)::text = $1)``); column names
are taken from simple ``column <op> ...`` comparisons, and kept only if they are real columns
of the scanned table — an expression like ``lower(email) = ...`` would need an expression
index, and is not guessed at.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

LARGE_TABLE_ROWS = 10_000
SELECTIVE_FRACTION = 0.10
MISESTIMATE_FACTOR = 10.0
MISESTIMATE_MIN_ROWS = 50  # below this on both sides a misestimate does not matter


@dataclass(frozen=True, slots=True)
class TableInfo:
    """What the catalog says about one table (pg_class, pg_attribute, pg_index)."""

    schema: str
    name: str
    rows: float  # pg_class.reltuples; < 0 when never analyzed
    columns: tuple[str, ...]
    indexes: tuple[tuple[str, ...], ...] = field(default=())  # key columns, in order

    @property
    def qualified(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"


_PLAIN_IDENT = re.compile(r"[a-z_][a-z0-9_$]*\Z")


def quote_ident(name: str) -> str:
    return name if _PLAIN_IDENT.match(name) else '"' + name.replace('"', '""') + '"'


_STRING = re.compile(r"'(?:[^']|'')*'")
_COND = re.compile(
    r"""(?<![\w$."])
        (?:(?:"(?:[^"]|"")+"|[a-z_][a-z0-9_$]*)\.)?          # optional alias.
        (?P<col>"(?:[^"]|"")+"|[a-z_][a-z0-9_$]*)
        \)?(?:::[a-z ]+(?:\[\])?\)?)?                          # ((col)::text ...
        \s*(?P<op>=\s*ANY|IS\s+NOT\s+NULL|IS\s+NULL|<>|!=|<=|>=|=|<|>|!~~\*?|~~\*?)
    """,
    re.IGNORECASE | re.VERBOSE,
)
_EQUALITY = ("=", "=ANY", "ISNULL")
_RANGE = ("<", ">", "<=", ">=", "~~")


def filter_columns(expr: str) -> list[str]:
    """Columns of ``expr`` compared with an indexable operator: equality ones first."""
    text = _STRING.sub("''", expr)
    equality: list[str] = []
    ranged: list[str] = []
    for m in _COND.finditer(text):
        start = m.start()
        # `lower(email) = ...`: the column is an argument of a function, not the operand.
        before = text[:start].rstrip("(")
        if len(before) < start and before and (before[-1].isalnum() or before[-1] == "_"):
            continue
        col = m.group("col")
        if col.upper() in ("AND", "OR", "NOT", "NULL", "TRUE", "FALSE", "ANY", "ALL"):
            continue
        col = col[1:-1].replace('""', '"') if col.startswith('"') else col
        op = re.sub(r"\s+", "", m.group("op")).upper()
        if op in _EQUALITY and col not in equality:
            equality.append(col)
        elif op in _RANGE and col not in ranged:
            ranged.append(col)
    return equality + [c for c in ranged if c not in equality]


def walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", ()):
        yield from walk(child)


def root(plan: Any) -> dict[str, Any]:
    """The top plan node of EXPLAIN (FORMAT JSON) output (a one-element list)."""
    doc = plan[0] if isinstance(plan, list) else plan
    node = doc.get("Plan", doc)
    return node if isinstance(node, dict) else {}


def relations(plan: Any) -> set[tuple[str, str]]:
    """(schema, table) of every scanned relation (VERBOSE plans carry the schema)."""
    out = set()
    for node in walk(root(plan)):
        if "Relation Name" in node:
            out.add((node.get("Schema", "public"), node["Relation Name"]))
    return out


def advise(plan: Any, tables: dict[tuple[str, str], TableInfo]) -> list[dict[str, Any]]:
    advice: list[dict[str, Any]] = []
    seen: set[str] = set()
    for node in walk(root(plan)):
        for item in _node_advice(node, tables):
            key = item["kind"] + "|" + str(item.get("suggestion"))
            if key not in seen:
                seen.add(key)
                advice.append(item)
    return advice


def _node_advice(node: dict[str, Any],
                 tables: dict[tuple[str, str], TableInfo]) -> Iterator[dict[str, Any]]:
    ntype = node.get("Node Type", "")
    if ntype == "Seq Scan" and node.get("Filter"):
        item = _seq_scan(node, tables)
        if item is not None:
            yield item
    if "Actual Rows" in node and "Plan Rows" in node:
        item = _misestimate(node)
        if item is not None:
            yield item
    if node.get("Sort Space Type") == "Disk":
        used = node.get("Sort Space Used", 0)
        keys = ", ".join(node.get("Sort Key", []))
        yield {
            "kind": "sort_spill",
            "node": ntype,
            "sort_key": node.get("Sort Key", []),
            "disk_kb": used,
            "message": f"the sort on ({keys}) spilled {used} kB to disk "
                       f"({node.get('Sort Method', 'external')})",
            "suggestion": f"SET LOCAL work_mem = '{_mb(used * 2)}MB' for this query, or an "
                          "index that returns the rows in this order",
        }
    batches = node.get("Hash Batches", 1)
    if ntype == "Hash" and isinstance(batches, int) and batches > 1:
        used = node.get("Peak Memory Usage", 0)
        yield {
            "kind": "hash_spill",
            "node": ntype,
            "batches": batches,
            "message": f"the hash table needed {batches} batches (spilled to disk)",
            "suggestion": f"SET LOCAL work_mem = '{_mb(used * batches)}MB' for this query",
        }


def _mb(kb: float) -> int:
    return max(4, int(kb / 1024) + 1)


def _seq_scan(node: dict[str, Any],
              tables: dict[tuple[str, str], TableInfo]) -> dict[str, Any] | None:
    info = tables.get((node.get("Schema", "public"), node.get("Relation Name", "")))
    if info is None:
        return None
    loops = node.get("Actual Loops") or 1
    if "Actual Rows" in node and "Rows Removed by Filter" in node:
        kept = node["Actual Rows"] * loops
        table_rows = kept + node["Rows Removed by Filter"] * loops
        basis = "actual"
    else:
        workers = node.get("Workers Planned", 0) + 1 if node.get("Parallel Aware") else 1
        kept = node.get("Plan Rows", 0) * workers
        table_rows = info.rows
        basis = "estimated"
    if info.rows < 0 and basis == "estimated":
        return {
            "kind": "never_analyzed",
            "node": "Seq Scan",
            "relation": info.qualified,
            "message": f"{info.qualified} has never been analyzed: the planner is guessing",
            "suggestion": f"ANALYZE {info.qualified};",
        }
    if table_rows < LARGE_TABLE_ROWS or kept > table_rows * SELECTIVE_FRACTION:
        return None
    columns = [c for c in filter_columns(str(node["Filter"])) if c in info.columns]
    if not columns:
        return None
    columns = columns[:4]
    fraction = kept / table_rows if table_rows else 0.0
    common = {
        "node": "Seq Scan",
        "relation": info.qualified,
        "columns": columns,
        "filter": node["Filter"],
        "table_rows": int(table_rows),
        "rows_kept": int(kept),
        "basis": basis,
    }
    for index in info.indexes:
        if index and index[0] == columns[0]:
            return {
                "kind": "stale_statistics",
                **common,
                "message": f"a sequential scan of {info.qualified} keeps {fraction:.2%} of "
                           f"{int(table_rows)} rows although an index on ({', '.join(index)}) "
                           "exists: the statistics may be stale",
                "suggestion": f"ANALYZE {info.qualified};",
            }
    cols = ", ".join(quote_ident(c) for c in columns)
    return {
        "kind": "missing_index",
        **common,
        "message": f"a sequential scan of {info.qualified} reads {int(table_rows)} rows to keep "
                   f"{fraction:.2%} of them ({basis}); filter: {node['Filter']}",
        "suggestion": f"CREATE INDEX CONCURRENTLY ON {info.qualified} ({cols});",
    }


def _misestimate(node: dict[str, Any]) -> dict[str, Any] | None:
    if node.get("Actual Loops", 1) == 0:
        return None  # never executed
    actual = float(node["Actual Rows"])
    planned = float(node["Plan Rows"])
    if max(actual, planned) < MISESTIMATE_MIN_ROWS:
        return None
    ratio = max(actual, 1.0) / max(planned, 1.0)
    if 1 / MISESTIMATE_FACTOR <= ratio <= MISESTIMATE_FACTOR:
        return None
    rel = node.get("Relation Name")
    where = f" on {quote_ident(node.get('Schema', 'public'))}.{quote_ident(rel)}" if rel else ""
    direction = "under" if ratio > 1 else "over"
    factor = ratio if ratio > 1 else 1 / ratio
    return {
        "kind": "row_misestimate",
        "node": node.get("Node Type"),
        "relation": (f"{node.get('Schema', 'public')}.{rel}" if rel else None),
        "estimated_rows": planned,
        "actual_rows": actual,
        "factor": round(factor, 1),
        "message": f"{node.get('Node Type')}{where}: the planner {direction}estimated the rows "
                   f"{factor:.0f} times ({planned:.0f} estimated, {actual:.0f} actual)",
        "suggestion": (f"ANALYZE {quote_ident(node.get('Schema', 'public'))}.{quote_ident(rel)};"
                       " if it persists, CREATE STATISTICS on the correlated columns"
                       if rel else "ANALYZE the tables involved; if it persists, "
                       "CREATE STATISTICS on the correlated columns"),
    }
