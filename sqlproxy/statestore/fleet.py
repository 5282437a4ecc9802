"""The fleet view as the admin API serves it: built on demand from the state store's last
exchange with the state database, in a worker thread, and reused until that changes.

Built from snapshots, this instance's included (the one it wrote last), rather than from its
live objects: turning thousands of live statistics entries into a view takes long enough
(a few hundred ms for 3 x 5,000 fingerprints here) that it must not run on the event loop,
and a worker thread may only touch data nothing else mutates. So every instance's part of the
view is as old as that instance's last snapshot, at most ``snapshot_seconds``;
``scope=local`` stays live.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from sqlproxy.analysis.profiler import Profiler
from sqlproxy.config import AnalysisSection
from sqlproxy.logs import get_logger
from sqlproxy.statestore.base import FleetState, StateStore
from sqlproxy.statestore.view import InstanceSections, fleet_view

log = get_logger("sqlproxy.state")


def build_view(config: AnalysisSection, instance: str,
               state: FleetState) -> tuple[Profiler, list[str]]:
    """The merged view of ``state`` (pure; run in a worker thread)."""
    parts: list[tuple[str, InstanceSections]] = []
    if state.local is not None:
        parts.append((instance, {n: (v, json.loads(d)) for n, v, d in state.local}))
    parts += [(o.instance, o.sections) for o in sorted(state.others, key=lambda o: o.instance)]
    return fleet_view(config, parts)


class FleetViews:
    def __init__(self, store: StateStore, instance: str,
                 analysis: Callable[[], AnalysisSection]) -> None:
        self.store = store
        self.instance = instance
        self.analysis = analysis  # the live [analysis] section (reloads change it)
        self._cached: tuple[int, Profiler] | None = None
        self._lock = asyncio.Lock()
        self._problems: set[str] = set()

    async def view(self) -> Profiler | None:
        """The merged view; None when no other instance is in the fleet (the caller then
        answers with this instance's live profiler)."""
        state = self.store.fleet_state()
        if not state.others:
            return None
        async with self._lock:  # one build at a time; the others wait for it and reuse it
            state = self.store.fleet_state()
            cached = self._cached
            if cached is not None and cached[0] == state.generation:
                return cached[1]
            view, problems = await asyncio.to_thread(build_view, self.analysis(),
                                                     self.instance, state)
            for problem in problems:
                if problem not in self._problems:  # once each, not at every request
                    self._problems.add(problem)
                    log.warning("fleet_section_skipped", problem=problem)
            self._cached = (state.generation, view)
            return view
