"""Pool-sizing advice and pool findings from observed concurrency (pure: a pool's figures in,
sentences out). Worded for both sides: the proxy's ``pool.size`` and the application's own
client-side pool (SQLAlchemy ``pool_size`` / ``max_overflow``, and the like).

The figures come from ``PoolIO.describe`` (``/api/pools``): ``all_busy_share`` is the share of
the pool's life with every slot busy, ``wait_ms`` the waits for a server connection,
``max_active_by_application`` the most server connections one application ever had busy at
once, ``max_clients_by_application`` the most client connections it ever had open.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["findings", "sizing"]

#: Every slot busy this share of the time (or any client timed out): the pool is saturated.
SATURATED_SHARE = 0.05
#: Server connections opened per checkout above this (past the first ``size``): churn.
CHURN_RATIO = 0.2


def sizing(pool: dict[str, Any]) -> list[str]:
    """Sizing advice for one pool, as sentences (empty: nothing to say)."""
    out: list[str] = []
    size = int(pool["size"])
    share = float(pool["all_busy_share"])
    p99 = float(pool["wait_ms"]["p99"])
    max_active = int(pool["max_active"])
    timeouts = int(pool["wait_timeouts"])
    if pool["checkouts"] == 0:
        return out
    if share >= SATURATED_SHARE or timeouts:
        # Little's law, roughly: the time spent with the pool full is demand beyond it.
        want = size + max(1, math.ceil(size * 2 * share))
        out.append(f"pool.size {size}: all {size} busy {share * 100:.0f} % of the time, "
                   f"clients waited p99 {p99:.0f} ms"
                   + (f", {timeouts} timed out (53300)" if timeouts else "")
                   + f" → {want} (if the server has the cores and max_connections for it)")
    elif max_active + 2 < size:
        want = max(max_active + 2, int(pool.get("min_idle", 0)))
        out.append(f"pool.size {size}: at most {max_active} server connections ever busy "
                   f"→ {want} is enough")
    busy_by_app: dict[str, int] = pool.get("max_active_by_application", {})
    clients_by_app: dict[str, int] = pool.get("max_clients_by_application", {})
    for app, clients in sorted(clients_by_app.items()):
        busy = busy_by_app.get(app, 0)
        if busy and clients >= 2 * busy and clients - busy >= 4:
            overflow = max(2, math.ceil(busy * 2 / 3))
            out.append(f"application {app or '(unnamed)'}: at most {busy} connections ever "
                       f"busy of {clients} opened → SQLAlchemy pool_size={busy}, "
                       f"max_overflow={overflow} (or the same in its own pool)")
    return out


def findings(pool: dict[str, Any]) -> list[dict[str, Any]]:
    """``pool_saturated``, ``connection_churn`` and ``session_state_in_pool`` for one pool."""
    out: list[dict[str, Any]] = []
    where = {"database": pool["database"], "user": pool["user"]}
    size = int(pool["size"])
    share = float(pool["all_busy_share"])
    if pool["checkouts"] and (share >= SATURATED_SHARE or pool["wait_timeouts"]):
        out.append({"kind": "pool_saturated", **where,
                    "detail": f"all {size} server connections busy {share * 100:.0f} % of the "
                              f"time, p99 wait {pool['wait_ms']['p99']:.0f} ms, "
                              f"{pool['wait_timeouts']} waits past pool.max_wait_ms",
                    "suggestion": "shorten transactions (no network calls or user think time "
                                  "inside one), then raise pool.size: "
                                  + "; ".join(sizing(pool)[:1])})
    opened = int(pool["servers_opened"])
    closed: dict[str, int] = pool["servers_closed"]
    if opened > size and pool["checkouts"] and (opened - size) / pool["checkouts"] > CHURN_RATIO:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(closed.items(), key=lambda x: -x[1]))
        hint = ("clients connect per request and authenticate through to the server: let "
                "the proxy answer logins (trust from the proxy host, or routing.passwords) or "
                "keep a client-side pool" if closed.get("login") else
                "raise pool.server_idle_timeout_s / pool.server_lifetime_s, or pool.min_idle")
        out.append({"kind": "connection_churn", **where,
                    "detail": f"{opened} server connections opened for {pool['checkouts']} "
                              f"checkouts (closed: {reasons or 'none'})",
                    "suggestion": hint})
    for pin in pool.get("pinned_clients", []):
        out.append({"kind": "session_state_in_pool", **where,
                    "session": pin["session"], "application_name": pin["application_name"],
                    "reason": pin["reason"], "statement": pin["statement"],
                    "suggestion": "this client keeps a server connection for its whole "
                                  "session: use SET LOCAL / transaction-scoped advisory locks / "
                                  "ON COMMIT DROP temp tables, or a session-mode pool for "
                                  "LISTEN"})
    return out
