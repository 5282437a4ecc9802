"""Where one routing unit may run: a pure decision, no I/O.

A *unit* is what the proxy routes as a whole: one simple-protocol Query (which may hold several
statements), or the extended-protocol messages from the first after a Sync up to the next Sync.
The decision only says whether a replica is *allowed*; which replica, and whether one is fresh
enough for the session's read-your-writes horizon, is the balancer's business.

The rule is the one users lose data to when it is wrong (see DESIGN.md, "Correctness of
routing"): a unit goes to a replica only when every statement in it is *provably* read-only —
SELECT / VALUES / TABLE / SHOW / EXPLAIN without ANALYZE of a write, no locking clause, no
``INTO``, no data-modifying CTE, no volatile function that is not allow-listed, and sqlglot
parsed it. Anything unknown goes to the primary.

Some statements leave state in the server session that a replica connection would not have:
temporary tables, LISTEN, session-level advisory locks, SQL-level PREPARE, cursors declared WITH
HOLD, ``set_config(..., false)``. Those *pin* the session to the primary for good. Plain SET /
RESET run on the primary and the session replays them on its replica connections (not a pin).

Transaction blocks stay on one backend: on the primary, except one opened READ ONLY (and not
SERIALIZABLE, which a hot standby refuses), which may run wholly on one replica.

Hints in comments override for one unit: ``/* sqlproxy:primary */`` always wins;
``/* sqlproxy:replica */`` waives the function-volatility check (for functions the user knows
to be read-only), never the others — a write is never sent to a replica on purpose.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from sqlproxy.analysis.classify import Shape, StatementKind

__all__ = [
    "DEFAULT_READ_ONLY_FUNCTIONS",
    "PIN_FUNCTIONS",
    "PRIMARY_IDENTITY_FUNCTIONS",
    "Decision",
    "FunctionPolicy",
    "RoutedStatement",
    "SessionView",
    "Target",
    "decide",
    "pin_reason",
]


class Target(StrEnum):
    PRIMARY = "primary"
    REPLICA = "replica"


#: Volatile functions that are harmless on a replica: they read nothing a standby lacks and
#: write nothing. Extended by ``routing.read_only_functions``.
DEFAULT_READ_ONLY_FUNCTIONS: frozenset[str] = frozenset(
    {
        "random",
        "random_normal",
        "clock_timestamp",
        "statement_timestamp",
        "timeofday",
        "gen_random_uuid",
        "uuid_generate_v1",
        "uuid_generate_v1mc",
        "uuid_generate_v4",
        "pg_sleep",
        "pg_sleep_for",
        "pg_sleep_until",
        "pg_is_in_recovery",
        "pg_last_wal_replay_lsn",
        "pg_last_wal_receive_lsn",
        "pg_last_xact_replay_timestamp",
        "version",
    }
)

#: Functions that name the server backend itself. The client's driver reports the primary's
#: backend PID (BackendKeyData), so these run there to agree with it; not a pin, and a
#: ``/* sqlproxy:replica */`` hint sends them to a replica on purpose.
PRIMARY_IDENTITY_FUNCTIONS: frozenset[str] = frozenset({"pg_backend_pid"})

#: Functions whose effect outlives the statement in the server session: they pin it.
PIN_FUNCTIONS: frozenset[str] = frozenset(
    {
        "pg_advisory_lock",
        "pg_advisory_lock_shared",
        "pg_try_advisory_lock",
        "pg_try_advisory_lock_shared",
        "set_config",
        "dblink_connect",
        "dblink_connect_u",
        "lo_open",
    }
)


def _base(name: str) -> str:
    return name.rsplit(".", 1)[-1]


class FunctionPolicy:
    """Which functions may run on a replica.

    ``volatility`` maps a function name (``name`` and ``schema.name``) to its ``pg_proc``
    ``provolatile`` ('i' immutable, 's' stable, 'v' volatile; the worst over overloads). A name
    it does not hold is treated as volatile: an unknown function may be a writing plpgsql one.
    ``write_functions`` from the config always count as writes, even allow-listed or hinted.
    """

    __slots__ = ("read_only_functions", "volatility", "write_functions")

    def __init__(
        self,
        read_only_functions: Iterable[str] = (),
        write_functions: Iterable[str] = (),
        volatility: Mapping[str, str] | None = None,
    ) -> None:
        self.read_only_functions = DEFAULT_READ_ONLY_FUNCTIONS | {
            f.lower() for f in read_only_functions
        }
        self.write_functions = frozenset(f.lower() for f in write_functions)
        self.volatility: Mapping[str, str] = volatility if volatility is not None else {}

    def is_write(self, name: str) -> bool:
        """Listed as a write in the config (checked before any allow-list or hint)."""
        return name in self.write_functions or _base(name) in self.write_functions

    def is_read_only(self, name: str) -> bool:
        if self.is_write(name):
            return False
        if name in self.read_only_functions or _base(name) in self.read_only_functions:
            return True
        vol = self.volatility.get(name)
        if vol is None and "." in name:
            vol = self.volatility.get(_base(name))
        return vol in ("i", "s")

    def known(self, name: str) -> bool:
        return (
            name in self.volatility
            or _base(name) in self.volatility
            or name in self.read_only_functions
            or _base(name) in self.read_only_functions
            or self.is_write(name)
        )


@dataclass(frozen=True, slots=True)
class RoutedStatement:
    """One statement of a unit, as the policy sees it."""

    text: str  # normalized text (lower-cased keywords, literals as $n)
    shape: Shape
    hints: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class SessionView:
    """What the policy needs to know about the session."""

    pinned: bool = False  # bound to the primary for good
    in_transaction: bool = False  # a transaction block is open
    transaction_on_replica: bool = False  # ... and it is a READ ONLY one on a replica
    replicas_usable: bool = True  # False: no replica could serve this session at all


@dataclass(frozen=True, slots=True)
class Decision:
    target: Target
    reason: str
    pin: bool = False  # pin the session to the primary from now on
    writes: bool = False  # may change data: starts the read-your-writes horizon
    read_only_transaction: bool = False  # opens a READ ONLY transaction block on a replica


_K = StatementKind
_NEUTRAL_TX_OPS = frozenset({"commit", "rollback", "set_transaction"})


def pin_reason(st: RoutedStatement) -> str | None:
    """Why this statement pins its session to its server connection, or None."""
    shape = st.shape
    cmd = shape.command
    if cmd == "listen":
        return "listen"
    if cmd == "prepare" and shape.kind is _K.UTILITY:
        return "sql prepare"
    if cmd == "declare" and " with hold " in f" {st.text} ":
        return "cursor with hold"
    if shape.kind is _K.DDL and shape.session_state:
        return "temporary table"
    if shape.has_into and (" temp " in f" {st.text} " or " temporary " in f" {st.text} "):
        return "temporary table"
    for f in shape.functions:
        if _base(f) in PIN_FUNCTIONS:
            return f"function {f}"
    return None


def _statement(st: RoutedStatement, functions: FunctionPolicy) -> tuple[bool, str, bool]:
    """(read-only, reason, changes data) for one statement."""
    shape = st.shape
    kind = shape.kind
    if kind is _K.TRANSACTION:
        op = shape.transaction_op
        if op == "begin":
            if shape.read_only_txn and "serializable" not in st.text:
                return True, "read-only transaction", False
            return False, "transaction block", False  # its statements say if it writes
        if op in _NEUTRAL_TX_OPS:
            return True, "transaction control", False
        return False, f"transaction {op}", False
    if kind is _K.SET:
        return False, "session setting", False
    if not shape.parsed:
        return False, "not parsed", True
    if kind not in (_K.SELECT, _K.SHOW, _K.EXPLAIN):
        return False, kind.value, True
    if shape.locking is not None:
        return False, shape.locking, True
    if shape.has_into:
        return False, "select into", True
    if shape.modifying_cte:
        return False, "data-modifying cte", True
    if shape.writes:
        return False, "writes", True
    hinted = "replica" in st.hints
    for f in shape.functions:
        if functions.is_write(f):
            return False, f"write function {f}", True
        if not hinted and _base(f) in PRIMARY_IDENTITY_FUNCTIONS:
            return False, f"{f}: the client's backend is the primary's", False
        if not hinted and not functions.is_read_only(f):
            return False, f"volatile function {f}", True
    return True, "read-only", False


def decide(
    statements: Sequence[RoutedStatement], session: SessionView, functions: FunctionPolicy
) -> Decision:
    """Where a unit may run (see the module docstring)."""
    pin_why = None
    for st in statements:
        pin_why = pin_reason(st)
        if pin_why is not None:
            break
    writes = False
    read_only = True
    ro_txn = False
    reason = "read-only"
    for st in statements:
        ok, why, changes = _statement(st, functions)
        writes = writes or changes
        if not ok and read_only:
            read_only = False
            reason = why
        if ok and why == "read-only transaction":
            ro_txn = True
    if pin_why is not None:
        return Decision(Target.PRIMARY, f"pinned: {pin_why}", pin=True, writes=True)
    if session.pinned:
        return Decision(Target.PRIMARY, "session pinned", writes=writes)
    if session.in_transaction:
        if session.transaction_on_replica:
            return Decision(Target.REPLICA, "read-only transaction", writes=False)
        return Decision(Target.PRIMARY, "transaction block", writes=writes)
    if any("primary" in st.hints for st in statements):
        return Decision(Target.PRIMARY, "hint", writes=writes)
    if not statements:
        return Decision(Target.PRIMARY, "no statement")
    if not read_only:
        return Decision(Target.PRIMARY, reason, writes=writes)
    if not session.replicas_usable:
        return Decision(Target.PRIMARY, "no usable replica")
    if ro_txn:
        return Decision(Target.REPLICA, "read-only transaction", read_only_transaction=True)
    return Decision(Target.REPLICA, "read-only")
