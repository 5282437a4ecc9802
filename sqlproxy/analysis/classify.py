"""Classification of a normalized statement: what it is, what it touches, whether it writes.

This runs once per distinct statement *shape* (fingerprint), never per execution, so it may
afford sqlglot (dialect "postgres"). Transaction control, session and utility commands — the
statements sqlglot parses least reliably (``BEGIN READ ONLY`` fails, ``LISTEN x`` parses as a
column alias) — are recognised first by their leading keywords without sqlglot. Queries, DML and
DDL go to sqlglot; when it cannot parse them, a keyword fallback classifies them conservatively
and says so with ``parsed=False``.

``writes`` is True unless the statement is provably read-only, i.e. could run on a hot-standby
replica and change nothing: DML, DDL, ``SELECT ... INTO``, data-modifying CTEs, row-locking
clauses, ``COPY FROM``, ``CALL``, ``DO``, ``NOTIFY``/``LISTEN``, maintenance commands and
anything unrecognised all write. Function calls are *not* judged here: ``functions`` lists
them so that the routing policy can apply its allow-list (``nextval`` in a SELECT is a write
only by that policy). ``session_state`` marks commands whose effect outlives the statement in
the session (SET, PREPARE, DECLARE, LISTEN, temporary tables, ...): a router must keep such a
session on one backend or replay them.

``classify`` accepts raw text too, but expects normalized text (comments dropped, keywords
lower-cased, literals as ``$n``); it never raises.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from enum import StrEnum

import sqlglot
from sqlglot import exp

__all__ = ["Shape", "StatementKind", "classify"]

# sqlglot logs a warning for every statement it falls back to parsing as a "Command"; at one
# parse per shape that is still noise in our logs, and we report such statements ourselves.
logging.getLogger("sqlglot").setLevel(logging.ERROR)


class StatementKind(StrEnum):
    SELECT = "select"  # also VALUES, TABLE, set operations
    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"
    MERGE = "merge"
    DDL = "ddl"  # CREATE, ALTER, DROP, TRUNCATE, COMMENT, GRANT, REVOKE, ...
    UTILITY = "utility"  # VACUUM, ANALYZE, LISTEN, PREPARE, DECLARE, FETCH, DO, LOCK, ...
    TRANSACTION = "transaction"  # BEGIN, COMMIT, ROLLBACK, SAVEPOINT, SET TRANSACTION, ...
    COPY = "copy"
    SET = "set"  # SET, RESET
    SHOW = "show"
    EXPLAIN = "explain"
    CALL = "call"
    OTHER = "other"  # empty or unrecognised


@dataclass(frozen=True, slots=True)
class Shape:
    """What a statement shape is. Cached by fingerprint: holds nothing per execution."""

    kind: StatementKind
    command: str  # the leading keyword, lower-cased ("select", "with", "listen", ...)
    tables: tuple[str, ...] = ()  # sorted, unique; "schema.table" when written so; no quotes
    functions: tuple[str, ...] = ()  # sorted, unique; "schema.func" when written so
    locking: str | None = None  # "for update", "for no key update", "for share", "for key share"
    has_limit: bool = False  # the outermost query has LIMIT (not LIMIT ALL) or FETCH FIRST
    has_offset: bool = False  # some query level has OFFSET
    writes: bool = True  # not provably read-only (see the module docstring)
    has_into: bool = False  # SELECT ... INTO
    modifying_cte: bool = False  # WITH x AS (INSERT/UPDATE/DELETE/MERGE ...)
    transaction_op: str | None = None  # see _TRANSACTION_OPS
    read_only_txn: bool = False  # BEGIN / START TRANSACTION / SET TRANSACTION ... READ ONLY
    session_state: bool = False  # leaves state in the session beyond the statement
    parsed: bool = True  # False: a conservative guess from keywords (sqlglot failed)


_K = StatementKind

# transaction_op values: begin, commit, rollback, savepoint, release, rollback_to, prepare
# (PREPARE TRANSACTION), commit_prepared, rollback_prepared, set_transaction.
_TRANSACTION_WORDS = frozenset(
    {"begin", "start", "commit", "end", "rollback", "abort", "savepoint", "release"}
)
_DDL_WORDS = frozenset(
    {
        "create",
        "alter",
        "drop",
        "truncate",
        "comment",
        "grant",
        "revoke",
        "security",
        "reassign",
        "import",
    }
)
_MAINTENANCE_WORDS = frozenset(
    {"vacuum", "analyze", "analyse", "cluster", "reindex", "checkpoint", "lock", "refresh", "load"}
)
_QUERY_KINDS = {
    "select": _K.SELECT,
    "with": _K.SELECT,
    "values": _K.SELECT,
    "table": _K.SELECT,
    "insert": _K.INSERT,
    "update": _K.UPDATE,
    "delete": _K.DELETE,
    "merge": _K.MERGE,
}
_WRITE_KINDS = frozenset({_K.INSERT, _K.UPDATE, _K.DELETE, _K.MERGE, _K.DDL})

_WORD_RE = re.compile(r"[a-z_]+")
_LEADING_WORD_RE = re.compile(r"[\s(]*([a-z_]+)")
_READ_ONLY_RE = re.compile(r"\bread\s+only\b")
_PARAM_TIGHT_RE = re.compile(r"(\$[0-9]+)(?=[^\s\w])")
_EXPLAIN_RE = re.compile(
    r"explain\s*(?:\((?P<opts>[^()]*)\)|(?P<words>(?:(?:analy[sz]e|verbose)\b\s*)*))\s*"
)
_COPY_TABLE_RE = re.compile(
    r'copy\s+(?:only\s+)?(?P<table>(?:"[^"]*"|[\w$]+)(?:\.(?:"[^"]*"|[\w$]+))?)'
    r"\s*(?:\([^()]*\)\s*)?(?P<dir>from|to)\b"
)
_TO_STDOUT_RE = re.compile(r"\bto\s+stdout\b")
_CALL_RE = re.compile(r'call\s+(?P<name>(?:"[^"]*"|[\w$]+)(?:\.(?:"[^"]*"|[\w$]+))?)')
_AS_RE = re.compile(r"\bas\b\s*")
_CURSOR_FOR_RE = re.compile(r"\bcursor\b.*?\bfor\b\s*", re.DOTALL)
_TEMP_RE = re.compile(r"^create\s+(?:or\s+replace\s+)?(?:(?:global|local)\s+)?temp(?:orary)?\b")

# The keyword fallback, for statements sqlglot could not parse.
_FALLBACK_FUNC_RE = re.compile(r'((?:"[^"]*"|[a-z_][\w$]*)(?:\.(?:"[^"]*"|[a-z_][\w$]*))?)\s*\(')
_FALLBACK_TABLE_RE = re.compile(
    r'\b(?:from|join|into|update|table)\s+(?:only\s+)?((?:"[^"]*"|[a-z_][\w$]*)'
    r'(?:\.(?:"[^"]*"|[a-z_][\w$]*))?)'
)
_FALLBACK_LOCK_RE = re.compile(r"\bfor\s+(no\s+key\s+update|key\s+share|update|share)\b")
_FALLBACK_LIMIT_RE = re.compile(r"\blimit\s+(?!all\b)|\bfetch\s+(?:first|next)\b")
_FALLBACK_OFFSET_RE = re.compile(r"\boffset\b")
_FALLBACK_INTO_RE = re.compile(r"\binto\b")
_FALLBACK_DML_RE = re.compile(r"\b(?:insert|update|delete|merge)\b")
_NOT_FUNCTIONS = frozenset(
    {
        "in", "values", "exists", "any", "all", "some", "array", "over", "filter", "within",
        "using", "as", "on", "from", "where", "select", "and", "or", "not", "into", "table",
        "join", "lateral", "with", "returning", "set", "row", "cast", "conflict", "by",
        "partition", "window", "group", "order", "having", "when", "then", "else", "case",
        "is", "like", "ilike", "between", "distinct", "union", "except", "intersect", "limit",
        "offset", "update", "delete", "insert", "merge", "only", "recursive", "materialized",
        "do", "nothing", "key", "check", "unique", "primary", "references", "default",
        "constraint", "index", "include", "escape", "tablesample", "rows", "range", "groups",
        "grouping", "sets", "cube", "rollup", "overlay", "position", "substring", "trim",
        "extract", "interval", "varchar", "char", "numeric", "decimal", "timestamp", "time",
    }
)  # fmt: skip


def classify(normalized_text: str) -> Shape:
    """Classify one statement. Never raises: anything unexpected gives a conservative guess."""
    try:
        return _classify(normalized_text.strip())
    except Exception:
        return Shape(_K.OTHER, "", writes=True, parsed=False)


def _classify(text: str) -> Shape:
    low = text.lower()
    lead = _LEADING_WORD_RE.match(low)
    if lead is None:
        return Shape(_K.OTHER, "", writes=bool(low), parsed=False)
    words = _WORD_RE.findall(low, lead.start(1), lead.start(1) + 160)
    first = words[0]
    second = words[1] if len(words) > 1 else ""
    if first in _QUERY_KINDS:
        return _query(text, first)
    if first in _TRANSACTION_WORDS or (first == "prepare" and second == "transaction"):
        return _transaction(low, first, words)
    if first == "set":
        if second == "transaction":
            return Shape(
                _K.TRANSACTION,
                first,
                writes=False,
                transaction_op="set_transaction",
                read_only_txn=_READ_ONLY_RE.search(low) is not None,
            )
        return Shape(_K.SET, first, writes=False, session_state=True)
    if first == "reset":
        return Shape(_K.SET, first, writes=False, session_state=True)
    if first == "show":
        return Shape(_K.SHOW, first, writes=False)
    if first == "explain":
        return _explain(text, low)
    if first == "copy":
        return _copy(text, low)
    if first == "call":
        m = _CALL_RE.match(low)
        funcs = (_unquote(text[m.start("name") : m.end("name")]),) if m else ()
        return Shape(_K.CALL, first, functions=funcs, writes=True)
    if first in _DDL_WORDS:
        return _ddl(text, low, first)
    if first in _MAINTENANCE_WORDS:
        return Shape(_K.UTILITY, first, writes=True, parsed=True)
    if first in ("listen", "unlisten", "notify"):
        # None of them can run during recovery; LISTEN/UNLISTEN change what the session hears.
        return Shape(_K.UTILITY, first, writes=True, session_state=first != "notify")
    if first == "do":
        return Shape(_K.UTILITY, first, writes=True)
    if first == "prepare":  # PREPARE name [(types)] AS statement
        m = _AS_RE.search(low)
        inner = _classify(text[m.end() :]) if m else None
        return _wrapping(_K.UTILITY, first, inner, session_state=True)
    if first == "execute":
        return Shape(_K.UTILITY, first, writes=True)
    if first == "deallocate":
        return Shape(_K.UTILITY, first, writes=False, session_state=True)
    if first == "declare":  # DECLARE name [options] CURSOR [WITH HOLD] FOR query
        m = _CURSOR_FOR_RE.search(low)
        inner = _classify(text[m.end() :]) if m else None
        return _wrapping(_K.UTILITY, first, inner, session_state=True)
    if first in ("fetch", "move"):
        return Shape(_K.UTILITY, first, writes=False)
    if first == "close":
        return Shape(_K.UTILITY, first, writes=False, session_state=True)
    if first == "discard":
        return Shape(_K.UTILITY, first, writes=False, session_state=True)
    return Shape(_K.OTHER, first, writes=True, parsed=False)


def _transaction(low: str, first: str, words: list[str]) -> Shape:
    second = words[1] if len(words) > 1 else ""
    op: str | None
    if first == "begin" or (first == "start" and second == "transaction"):
        op = "begin"
    elif first in ("commit", "end"):
        op = "commit_prepared" if second == "prepared" else "commit"
    elif first in ("rollback", "abort"):
        if second == "prepared":
            op = "rollback_prepared"
        elif second == "to" or (second in ("work", "transaction") and "to" in words[2:3]):
            op = "rollback_to"
        else:
            op = "rollback"
    elif first == "savepoint":
        op = "savepoint"
    elif first == "release":
        op = "release"
    elif first == "prepare":
        op = "prepare"
    else:  # "start" without "transaction"
        return Shape(_K.OTHER, first, writes=True, parsed=False)
    read_only = op == "begin" and _READ_ONLY_RE.search(low) is not None
    return Shape(_K.TRANSACTION, first, writes=False, transaction_op=op, read_only_txn=read_only)


def _wrapping(
    kind: StatementKind, command: str, inner: Shape | None, *, session_state: bool = False
) -> Shape:
    """A command that carries another statement (PREPARE, DECLARE, EXPLAIN)."""
    if inner is None:
        return Shape(kind, command, writes=True, session_state=session_state, parsed=False)
    return Shape(
        kind,
        command,
        tables=inner.tables,
        functions=inner.functions,
        locking=inner.locking,
        has_limit=inner.has_limit,
        has_offset=inner.has_offset,
        writes=inner.writes,
        has_into=inner.has_into,
        modifying_cte=inner.modifying_cte,
        session_state=session_state,
        parsed=inner.parsed,
    )


def _explain(text: str, low: str) -> Shape:
    m = _EXPLAIN_RE.match(low)
    if m is None:
        return Shape(_K.EXPLAIN, "explain", writes=True, parsed=False)
    opts = m.group("opts") or m.group("words") or ""
    analyze = "analy" in opts  # EXPLAIN ANALYZE runs the statement
    inner = _classify(text[m.end() :])
    shape = _wrapping(_K.EXPLAIN, "explain", inner)
    if not analyze and shape.writes:
        return _replace_writes(shape, False)  # only planned, not run
    return shape


def _replace_writes(shape: Shape, writes: bool) -> Shape:
    return Shape(
        shape.kind,
        shape.command,
        shape.tables,
        shape.functions,
        shape.locking,
        shape.has_limit,
        shape.has_offset,
        writes,
        shape.has_into,
        shape.modifying_cte,
        shape.transaction_op,
        shape.read_only_txn,
        shape.session_state,
        shape.parsed,
    )


def _copy(text: str, low: str) -> Shape:
    rest = low[4:].lstrip()
    if rest.startswith("("):  # COPY (query) TO ...
        start = low.index("(")
        depth = 0
        for i in range(start, len(low)):
            c = low[i]
            if c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
                if depth == 0:
                    inner = _classify(text[start + 1 : i])
                    to_stdout = _TO_STDOUT_RE.search(low, i) is not None
                    shape = _wrapping(_K.COPY, "copy", inner)
                    return _replace_writes(shape, shape.writes or not to_stdout)
        return Shape(_K.COPY, "copy", writes=True, parsed=False)
    m = _COPY_TABLE_RE.match(low)
    if m is None:
        return Shape(_K.COPY, "copy", writes=True, parsed=False)
    table = _unquote(text[m.start("table") : m.end("table")])
    writes = m.group("dir") == "from" or _TO_STDOUT_RE.match(low, m.start("dir")) is None
    return Shape(_K.COPY, "copy", tables=(table,), writes=writes)


def _ddl(text: str, low: str, first: str) -> Shape:
    temp = first == "create" and _TEMP_RE.match(low) is not None
    tree = _parse(text)
    if tree is None or not isinstance(
        tree, (exp.Create, exp.Drop, exp.Alter, exp.TruncateTable, exp.Command)
    ):
        return Shape(_K.DDL, first, writes=True, session_state=temp, parsed=False)
    if isinstance(tree, exp.Command):
        return Shape(_K.DDL, first, writes=True, session_state=temp, parsed=False)
    return Shape(
        _K.DDL,
        first,
        tables=_tables(tree),
        functions=_functions(tree, _glot_text(text)),
        writes=True,
        session_state=temp,
    )


# --------------------------------------------------------------------------------------------
# sqlglot


def _glot_text(text: str) -> str:
    # sqlglot's tokenizer reads `$1||$2` as a dollar-quoted string: keep a space after `$n`.
    return _PARAM_TIGHT_RE.sub(r"\1 ", text) if "$" in text else text


def _parse(text: str) -> exp.Expr | None:
    try:
        trees = sqlglot.parse(_glot_text(text), read="postgres")
    except Exception:  # sqlglot's ParseError/TokenError, and RecursionError on deep nesting
        return None
    if len(trees) != 1 or trees[0] is None:
        return None
    tree: exp.Expr = trees[0]
    return tree


def _query(text: str, first: str) -> Shape:
    tree = _parse(text)
    if tree is None or isinstance(tree, exp.Command):
        return _fallback(text, first)
    root = tree
    while isinstance(root, (exp.Subquery, exp.Paren)) and isinstance(root.this, exp.Expr):
        root = root.this
    if isinstance(root, (exp.Select, exp.SetOperation, exp.Values)):
        kind = _K.SELECT
    elif isinstance(root, exp.Insert):
        kind = _K.INSERT
    elif isinstance(root, exp.Update):
        kind = _K.UPDATE
    elif isinstance(root, exp.Delete):
        kind = _K.DELETE
    elif isinstance(root, exp.Merge):
        kind = _K.MERGE
    else:
        return _fallback(text, first)

    locks = [_lock_name(lock) for lock in tree.find_all(exp.Lock)]
    locking = min(locks, key=_LOCK_STRENGTH.index) if locks else None
    limit = root.args.get("limit") if kind is _K.SELECT else None
    has_limit = limit is not None and not (
        isinstance(limit, exp.Limit)
        and isinstance(limit.expression, exp.Var)
        and limit.expression.name.lower() == "all"
    )
    has_offset = next(tree.find_all(exp.Offset), None) is not None
    has_into = kind is _K.SELECT and next(tree.find_all(exp.Into), None) is not None
    modifying_cte = any(
        isinstance(cte.this, (exp.Insert, exp.Update, exp.Delete, exp.Merge))
        for cte in tree.find_all(exp.CTE)
    )
    writes = kind in _WRITE_KINDS or has_into or modifying_cte or locking is not None
    return Shape(
        kind,
        first,
        tables=_tables(tree),
        functions=_functions(tree, _glot_text(text)),
        locking=locking,
        has_limit=has_limit,
        has_offset=has_offset,
        writes=writes,
        has_into=has_into,
        modifying_cte=modifying_cte,
    )


_LOCK_STRENGTH = ["for update", "for no key update", "for share", "for key share"]


def _lock_name(lock: exp.Lock) -> str:
    update = bool(lock.args.get("update"))
    key = bool(lock.args.get("key"))
    if update:
        return "for no key update" if key else "for update"
    return "for key share" if key else "for share"


def _tables(tree: exp.Expr) -> tuple[str, ...]:
    ctes = {cte.alias_or_name for cte in tree.find_all(exp.CTE)}
    names = set()
    for table in tree.find_all(exp.Table):
        if not isinstance(table.this, exp.Identifier):
            continue  # a table function such as generate_series(...)
        name = table.name
        if not table.db and name in ctes:
            continue
        names.add(".".join(p for p in (table.catalog, table.db, name) if p))
    return tuple(sorted(names))


def _functions(tree: exp.Expr, glot_text: str) -> tuple[str, ...]:
    names = set()
    for func in tree.find_all(exp.Func):
        meta = func.meta
        if isinstance(func, exp.Anonymous):
            name = func.name
        elif "start" in meta and "end" in meta:
            # sqlglot maps many functions to its own nodes (now() -> CurrentTimestamp); the
            # token positions give back the name as written.
            name = _unquote(glot_text[meta["start"] : meta["end"] + 1])
        else:
            continue  # syntax rather than a call: CAST, ARRAY[...], EXTRACT(... FROM ...)
        if not name:
            continue
        parent = func.parent
        if isinstance(parent, exp.Dot) and parent.expression is func:
            qualifier = _dotted(parent.this)
            if qualifier:
                name = f"{qualifier}.{name}"
        names.add(name)
    return tuple(sorted(names))


def _dotted(node: exp.Expr | None) -> str:
    if isinstance(node, exp.Identifier):
        return node.name
    if isinstance(node, exp.Dot):
        left, right = _dotted(node.this), _dotted(node.expression)
        return f"{left}.{right}" if left and right else ""
    if isinstance(node, exp.Column):
        return ".".join(p for p in (node.table, node.name) if p)
    return ""


def _unquote(name: str) -> str:
    """`"MyFunc"` -> `MyFunc`; `s."T"` -> `s.T`; unquoted parts are lower-cased."""
    if '"' not in name:
        return name.lower()
    parts = re.findall(r'"((?:[^"]|"")*)"|([^."]+)', name)
    return ".".join(q.replace('""', '"') if q else u.lower() for q, u in parts)


def _fallback(text: str, first: str) -> Shape:
    """Keywords only: sqlglot could not parse the statement. Errs towards `writes`."""
    low = text.lower()
    kind = _QUERY_KINDS.get(first, _K.OTHER)
    lock = _FALLBACK_LOCK_RE.search(low)
    locking = f"for {' '.join(lock.group(1).split())}" if lock else None
    has_into = kind is _K.SELECT and first == "select" and _FALLBACK_INTO_RE.search(low) is not None
    modifying_cte = first == "with" and _FALLBACK_DML_RE.search(low) is not None
    functions = {
        _unquote(text[m.start(1) : m.end(1)])
        for m in _FALLBACK_FUNC_RE.finditer(low)
        if m.group(1) not in _NOT_FUNCTIONS
    }
    tables = {
        _unquote(text[m.start(1) : m.end(1)])
        for m in _FALLBACK_TABLE_RE.finditer(low)
        if m.group(1) not in _NOT_FUNCTIONS
    }
    writes = kind is not _K.SELECT or has_into or modifying_cte or locking is not None
    return Shape(
        kind,
        first,
        tables=tuple(sorted(tables)),
        functions=tuple(sorted(functions)),
        locking=locking,
        has_limit=_FALLBACK_LIMIT_RE.search(low) is not None,
        has_offset=_FALLBACK_OFFSET_RE.search(low) is not None,
        writes=writes,
        has_into=has_into,
        modifying_cte=modifying_cte,
        parsed=False,
    )
