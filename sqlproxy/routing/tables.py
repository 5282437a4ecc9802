"""``read_your_writes = "table"``: reads of a table just written wait for the replicas.

In "session" mode only the writing session's reads stay on the primary until a replica has
replayed its write. In "table" mode a write to table ``t`` (by any session) also sets a horizon
on ``t``: any session's read naming ``t`` goes to a replica only once that replica has replayed
past the primary position read after the write. Pure bookkeeping, no I/O: the router feeds it
the poll cycles and the relation catalog.

Conservative where it cannot know:

* tables are matched by their name without schema (a write to ``a.t`` holds back reads of
  ``b.t`` too);
* a read of a view counts as a read of the relations the view depends on (from ``pg_depend``,
  transitively); a read naming a relation the catalog does not know (created since it was
  loaded) counts as a read of every table;
* a write whose tables are unknown — a function that is not provably read-only (it may write
  anything), CALL, DO, a unit the proxy could not parse, a "read" a replica refused — counts as
  a write to every table of the database (``ALL``);
* ``nextval`` / ``setval`` write only their sequence, not a table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from sqlproxy.analysis.classify import StatementKind
from sqlproxy.routing.policy import FunctionPolicy, RoutedStatement

__all__ = ["ALL", "TableHorizons", "view_closure", "written_tables"]

ALL = "*"  # every table of the database
_SEQUENCE_FUNCTIONS = frozenset({"nextval", "setval", "pg_catalog.nextval", "pg_catalog.setval"})
_K = StatementKind
_READS = frozenset({_K.SELECT, _K.SHOW, _K.EXPLAIN, _K.SET, _K.TRANSACTION})


def _base(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def written_tables(
    statements: Sequence[RoutedStatement] | None, functions: FunctionPolicy
) -> frozenset[str]:
    """The tables a unit that may write could have changed (``{ALL}`` when unknown)."""
    if statements is None:
        return frozenset({ALL})
    out: set[str] = set()
    for st in statements:
        shape = st.shape
        suspicious = [f for f in shape.functions
                      if f not in _SEQUENCE_FUNCTIONS and not functions.is_read_only(f)]
        if suspicious or not shape.parsed or shape.kind in (_K.CALL, _K.UTILITY, _K.OTHER):
            if shape.kind is _K.UTILITY and shape.command in ("discard", "deallocate",
                                                              "listen", "unlisten", "notify"):
                continue
            return frozenset({ALL})
        if shape.kind in _READS and shape.locking is None and not shape.has_into \
                and not shape.modifying_cte:
            continue  # read-only (or a sequence function): no table changed
        out.update(_base(t) for t in shape.tables)
    return frozenset(out)


def view_closure(edges: Iterable[tuple[str, str]]) -> dict[str, frozenset[str]]:
    """``{view: every relation it reads, transitively}`` from (view, relation) pairs."""
    direct: dict[str, set[str]] = {}
    for view, rel in edges:
        direct.setdefault(view, set()).add(rel)
    out: dict[str, frozenset[str]] = {}
    for view in direct:
        seen: set[str] = set()
        todo = [view]
        while todo:
            for rel in direct.get(todo.pop(), ()):
                if rel not in seen:
                    seen.add(rel)
                    todo.append(rel)
        out[view] = frozenset(seen)
    return out


class TableHorizons:
    """Per table of one database: the poll cycle whose primary position a read must wait for."""

    __slots__ = ("relations", "views", "written")

    def __init__(self) -> None:
        self.written: dict[str, int] = {}  # table (or ALL) -> cycle
        self.relations: frozenset[str] | None = None  # known relation names (None: not loaded)
        self.views: Mapping[str, frozenset[str]] = {}

    def note_writes(self, tables: Iterable[str], cycle: int) -> None:
        written = self.written
        for t in tables:
            if written.get(t, 0) < cycle:
                written[t] = cycle

    def horizon(self, tables: Iterable[str]) -> int:
        """The cycle a read of ``tables`` must wait for (0: none)."""
        written = self.written
        if not written:
            return 0
        best = written.get(ALL, 0)
        relations = self.relations
        for name in tables:
            t = _base(name)
            if relations is not None and t not in relations and t.lower() not in relations:
                return max(written.values())  # unknown to the catalog: could be anything
            for r in (t, *self.views.get(t, ())):
                c = written.get(r, 0)
                if c > best:
                    best = c
        return best

    def prune(self, replayed: Callable[[int], bool]) -> None:
        """Forget horizons every replica has replayed past (``replayed(cycle)``)."""
        done = [t for t, c in self.written.items() if replayed(c)]
        for t in done:
            del self.written[t]
