"""The per-connection pattern detector: N+1 bursts, repeated queries, row-by-row writes and
commits, unbounded results, deep OFFSET.

Each client connection gets one ``ConnectionDetector``, fed by the profiler with every completed
execution. What it looks at is the connection's *burst*: statements separated by less than
``burst_gap_ms`` of idle time (the time between one statement's end and the next one's start),
the shape an ORM loop leaves on the wire. Per execution the work is O(1) — a dict lookup for the
fingerprint's run in the current burst, a few counters, one hash for the values — and nothing is
judged until the burst ends (the next execution comes after a gap, the connection closes, a
reader asks and the connection has been idle long enough, or the burst grows past
``MAX_BURST``). Then each fingerprint repeated at least ``n_plus_one_threshold`` times is
examined once:

- a SELECT run with that many *different* values is an N+1. Its parent is the statement
  executed just before the run's first execution, if that one returned at least as many rows
  as the run has different values. When that previous statement is itself repeated in the
  burst, the run is part of a loop body (for each team: players, then coach) and the parent is
  looked for before *that* run's start, recursively: the interleaved form. Runs of one loop
  whose executions overlap are reported as interleaved with each other.
- a SELECT run where one set of values recurs that many times is a repeated identical query,
  unless the connection wrote something between two of its executions (then the results may
  well differ: a count after each insert is not a caching opportunity).
- single-row INSERT/UPDATE/DELETE/MERGE executions that each paid their own round trip are
  row-by-row writes. A write that shared its round trip with others of its kind (executemany,
  a pipeline, several statements in one Query message) is a batch, not a row-by-row write:
  it counts once per round trip. When each counted write was its own transaction — alone
  between BEGIN and COMMIT, or in autocommit — the run is also a commit per row.

A run must also be dense: on average at most ``LOOP_BODY_MAX`` statements from one of its
executions to the next. A loop leaves its body's statements close together; a connection that
is simply busy (a pooled connection serving request after request with no idle gap) repeats
its common lookups now and then among many others, and that is not a loop.

Unbounded results and deep OFFSETs need no burst: a single execution is the finding.

Requests (tags.py): statements whose comments carry a ``traceparent`` are judged per trace id
instead — one request is one burst, whatever the idle gaps in it and however many requests take
turns on a pooled connection. Each open trace has a detector of its own (``Traces``), with no
gap (``gap`` is infinite), judged once the trace has been idle for ``analysis.trace_idle_ms``
(or when too many are open). The connection's untagged statements in between (the BEGIN and
COMMIT a driver sends by itself) belong to the request the connection was last lent to, until
a burst gap passes: ``ConnectionDetector.lent``, one field read per untagged statement.
Statements with tags but no trace id stay on the connection's detector, whose burst also ends
where the endpoint changes. Findings carry the endpoint (route, controller, action) and the
trace id as an example.

The transaction state comes from the statements themselves (BEGIN … COMMIT/ROLLBACK), which
also covers a multi-statement Query whose ReadyForQuery comes only at its end. The "own round
trip" test asks the session's conversation whether a Sync follows the Execute (when the
context has one; else it relies on timing: a pipelined statement starts exactly when the
previous one ends).

Memory per connection is bounded: at most ``MAX_RUNS`` fingerprints per burst and
``MAX_DIGESTS`` value digests per burst are tracked; beyond that, counts are still kept but
distinct values are under-counted, which can only hide findings, never invent them.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Final

from sqlproxy.analysis.findings import (
    COMMIT_PER_ROW,
    DEEP_OFFSET,
    N_PLUS_ONE,
    REPEATED_QUERY,
    ROW_BY_ROW_WRITE,
    UNBOUNDED_RESULT,
    FindingsStore,
    suggest,
)
from sqlproxy.analysis.statement import (
    KIND_READ,
    KIND_TRANSACTION,
    KIND_WRITE,
    SessionInfo,
    Statement,
)
from sqlproxy.config import AnalysisSection

__all__ = [
    "MAX_BURST",
    "MAX_TRACES",
    "ConnectionDetector",
    "PatternDetector",
    "Thresholds",
    "Traces",
    "thresholds_for",
]

MAX_RUNS: Final = 256  # distinct fingerprints tracked per burst
# Distinct (fingerprint, values) tracked per burst: far more than any threshold needs, and
# small, because these sets are touched at random on every execution. At 8192 per connection
# (the earlier bound), eight busy connections kept ~10 MB of keys and tables in play, well
# beyond the CPU caches.
MAX_DIGESTS: Final = 512
MAX_BURST: Final = 10_000  # statements: a longer burst is judged and a new one begun
_MAX_CHAIN: Final = 32  # loop bodies followed when looking for an interleaved run's parent
LOOP_BODY_MAX: Final = 16  # statements per loop iteration: a sparser repetition is no loop
MAX_TRACES: Final = 1000  # requests (trace ids) judged at once; the oldest is judged beyond
_NEVER: Final = float("inf")

_EXECUTE: Final = 2  # sqlproxy.wire.requests.EXECUTE (the wire layer is not imported here)


class Thresholds:
    """The thresholds in force for one application_name."""

    __slots__ = ("deep_offset", "gap", "large_rows", "repeats")

    def __init__(self, gap_ms: float, repeats: int, large_rows: int, deep_offset: int) -> None:
        self.gap = gap_ms / 1000.0  # seconds, as the timestamps
        self.repeats = repeats
        self.large_rows = large_rows
        self.deep_offset = deep_offset


def thresholds_for(config: AnalysisSection, application: str) -> Thresholds:
    """Global thresholds, overridden by ``[analysis.applications."<name>"]`` where set."""
    app = config.applications.get(application)

    def pick(name: str) -> Any:
        value = getattr(app, name) if app is not None else None
        return getattr(config, name) if value is None else value

    return Thresholds(pick("burst_gap_ms"), pick("n_plus_one_threshold"),
                      pick("large_result_rows"), pick("deep_offset"))


class Run:
    """One fingerprint's executions in the current burst."""

    __slots__ = (
        "commit_seconds",
        "commits",
        "count",
        "digests",
        "epoch",
        "first",
        "fp",
        "last",
        "max_same",
        "mixed",
        "prev",
        "prev_rows",
        "repeated",
        "seconds",
        "stmt",
        "trip",
        "write_seconds",
        "writes",
    )

    def __init__(self, stmt: Statement, fp: str, prev: Statement | None, prev_rows: int,
                 position: int) -> None:
        self.stmt = stmt
        self.fp = fp
        self.count = 0
        self.seconds = 0.0
        # The values (see Statement.key) executed so far, and how often those seen more than
        # once were: one set insertion per execution in the common case of new values.
        self.digests: set[object] = set()
        self.repeated: dict[object, int] = {}
        self.max_same = 0
        self.epoch = -1  # the connection's write epoch at the last execution
        self.mixed = False  # a write ran between two executions: results may differ
        self.prev = prev  # the statement executed just before the first of this run
        self.prev_rows = prev_rows
        self.first = position  # positions in the burst, to tell interleaved runs
        self.last = position
        self.writes = 0  # single-row writes, at most one per round trip
        self.write_seconds = 0.0
        self.commits = 0  # ... of which each was its own transaction
        self.commit_seconds = 0.0  # their time, with their COMMITs
        self.trip = -1  # the round trip of the last counted write


