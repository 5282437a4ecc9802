"""The fleet view: one ``Profiler`` holding the merged state of several instances, so that the
admin API answers ``scope=fleet`` with the very code that answers ``scope=local``.

Pure (no I/O): each instance's state arrives as state sections (name -> (version, data), the
shape snapshots have) and is restored into a fresh profiler through the same contributors
that restore a snapshot after a restart; restoring into a profiler that already holds data
merges (``sqlproxy.statestore.merge``). The view has no size bounds: each instance already
bounds its own fingerprints, findings and slow log, and the view must show their sum.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from sqlproxy.analysis.profiler import Profiler
from sqlproxy.config import AnalysisSection
from sqlproxy.state import StateContributor, profiler_contributors
from sqlproxy.statestore.merge import merge_slow

__all__ = ["fleet_view", "live_sections"]

InstanceSections = Mapping[str, tuple[int, Any]]


def live_sections(contributors: list[StateContributor]) -> dict[str, tuple[int, Any]]:
    """A running instance's sections, as plain data (what a snapshot would hold)."""
    return {c.state_section: (c.state_version, c.to_state()) for c in contributors}


def fleet_view(config: AnalysisSection,
               instances: Iterable[tuple[str, InstanceSections]]) -> tuple[Profiler, list[str]]:
    """A profiler with every instance's state merged in, and the problems met (a section
    written by an incompatible version is left out of the view, named in a problem)."""
    view = Profiler(config)
    view.stats.max_entries = sys.maxsize
    view.detector.findings.max_entries = sys.maxsize
    view.slow.entries = deque()
    view.started_at = float("inf")
    contributors = {c.state_section: c for c in profiler_contributors(view)}
    problems: list[str] = []
    for instance, sections in instances:
        for name, (version, data) in sections.items():
            c = contributors.get(name)
            if c is None:
                continue  # a section this version does not know: nothing to show it with
            try:
                c.from_state(data, version)
            except Exception as exc:  # another instance's data must not break the view
                problems.append(f"{instance}: section {name} (version {version}): "
                                f"{type(exc).__name__}: {exc}")
    view.slow.entries = deque(merge_slow([view.slow.entries]))
    if view.started_at == float("inf"):
        view.started_at = 0.0
    return view, problems
