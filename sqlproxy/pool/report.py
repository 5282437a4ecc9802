"""The pools' findings as findings: ``pool_saturated`` and ``connection_churn`` (server
connections opened over and over) go into the profiler's findings store, where
``/api/findings``, the ``sqlproxy_findings`` metric, the dashboard and the state snapshots
find every other finding. (``session_state_in_pool`` is reported as it happens, by the
pooled session through ``Profiler.note_pool_pin``; ``connection_churn`` of clients that
connect per request by ``sqlproxy.analysis.churn``, in any pool mode.)

The pools keep running totals; ``PoolReporter.report`` turns what changed since it last looked
into occurrences, so it can run as often as wanted (the pool ticker calls it every second, the
admin API before it lists findings). Pure: pool descriptions (``PoolIO.describe``) in, store
updates out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlproxy.analysis.churn import churn_fingerprint
from sqlproxy.analysis.findings import CONNECTION_CHURN, POOL_SATURATED, FindingsStore
from sqlproxy.pool import advice

__all__ = ["PoolReporter"]


@dataclass(slots=True)
class _Seen:
    waits: int = 0
    timeouts: int = 0
    wait_ms: float = 0.0
    opened: int = 0


class PoolReporter:
    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], _Seen] = {}

    def report(self, store: FindingsStore, pools: list[dict[str, Any]], now: float) -> None:
        """Record what the pools ``pools`` (``describe`` output) show since the last call;
        ``now`` is the wall clock."""
        for pool in pools:
            db, user = str(pool["database"]), str(pool["user"])
            seen = self._seen.get((db, user))
            if seen is None:
                seen = self._seen[(db, user)] = _Seen()
            found = {f["kind"]: f for f in advice.findings(pool)}
            where = f"pool {db}/{user}"
            sat = found.get(POOL_SATURATED)
            waits, timeouts = int(pool["waits"]), int(pool["wait_timeouts"])
            wait_ms = float(pool["wait_total_ms"])
            if sat is not None and (waits > seen.waits or timeouts > seen.timeouts):
                count = waits - seen.waits + timeouts - seen.timeouts
                store.add(POOL_SATURATED, churn_fingerprint("pool", db, user), where, None,
                          None, "", db, int(pool.get("max_waiting", count)),
                          (wait_ms - seen.wait_ms) / 1000.0, now, count=count, user=user,
                          example=str(sat["detail"]), suggestion=str(sat["suggestion"]))
                seen.waits, seen.timeouts, seen.wait_ms = waits, timeouts, wait_ms
            churn = found.get(CONNECTION_CHURN)
            opened = int(pool["servers_opened"])
            if churn is not None and opened > seen.opened:
                count = opened - seen.opened
                store.add(CONNECTION_CHURN, churn_fingerprint("pool", db, user), where, None,
                          None, "", db, count, 0.0, now, count=count, user=user,
                          example=str(churn["detail"]), suggestion=str(churn["suggestion"]))
                seen.opened = opened