class ConnectionDetector:
    """Watches one connection (see the module docstring)."""

    __slots__ = (
        "action",
        "application",
        "block",
        "connection_id",
        "controller",
        "database",
        "deep_offset",
        "endpoint",
        "epoch",
        "findings",
        "gap",
        "large_rows",
        "last_end",
        "last_run",
        "lent",
        "position",
        "prev",
        "prev_rows",
        "repeats",
        "route",
        "runs",
        "trace_id",
        "tracked",
        "trip",
        "tx_statements",
        "tx_write",
        "tx_write_seconds",
        "wall_offset",
    )

    def __init__(self, findings: FindingsStore, thresholds: Thresholds, application: str,
                 database: str, connection_id: int, wall_offset: float) -> None:
        self.findings = findings
        self.application = application
        self.database = database
        self.connection_id = connection_id
        self.wall_offset = wall_offset  # perf_counter -> wall clock
        self.gap = 0.0
        self.repeats = 0
        self.large_rows = 0
        self.deep_offset = 0
        self.apply(thresholds)
        self.runs: dict[str, Run] = {}
        # The run observed last (most bursts repeat one statement): found without a lookup.
        # Forgotten with the runs (``forget_runs``).
        self.last_run: Run | None = None
        self.position = 0  # executions in the current burst
        self.tracked = 0  # value digests held in the current burst
        self.last_end = float("-inf")
        self.epoch = 0  # writes seen
        self.trip = 0  # round trips seen (a statement that did not start pipelined)
        self.prev: Statement | None = None  # last SELECT/DML executed, and its rows
        self.prev_rows = 0
        self.block = False  # inside BEGIN … COMMIT
        self.tx_statements = 0
        self.tx_write: Run | None = None
        self.tx_write_seconds = 0.0
        # Where the statements come from, when their tags said so (see tags.py).
        self.endpoint = ""
        self.route = ""
        self.controller = ""
        self.action = ""
        self.trace_id = ""  # a request's own detector (Traces): its trace id
        # The request (trace detector) this connection last served: its untagged statements
        # within a burst gap belong to it.
        self.lent: ConnectionDetector | None = None

    def apply(self, t: Thresholds) -> None:
        self.gap = t.gap
        self.repeats = t.repeats
        self.large_rows = t.large_rows
        self.deep_offset = t.deep_offset

    # ------------------------------------------------------------------ hot path
    def observe(self, stmt: Statement, bind: bytes, raw: object, rows: int, failed: bool,
                started: float, ended: float, ctx: SessionInfo | None = None) -> None:
        """One completed execution. ``bind`` holds its Bind parameter values (empty for the
        simple protocol); ``raw`` tells its literals apart when they are its own rather than
        ``stmt``'s (a text matched by its skeleton: the text, or the one literal of a text
        whose skeleton is the same as the last one's, an int for an integer:
        ``skeleton_literal``), else ""; ``ctx`` the session, asked about Syncs for writes
        only."""
        lent = self.lent
        if lent is not None:
            if started - lent.last_end < self.gap:
                lent.observe(stmt, bind, raw, rows, failed, started, ended, ctx)
                return
            self.lent = None
            self.block = lent.block  # the connection's transaction state went on there
        last = self.last_end
        if started - last >= self.gap or self.position >= MAX_BURST:
            if self.runs:
                self.flush()
            self.position = 0
        if started > last:
            self.trip += 1
        self.last_end = ended
        if failed or stmt.ignored:
            return
        kind = stmt.kind
        if kind == KIND_READ:
            write = False
        elif kind == KIND_WRITE:
            write = True
        else:
            if kind == KIND_TRANSACTION:
                self._transaction(stmt.shape.transaction_op, ended - started)
            elif self.block:
                self.tx_statements += 1
            return
        self.position += 1
        fp = stmt.fingerprint
        run = self.last_run
        if run is None or run.fp is not fp:
            run = self.runs.get(fp)
            if run is None:
                if len(self.runs) >= MAX_RUNS:
                    self.prev = stmt
                    self.prev_rows = rows
                    return
                run = self.runs[fp] = Run(stmt, fp, self.prev, self.prev_rows, self.position)
            self.last_run = run
        run.count += 1
        run.last = self.position
        seconds = ended - started
        run.seconds += seconds
        if write:
            self.epoch += 1
            if self.block:
                self.tx_statements += 1
            if rows <= 1 and run.trip != self.trip and _own_round_trip(ctx):
                run.trip = self.trip
                run.writes += 1
                run.write_seconds += seconds
                if not self.block:  # autocommit: its own transaction
                    run.commits += 1
                    run.commit_seconds += seconds
                elif self.tx_statements == 1:
                    self.tx_write = run
                    self.tx_write_seconds = seconds
        else:
            if run.epoch != self.epoch:
                if run.epoch >= 0:
                    run.mixed = True
                run.epoch = self.epoch
            # What tells this execution's values apart: the bound parameters (bytes whose
            # hash Python caches), with the text's own literals when it has any.
            key: object = stmt.key
            own = isinstance(raw, int) or (isinstance(raw, str) and len(raw) > 0)
            if own:
                key = raw  # the skeleton being the same, other texts have other literals
            if len(bind) > 0:
                key = (key, bind) if stmt.literals or own else bind
            digests = run.digests
            known = len(digests)
            if self.tracked < MAX_DIGESTS:
                digests.add(key)
                if len(digests) > known:  # new values
                    self.tracked += 1
                    if run.max_same == 0:
                        run.max_same = 1
                    key = None
            elif key not in digests:
                key = None
            if key is not None:  # values seen before in this run
                same = run.repeated.get(key, 1) + 1
                run.repeated[key] = same
                if same > run.max_same:
                    run.max_same = same
            if rows > self.large_rows and not stmt.has_limit:
                self._unbounded(stmt, rows, seconds, ended)
            if self.block:
                self.tx_statements += 1
        self.prev = stmt
        self.prev_rows = rows
        offset = stmt.offset
        if offset > self.deep_offset:
            self._deep_offset(stmt, offset, rows, seconds, ended)

    def tag(self, tags: Any, started: float) -> bool:
        """A statement with tags but no trace id is about to be observed: its burst is one
        request of its endpoint, which ends at a gap or where the endpoint changes. True when
        it begins a request."""
        self.lent = None
        endpoint: str = tags.endpoint
        gap = started - self.last_end >= self.gap
        if endpoint == self.endpoint and not gap:
            return False
        if self.runs:
            self.flush()  # what ran so far belongs to the previous request
        self.position = 0
        self.set_tags(tags)
        return True

    def set_tags(self, tags: Any) -> None:
        self.endpoint = tags.endpoint
        self.route = tags.route
        self.controller = tags.controller
        self.action = tags.action

    def _transaction(self, op: str | None, seconds: float) -> None:
        if op == "begin":
            self.block = True
            self.tx_statements = 0
            self.tx_write = None
        elif op == "commit":
            run = self.tx_write
            if (
                self.block
                and run is not None
                and self.tx_statements == 1
                and self.runs.get(run.fp) is run
            ):
                run.commits += 1
                run.commit_seconds += self.tx_write_seconds + seconds
            self.block = False
            self.tx_write = None
        elif op in ("rollback", "prepare"):
            self.block = False
            self.tx_write = None

    # ------------------------------------------------------------------ single executions
    def _unbounded(self, stmt: Statement, rows: int, seconds: float, ended: float) -> None:
        n = stmt.normalized
        self.findings.add(
            UNBOUNDED_RESULT, n.fingerprint, n.text, None, None, self.application,
            self.database, 1, seconds, ended + self.wall_offset,
            example=f"{n.text}  -- {rows} rows, no LIMIT",
            suggestion=suggest(UNBOUNDED_RESULT, tables=stmt.shape.tables, rows=rows),
            statement_kind=stmt.shape.kind.value, tables=stmt.shape.tables, rows=rows,
            connection_id=self.connection_id, endpoint=self.endpoint, route=self.route,
            controller=self.controller, action=self.action, trace_id=self.trace_id,
        )

    def _deep_offset(self, stmt: Statement, offset: int, rows: int, seconds: float,
                     ended: float) -> None:
        n = stmt.normalized
        self.findings.add(
            DEEP_OFFSET, n.fingerprint, n.text, None, None, self.application, self.database,
            1, seconds, ended + self.wall_offset,
            example=f"{n.text}  -- OFFSET {offset}, {rows} rows",
            suggestion=suggest(DEEP_OFFSET, offset=offset),
            statement_kind=stmt.shape.kind.value, tables=stmt.shape.tables, rows=rows,
            offset=offset, connection_id=self.connection_id, endpoint=self.endpoint,
            route=self.route, controller=self.controller, action=self.action,
            trace_id=self.trace_id,
        )

    # ------------------------------------------------------------------ end of a burst
    def idle_since(self, now: float) -> bool:
        """True if a burst is open and ``now`` (perf_counter) is a gap after its end."""
        return bool(self.runs) and now - self.last_end >= self.gap

    def forget_runs(self) -> None:
        """No run any more (nor the value digests they held)."""
        self.runs.clear()
        self.last_run = None
        self.tracked = 0

    def flush(self) -> None:
        """The burst is over: judge its runs and begin afresh."""
        runs = self.runs
        need = self.repeats
        loops: dict[int, list[tuple[Run, Statement | None]]] = {}
        for run in runs.values():
            if run.count < need or (run.count - 1) * LOOP_BODY_MAX < run.last - run.first:
                continue
            if run.stmt.kind == KIND_READ:
                if len(run.digests) >= need:
                    head, parent = self._loop_of(run, need)
                    loops.setdefault(id(head), []).append((run, parent))
                if run.max_same >= need and not run.mixed:
                    self._report_repeated(run)
            else:
                if run.writes >= need:
                    self._report_writes(run, ROW_BY_ROW_WRITE, run.writes, run.write_seconds)
                if run.commits >= need:
                    self._report_writes(run, COMMIT_PER_ROW, run.commits, run.commit_seconds)
        for members in loops.values():
            for run, parent in members:
                partners = tuple(
                    other for other, _ in members
                    if other is not run and other.first <= run.last and run.first <= other.last
                )
                self._report_n_plus_one(run, parent, partners)
        self.forget_runs()
        # A transaction left open holds no run any more: its write cannot be counted.
        self.tx_write = None
        if not self.trace_id:  # the next burst says where it comes from itself
            self.endpoint = self.route = self.controller = self.action = ""

    def _loop_of(self, run: Run, need: int) -> tuple[Run, Statement | None]:
        """The first run of the loop ``run`` belongs to, and the loop's parent statement."""
        head = run
        for _ in range(_MAX_CHAIN):
            prev = head.prev
            if prev is None:
                return head, None
            fp = prev.fingerprint
            if fp == head.fp:
                return head, None
            before = self.runs.get(fp)
            if before is not None and before is not run and before.count >= need \
                    and before.first < head.first:
                head = before  # the previous statement is part of the loop body
                continue
            if head.prev_rows >= min(len(run.digests), run.count):
                return head, prev
            return head, None
        return head, None

    def _now(self) -> float:
        return self.last_end + self.wall_offset

    def _report_n_plus_one(self, run: Run, parent: Statement | None,
                           partners: tuple[Run, ...]) -> None:
        n = run.stmt.normalized
        shape = run.stmt.shape
        pn = parent.normalized if parent is not None else None
        body = "; ".join([n.text] + [p.stmt.normalized.text for p in partners])
        loop = f"({body})" if partners else body
        head = f"{pn.text}  -- {run.prev_rows} rows\n" if pn is not None else ""
        distinct = len(run.digests)
        more = "+" if self.tracked >= MAX_DIGESTS and distinct < run.count else ""
        example = f"{head}{run.count} x {loop}  -- {distinct}{more} different values"
        also: tuple[str, ...] = ()
        for p in partners:
            also += tuple(t for t in p.stmt.shape.tables if t not in also + shape.tables)
        self.findings.add(
            N_PLUS_ONE, n.fingerprint, n.text, pn.fingerprint if pn else None,
            pn.text if pn else None, self.application, self.database, run.count, run.seconds,
            self._now(), example=example,
            suggestion=suggest(
                N_PLUS_ONE, query=n.text, tables=shape.tables,
                parent_tables=parent.shape.tables if parent is not None else None,
                interleaved_tables=also,
            ),
            statement_kind=shape.kind.value, tables=shape.tables,
            interleaved_with=tuple(p.fp for p in partners), connection_id=self.connection_id,
            endpoint=self.endpoint, route=self.route, controller=self.controller,
            action=self.action, trace_id=self.trace_id,
        )

    def _report_repeated(self, run: Run) -> None:
        n = run.stmt.normalized
        repeats = run.max_same
        self.findings.add(
            REPEATED_QUERY, n.fingerprint, n.text, None, None, self.application, self.database,
            repeats, run.seconds * repeats / run.count, self._now(),
            example=f"{repeats} x {n.text}  -- with the same values",
            suggestion=suggest(REPEATED_QUERY, repeats=repeats),
            statement_kind=run.stmt.shape.kind.value, tables=run.stmt.shape.tables,
            connection_id=self.connection_id, endpoint=self.endpoint, route=self.route,
            controller=self.controller, action=self.action, trace_id=self.trace_id,
        )

    def _report_writes(self, run: Run, kind: str, count: int, seconds: float) -> None:
        n = run.stmt.normalized
        shape = run.stmt.shape
        what = "each in its own transaction" if kind == COMMIT_PER_ROW else "one row each"
        self.findings.add(
            kind, n.fingerprint, n.text, None, None, self.application, self.database, count,
            seconds, self._now(), example=f"{count} x {n.text}  -- {what}",
            suggestion=suggest(kind, tables=shape.tables, statement_kind=shape.kind.value),
            statement_kind=shape.kind.value, tables=shape.tables,
            connection_id=self.connection_id, endpoint=self.endpoint, route=self.route,
            controller=self.controller, action=self.action, trace_id=self.trace_id,
        )


