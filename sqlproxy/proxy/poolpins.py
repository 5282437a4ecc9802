"""What pins a pooled client to its server connection (``docs/pooling.md``, "What pins a
client"), and how a pin is reported.

Session state that cannot survive lending the server to another client — SET outside a
transaction (or inside one: it outlives COMMIT), LISTEN, session advisory locks, temporary
tables, WITH HOLD cursors, SQL PREPARE, startup ``options`` — keeps the client on its server
for the rest of its session. The routing policy knows these statements (``pin_reason``); a
text without any of their words is never parsed (``pinscan.may_pin``), and texts and
normalized statements found clean are remembered per pool manager.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

from sqlproxy.logs import get_logger
from sqlproxy.proxy import deciding
from sqlproxy.proxy.pinscan import may_pin
from sqlproxy.routing.policy import RoutedStatement, pin_reason
from sqlproxy.wire.messages import TX_IDLE

if TYPE_CHECKING:
    from sqlproxy.proxy.pooled import PooledSession
    from sqlproxy.routing.units import Unit

__all__ = ["check_unit", "options_as_sql", "pin"]

log = get_logger("sqlproxy.pool")
_OPTION = re.compile(r"(?:-c\s*|--)([A-Za-z_][\w.]*)=((?:\\.|\S)*)")
_CLEAN_LIMIT = 10_000  # texts (and normalized statements) remembered as clean, per manager


def options_as_sql(parameters: dict[str, str]) -> str:
    """What pins a client that logged in with ``options`` (``-c name=value`` / ``--name=value``,
    a backslash escaping the next character) or ``replication``, as the statements it amounts
    to: SET for each setting, the startup parameter itself for anything else."""
    out: list[str] = []
    options = parameters.get("options", "")
    rest = _OPTION.sub("", options).strip()
    for name, value in _OPTION.findall(options):
        value = re.sub(r"\\(.)", r"\1", value).replace("'", "''")
        out.append(f"SET {name} = '{value}'")
    if rest:
        out.append(f"-- startup options: {rest}")
    if "replication" in parameters:
        out.append(f"-- startup parameter replication={parameters['replication']}")
    return "; ".join(out) if out else "-- startup options"


def check_unit(session: PooledSession, unit: Unit) -> None:
    """Pin ``session`` if a statement of ``unit`` (about to be sent) pins."""
    texts = list(unit.queries) + [sql for _, sql, _ in unit.parses]
    if not texts:
        return
    in_tx = session.conv is not None and session.conv.tx_status != TX_IDLE
    clean = session.manager.clean_texts
    for text in texts:
        if text in clean:  # seen before: pins nothing, in or out of a transaction
            continue
        if _pin_text(session, text, in_tx):
            return
        if len(clean) >= _CLEAN_LIMIT:
            clean.clear()
        clean.add(text)


def _pin_text(session: PooledSession, text: str, in_tx: bool) -> bool:
    """Pin the session if ``text`` holds a statement that pins (True if it did)."""
    if not may_pin(text):
        return False
    clean = session.manager.clean_shapes
    for n, shape in deciding.statements_nr(session, text):
        if n.text in clean:
            if shape.command == "begin":
                in_tx = True
            continue
        reason = pin_reason(RoutedStatement(n.text, shape, n.hints))
        if reason is None and shape.kind.value == "set" \
                and not n.text.startswith(("set local ", "set transaction ")):
            # A SET in a transaction block outlives its COMMIT too.
            reason = ("set in a transaction (kept after commit)" if in_tx
                      else "set outside a transaction")
        if reason is None and shape.command == "begin":
            in_tx = True
        if reason is not None:
            pin(session, reason, text)
            return True
        if len(clean) >= _CLEAN_LIMIT:
            clean.clear()
        clean.add(n.text)
    return False


def pin(session: PooledSession, reason: str, text: str) -> None:
    """Pin ``session`` because of ``text``: listed in its pool's ``pinned`` (``/api/pools``),
    logged, and a ``session_state_in_pool`` finding when profiled."""
    session.pinned = reason
    pool = session.pool
    if pool is not None:
        pool.pinned[session.id] = {"session": session.id, "client": session.peer,
                                   "application_name": session.application_name,
                                   "reason": reason, "statement": text[:1000],
                                   "since": time.time()}
    log.info("session_pinned", session=session.id, reason=reason, statement=text[:200])
    profiler = session.profiler
    if profiler is not None:
        profiler.note_pool_pin(session.info, reason, text)
