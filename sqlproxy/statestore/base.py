"""The ``StateStore`` protocol the runtime talks to, and the status a store reports (for
``/healthz`` and ``/metrics``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from sqlproxy.state import StateContributor

#: The sections of one instance: name -> (version, JSON text), as ``StateFile.collect`` makes.
Sections = list[tuple[str, int, str]]
Contributors = Callable[[], list[StateContributor]]


@dataclass(frozen=True, slots=True)
class InstanceSnapshot:
    """Another instance's last snapshot, as read from the shared state database."""

    instance: str
    sqlproxy: str  # the version that wrote it
    written_at: float  # Unix time, by the state database's clock
    age_s: float  # seconds since it was written (by the state database's clock)
    snapshot_seconds: float  # that instance's snapshot period
    sections: Mapping[str, tuple[int, Any]]  # name -> (version, parsed JSON)


@dataclass(frozen=True, slots=True)
class StoreStatus:
    kind: str  # "sqlite" | "postgresql"
    where: str  # the file's path, or the database URL without its password
    instance: str
    ok: bool | None  # None: not tried yet
    error: str | None  # the last failure, while failing
    retry_in_s: float | None  # while failing: seconds until the next attempt
    failures: int  # failed attempts since start
    restored: bool  # this instance's own state was read back (or there was none)
    last_success: float | None  # Unix time of the last successful snapshot
    fleet_instances: int  # other instances in the fleet view
    warning: str | None = None  # a problem that does not stop snapshots (a shared name)

    def to_dict(self) -> dict[str, Any]:
        from sqlproxy.analysis.timefmt import iso

        return {
            "ok": self.ok is not False, "kind": self.kind, "where": self.where,
            "instance": self.instance, "error": self.error,
            "retry_in_s": None if self.retry_in_s is None else round(self.retry_in_s, 3),
            "failures": self.failures, "restored": self.restored,
            "last_snapshot": iso(self.last_success) if self.last_success else None,
            "fleet_instances": self.fleet_instances, "warning": self.warning,
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class FleetState:
    """What a fleet view is built from: this instance's last snapshot and the others'.

    ``generation`` changes whenever either does, so a view built from one generation can be
    reused until the next."""

    generation: int
    local: Sections | None  # this instance's sections as last written (None: not yet)
    others: list[InstanceSnapshot]


class StateStore(Protocol):
    """Keeps this instance's state across restarts; a shared store also shows the others'."""

    async def restore(self) -> None:
        """Restore this instance's state, before the proxy starts. Must not hold up the proxy
        for a store that may be unreachable: that one restores later, in the background."""

    def start(self) -> None:
        """Start the background work (periodic snapshots), once the proxy runs."""

    async def snapshot(self) -> bool:
        """Write a snapshot now; False (and logged) if it could not be written."""

    async def close(self) -> None:
        """Stop background work and write a final snapshot."""

    def status(self) -> StoreStatus: ...

    def others(self) -> list[InstanceSnapshot]:
        """The other instances in the fleet view (empty for a store of one)."""

    def fleet_state(self) -> FleetState: ...