def _own_round_trip(ctx: SessionInfo | None) -> bool:
    """Whether the write just completed on ``ctx`` ended a round trip of the client's.

    At completion the conversation has already dropped the Execute from its queue, so the
    head of the queue is what the client sent after it: a Sync (a round trip per statement),
    another Execute (a batch: executemany, a pipeline) or nothing yet (a pipeline still being
    written). For a simple Query the head is the Query itself until its ReadyForQuery.
    """
    conv: Any = ctx.conv if ctx is not None else None
    if conv is None:
        return True
    kind: int = conv.next_kind()
    return kind != 0 and kind != _EXECUTE


class Traces:
    """The detectors of the requests (trace ids) in progress, oldest first."""

    __slots__ = ("idle", "open")

    def __init__(self, idle_seconds: float) -> None:
        self.idle = idle_seconds
        self.open: OrderedDict[str, ConnectionDetector] = OrderedDict()

    def get(self, trace_id: str) -> ConnectionDetector | None:
        det = self.open.get(trace_id)
        if det is not None:
            self.open.move_to_end(trace_id)
        return det

    def add(self, trace_id: str, det: ConnectionDetector, now: float) -> None:
        """A new request: judge those that have ended (idle long enough, or too many)."""
        self.flush_idle(now)
        while len(self.open) >= MAX_TRACES:
            _, old = self.open.popitem(last=False)
            _close(old)
        self.open[trace_id] = det

    def flush_idle(self, now: float) -> None:
        """Judge the requests idle for ``idle`` seconds (oldest first: stop at a busy one)."""
        opened = self.open
        while opened:
            det = next(iter(opened.values()))
            if now - det.last_end < self.idle:
                return
            opened.popitem(last=False)
            _close(det)

    def flush_all(self) -> None:
        while self.open:
            _close(self.open.popitem(last=False)[1])


