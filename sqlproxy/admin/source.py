"""What the admin side reads from the rest of the process.

The admin package depends on ``analysis`` (read only) and on this small protocol, not on the
proxy package: ``sqlproxy.runtime.Runtime`` implements it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from sqlproxy.analysis.profiler import Profiler
from sqlproxy.config import Config
from sqlproxy.statestore.base import StoreStatus


class SessionView(Protocol):
    def describe(self) -> dict[str, Any]: ...


class ProxyView(Protocol):
    @property
    def accepting(self) -> bool: ...

    @property
    def sessions(self) -> Mapping[int, Any]: ...


class AdminSource(Protocol):
    """The process as the admin API sees it (``Runtime``)."""

    @property
    def config(self) -> Config: ...

    @property
    def profiler(self) -> Profiler | None: ...

    @property
    def proxy(self) -> ProxyView: ...

    def backends(self) -> list[dict[str, Any]]:
        """Primary first, then replicas; see ``Runtime.backends`` for the keys."""
        ...

    async def fleet_profiler(self) -> Profiler | None:
        """Every instance's statistics merged (``scope=fleet``); this one's alone without a
        shared state database."""
        ...

    def fleet_instances(self) -> list[dict[str, Any]]:
        """This instance and the others in the fleet view (``/api/fleet``)."""
        ...

    def state_status(self) -> StoreStatus | None:
        """The state store's health (None: no durable state)."""
        ...

    def workers(self) -> list[dict[str, Any]]:
        """The worker processes (``/api/workers``): one with ``workers = 1``."""
        ...