def _close(det: ConnectionDetector) -> None:
    if det.runs:
        det.flush()
    det.last_end = float("-inf")  # connections lent to it take their statements back


class PatternDetector:
    """The connections' detectors, their thresholds and the findings they report.

    Owned by the profiler, which calls ``connection(ctx)`` the first time a session records
    (and when its application_name changes) and ``closed(ctx)`` when it ends. Also the state
    contributor for the findings (``sqlproxy.state`` looks for ``profiler.detector``).
    """

    state_section = "findings"
    state_version = 1

    def __init__(self, config: AnalysisSection, log: Any = None,
                 wall_offset: float = 0.0) -> None:
        self.config = config
        self.findings = FindingsStore(config.max_findings, log)
        self.connections: dict[int, ConnectionDetector] = {}
        self.wall_offset = wall_offset
        self._thresholds: dict[str, Thresholds] = {}
        self.traces = Traces(config.trace_idle_ms / 1000.0)

    def configure(self, config: AnalysisSection) -> None:
        self.config = config
        self.findings.max_entries = config.max_findings
        self.traces.idle = config.trace_idle_ms / 1000.0
        self._thresholds.clear()
        for det in self.connections.values():
            det.apply(self.thresholds(det.application))

    def thresholds(self, application: str) -> Thresholds:
        t = self._thresholds.get(application)
        if t is None:
            if len(self._thresholds) >= 1024:  # application names come from clients
                self._thresholds.clear()
            t = self._thresholds[application] = thresholds_for(self.config, application)
        return t

    def connection(self, ctx: SessionInfo) -> ConnectionDetector:
        """The detector of ``ctx``, created or brought up to date with its application_name."""
        app = ctx.application_name
        det = self.connections.get(ctx.id)
        if det is None:
            det = ConnectionDetector(self.findings, self.thresholds(app), app, ctx.database,
                                     ctx.id, self.wall_offset)
            self.connections[ctx.id] = det
        elif det.application != app:
            if det.runs:
                det.flush()  # what ran so far belongs to the old name
            det.application = app
            det.apply(self.thresholds(app))
        return det

    def trace(self, ctx: SessionInfo, tags: Any, started: float) -> tuple[ConnectionDetector,
                                                                         bool]:
        """The detector of the request ``tags.trace_id`` (a traced statement of ``ctx`` is
        about to be observed), and whether the request is new. The connection is lent to it:
        its untagged statements within a burst gap go there too."""
        trace_id: str = tags.trace_id
        det = self.traces.get(trace_id)
        new = det is None
        if det is None:
            app = ctx.application_name
            t = self.thresholds(app)
            det = ConnectionDetector(self.findings, t, app, ctx.database, ctx.id,
                                     self.wall_offset)
            det.gap = _NEVER  # a request is one burst, whatever its idle gaps
            det.trace_id = trace_id
            det.set_tags(tags)
            self.traces.add(trace_id, det, started)
        elif not det.endpoint and tags.endpoint:
            det.set_tags(tags)
        home = ctx.detector
        if home is None or home.application != ctx.application_name:
            home = ctx.detector = self.connection(ctx)
        lent = home.lent
        if lent is not det:
            if home.runs and started - home.last_end >= home.gap:
                home.flush()
            # The connection's transaction state goes with it (a driver's BEGIN comes
            # untagged, just before the request's first statement).
            was = lent if lent is not None and started - lent.last_end < home.gap else home
            if det.block != was.block:
                det.block = was.block
                det.tx_statements = 0
                det.tx_write = None
            home.lent = det
        return det, new

    def closed(self, ctx: SessionInfo) -> None:
        det = self.connections.pop(ctx.id, None)
        if det is not None and det.runs:
            det.flush()

    def flush_idle(self, now: float) -> None:
        """Judge the bursts of connections idle for a gap (a reader wants current findings)."""
        for det in self.connections.values():
            if det.idle_since(now):
                det.flush()
        self.traces.flush_idle(now)

    def reset(self) -> None:
        self.findings.reset()
        for det in self.connections.values():
            det.forget_runs()
        for det in self.traces.open.values():
            det.forget_runs()

    # -- persistence (sqlproxy.state.StateContributor) -------------------------------------
    def to_state(self) -> Any:
        return self.findings.to_state()

    def from_state(self, data: Any, version: int) -> None:
        self.findings.from_state(data, version)
